// Shared by the demo pages: a client configured from the page's URL, and the
// connection indicator. Query parameters (all optional):
//   gateways=ws://h1:p/ws,ws://h2:p/ws   (default: the gateway that served the page)
//   token=...  minDelay=ms  maxDelay=ms  pingInterval=ms  pingTimeout=ms
//   tokenUrl=https://app.example/token   (short-lived tokens: fetched before every
//     connection and again before each one expires, as a signed-in app would)
import { FanrouteClient } from "./fanroute.js";

export const params = new URLSearchParams(location.search);

export function gatewayUrls() {
  const list = (params.get("gateways") ?? "").split(",").map((s) => s.trim()).filter(Boolean);
  if (list.length > 0) return list;
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return [`${scheme}//${location.host}/ws`];
}

function numberParam(name) {
  const raw = params.get(name);
  if (raw === null || raw === "") return undefined;
  const value = Number(raw);
  return Number.isFinite(value) && value >= 0 ? value : undefined;
}

export function makeClient() {
  const options = {};
  for (const name of ["minDelay", "maxDelay", "pingInterval", "pingTimeout", "resetAfter"]) {
    const value = numberParam(name);
    if (value !== undefined) options[name] = value;
  }
  const token = params.get("token");
  if (token) options.token = token;
  const tokenUrl = params.get("tokenUrl");
  if (tokenUrl) {
    // The app's own endpoint signs a token for the signed-in user (credentials: its cookie).
    options.getToken = async () => {
      const response = await fetch(tokenUrl, { credentials: "include", cache: "no-store" });
      if (response.status === 401 || response.status === 403) return null; // signed out: stop
      if (!response.ok) throw new Error(`token endpoint answered ${response.status}`);
      return (await response.text()).trim();
    };
  }
  return new FanrouteClient(gatewayUrls(), options);
}

/**
 * Keep `element` (with children .dot and .text) in step with the client's state, and
 * record what happened in `log` (an array the tests read).
 */
export function bindIndicator(client, element, log = []) {
  const dot = element.querySelector(".dot");
  const text = element.querySelector(".text");
  const show = (state, message) => {
    element.dataset.state = state;
    dot.title = state;
    text.textContent = message;
  };
  show("disconnected", "not connected");
  client.on("connecting", ({ url, attempt }) => {
    if (client.lastClose === null) show("connecting", `connecting to ${url}…`);
    else show("reconnecting", `reconnecting to ${url} (attempt ${attempt})…`);
    log.push({ event: "connecting", url, at: Date.now() });
  });
  client.on("connected", ({ url, session }) => {
    show("connected", `live · ${url}`);
    log.push({ event: "connected", url, session, at: Date.now() });
  });
  client.on("disconnected", ({ code, reason, url, reconnect, delay }) => {
    const why = reason ? `${code} ${reason}` : `${code}`;
    if (reconnect) show("reconnecting", `connection lost (${why}); reconnecting in ${(delay / 1000).toFixed(1)} s…`);
    else show("disconnected", `disconnected (${why})`);
    log.push({ event: "disconnected", code, reason, url, reconnect, delay, at: Date.now() });
  });
  client.on("subscribed", (detail) => log.push({ event: "subscribed", ...detail, at: Date.now() }));
  client.on("unrecovered", (detail) => log.push({ event: "unrecovered", ...detail, at: Date.now() }));
  client.on("error", (detail) => log.push({ event: "error", ...detail, at: Date.now() }));
  client.on("refreshed", (detail) => log.push({ event: "refreshed", ...detail, at: Date.now() }));
  return log;
}

/** Record a subscription's states in `log` (the tests read them). */
export function logStates(sub, log) {
  sub.on("state", ({ state, previous }) => log.push({ event: "sub-state", topic: sub.topic, state, previous, at: Date.now() }));
}
