{{/* Name prefix of every object: the release name unless overridden. */}}
{{- define "fanroute.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "fanroute.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fanroute.labels" -}}
helm.sh/chart: {{ include "fanroute.chart" . }}
app.kubernetes.io/name: fanroute
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: call with (list $ "gateway"). */}}
{{- define "fanroute.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: fanroute
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "fanroute.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "fanroute.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fanroute.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "fanroute.routerHeadless" -}}
{{- printf "%s-router-headless" (include "fanroute.fullname" .) -}}
{{- end -}}

{{/*
The shard list every gateway gets: router-N=tcp://<fullname>-router-N.<headless>.<ns>.svc.cluster.local:PORT.
The names are hashed by the ring, so they depend only on the index, never on the
release, and every gateway computes the same list.
*/}}
{{- define "fanroute.routerList" -}}
{{- $full := include "fanroute.fullname" . -}}
{{- $headless := include "fanroute.routerHeadless" . -}}
{{- $items := list -}}
{{- range $i := until (int .Values.router.replicas) -}}
{{- $items = append $items (printf "router-%d=tcp://%s-router-%d.%s.%s.svc.%s:%d" $i $full $i $headless $.Release.Namespace $.Values.clusterDomain (int $.Values.router.port)) -}}
{{- end -}}
{{- join "," $items -}}
{{- end -}}

{{- define "fanroute.secretName" -}}
{{- default (printf "%s-auth" (include "fanroute.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "fanroute.hasSecret" -}}
{{- if or .Values.auth.existingSecret .Values.auth.jwtSecret .Values.auth.jwtPublicKey .Values.auth.apiKey -}}true{{- end -}}
{{- end -}}

{{- define "fanroute.hasPublicKey" -}}
{{- if or .Values.auth.jwtPublicKey (and .Values.auth.existingSecret .Values.auth.existingSecretHasPublicKey) -}}true{{- end -}}
{{- end -}}

{{/* Selector of every pod of the release, gateways and routers alike. */}}
{{- define "fanroute.releaseSelectorLabels" -}}
app.kubernetes.io/name: fanroute
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
An nng listen address: call with (list HOST PORT). An empty HOST means the pod IP,
which the pod's POD_IP variable (downward API) must hold.
*/}}
{{- define "fanroute.nngListen" -}}
{{- printf "tcp://%s:%d" (default "$(POD_IP)" (index . 0)) (int (index . 1)) -}}
{{- end -}}

{{/*
The cluster secret every gateway and router shares (MAC on inter-node messages):
the chart's own Secret <fullname>-cluster, or cluster.existingSecret.
*/}}
{{- define "fanroute.clusterSecretName" -}}
{{- default (printf "%s-cluster" (include "fanroute.fullname" .)) .Values.cluster.existingSecret -}}
{{- end -}}

{{- define "fanroute.clusterSecretKey" -}}
{{- if .Values.cluster.existingSecret -}}
{{- default "cluster-secret" .Values.cluster.existingSecretKey -}}
{{- else -}}
cluster-secret
{{- end -}}
{{- end -}}

{{/*
The base64 value of the chart's cluster secret: call with the Secret as `lookup`
returns it (an empty map when there is none, and always under `helm template`). An
existing value is kept, so `helm upgrade` never splits the release between two
secrets; otherwise 64 random alphanumerics (about 380 bits).
*/}}
{{- define "fanroute.clusterSecretData" -}}
{{- $value := dig "data" "cluster-secret" "" . -}}
{{- if $value -}}
{{- $value -}}
{{- else -}}
{{- randAlphaNum 64 | b64enc -}}
{{- end -}}
{{- end -}}

{{/* The env entries every fanroute container gets for the cluster secret (and whether it encrypts). */}}
{{- define "fanroute.clusterSecretEnv" -}}
- name: FANROUTE_CLUSTER_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "fanroute.clusterSecretName" . }}
      key: {{ include "fanroute.clusterSecretKey" . }}
- name: FANROUTE_CLUSTER_ENCRYPT
  value: {{ .Values.cluster.encrypt | toString | quote }}
{{- end -}}

{{/*
The topologySpreadConstraints of one component: call with (list $ "gateway"). The
chart's own spread (topologySpread, across nodes by default) comes first, selected by
the component's labels so gateways and routers are spread each on their own; then the
values' topologySpreadConstraints, where one without a labelSelector gets the same
selector. Prints nothing when there is no constraint.
*/}}
{{- define "fanroute.topologySpreadConstraints" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- $v := index $root.Values $component -}}
{{- $selector := dict "matchLabels" (include "fanroute.selectorLabels" (list $root $component) | fromYaml) -}}
{{- $out := list -}}
{{- with $v.topologySpread -}}
{{- if .enabled -}}
{{- $c := dict "maxSkew" (int .maxSkew) "topologyKey" .topologyKey "whenUnsatisfiable" .whenUnsatisfiable "labelSelector" $selector -}}
{{- if eq $component "gateway" -}}
{{- /* Count only pods of the same ReplicaSet, so a rollout spreads the new pods too. */ -}}
{{- $_ := set $c "matchLabelKeys" (list "pod-template-hash") -}}
{{- end -}}
{{- $out = append $out $c -}}
{{- end -}}
{{- end -}}
{{- range $v.topologySpreadConstraints -}}
{{- $c := deepCopy . -}}
{{- if not (hasKey $c "labelSelector") -}}
{{- $_ := set $c "labelSelector" $selector -}}
{{- end -}}
{{- $out = append $out $c -}}
{{- end -}}
{{- if $out -}}
{{- toYaml $out -}}
{{- end -}}
{{- end -}}
