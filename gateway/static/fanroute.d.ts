// Type declarations for fanroute.js, the browser client of fanroute (protocol v1).
// All times are in milliseconds.

export declare const CLOSE_NORMAL: 1000;
export declare const CLOSE_ABNORMAL: 1006;
export declare const CLOSE_POLICY: 1008;
export declare const CLOSE_RESTART: 1012;
export declare const CLOSE_TRY_AGAIN: 1013;
export declare const CLOSE_UNAUTHORIZED: 4001;
export declare const CLOSE_DISCONNECTED: 4003;
export declare const CLOSE_SLOW_CONSUMER: 4008;
export declare const CLOSE_HEARTBEAT_TIMEOUT: 4009;
export declare const CLOSE_RATE_LIMIT: 4029;
/** Close codes after which the client stops reconnecting (4001, 4003, 1008). */
export declare const TERMINAL_CLOSE_CODES: ReadonlySet<number>;
/** 1012 (a gateway draining): the client returns at a random moment within this window. */
export declare const RESTART_WINDOW: number;
/** Error codes answering a subscribe after which it is retried (unavailable, rate_limited, internal). */
export declare const TRANSIENT_ERRORS: ReadonlySet<string>;
/** Error codes answering a publish after which it is sent again with its idem key
 * (unavailable, outcome_unknown, internal). */
export declare const PUBLISH_RETRY_ERRORS: ReadonlySet<string>;
/** The longest idem key the protocol allows (64). */
export declare const MAX_IDEM_LENGTH: number;
/** The reason of the 4001 close for a token that expired on an open connection: the
 * one 4001 a client with getToken recovers from (with a new token). */
export declare const TOKEN_EXPIRED_REASON: "token expired";
/** A token is refreshed at most this long (ms) before its exp. */
export declare const REFRESH_LEAD: number;
/** Milliseconds from `wall` (ms since the epoch) until the JWT's exp (read, not verified), or null. */
export declare function tokenTtl(token: unknown, wall: number): number | null;
/** When (ms from now) to refresh a token that expires in `ttl` ms: a third of its life early, at most REFRESH_LEAD. */
export declare function refreshDelay(ttl: number): number;

export type ReconnectRule = "never" | "prompt" | "longest" | "backoff";
/** The rule for close `code` (fanroute.codes in Python): 4001, 4003, 1008 never; 1012 prompt; 4029 longest. */
export declare function reconnectRule(code: number | null): ReconnectRule;

export interface BackoffOptions {
  /** Cap of the first draw (default 100). */
  minDelay?: number;
  /** Largest delay (default 10000). */
  maxDelay?: number;
  /** Growth of the cap per attempt (default 2). */
  factor?: number;
  /** A connection that lasted this long resets the attempt count (default 5000). */
  resetAfter?: number;
  /** Uniform [0, 1) source (default Math.random). */
  random?: () => number;
}

/** Exponential backoff with full jitter: next() draws uniformly in [0, cap(attempt)). */
export declare class Backoff {
  constructor(options?: BackoffOptions);
  readonly minDelay: number;
  readonly maxDelay: number;
  readonly factor: number;
  readonly resetAfter: number;
  attempt: number;
  cap(attempt: number): number;
  next(): number;
  connectionLasted(ms: number): void;
  reset(): void;
}

/** The delay before reconnecting after close `code`, or null to stop. */
export declare function reconnectDelay(
  code: number | null, backoff: Backoff, random?: () => number, restartWindow?: number,
): number | null;

/** Letters, digits and . _ : - / @ = + , # ~ ; 1 to 256 characters. */
export declare function isValidTopic(topic: unknown): topic is string;

export interface Position {
  epoch: string;
  seq: number;
}

export interface LostRange {
  /** The stream goes on from seq + 1 of this epoch. */
  epoch: string;
  seq: number;
  /** Where the page stood before. */
  previous: Position | null;
}

export type StreamState = "waiting" | "pending" | "active" | "retry";
export type OutgoingState = "waiting" | "pending" | "retry";

/** One publication ClientCore holds until it is acknowledged or fails. */
export declare class Outgoing {
  constructor(topic: string, payload: unknown, idem: string, deadline: number);
  readonly topic: string;
  readonly payload: unknown;
  /** The idem key, the same on every send. */
  readonly idem: string;
  /** No retry at or after it (ms, the core's clock). */
  readonly deadline: number;
  /** waiting (for a connection), pending (in flight), retry (at retryAt). */
  state: OutgoingState;
  request: number | null;
  /** Sends so far. */
  attempts: number;
  /** Retryable answers so far. */
  tries: number;
  retryAt: number | null;
  /** What left the outcome open last (null: nothing yet). */
  code: string | null;
  message: string;
}

/** One subscription's position and state, as ClientCore tracks it. */
export declare class Stream {
  constructor(topic: string, last?: number | null, presence?: boolean);
  readonly topic: string;
  /** Ask for the newest `last` messages on every subscribe (null: none). */
  readonly last: number | null;
  readonly presence: boolean;
  epoch: string | null;
  seq: number;
  state: StreamState;
  request: number | null;
  resuming: boolean;
  confirmed: boolean;
  retryAt: number | null;
  tries: number;
  duplicates: number;
  gaps: number;
  unrecovered: number;
  /** The last presence count received. */
  subscribers: number | null;
  /** After an answer to which `last` applied: its seq, until the first message. */
  window: number | null;
  floor: number;
  windowMarks: boolean;
  since(): Position | null;
}

export interface CoreSettings {
  minDelay?: number;
  maxDelay?: number;
  /** A connection up this long (from `connected`) resets the backoff. */
  backoffReset?: number;
  /** null: the gateway's value from `connected` (else 25000). */
  pingInterval?: number | null;
  /** null: the gateway's value from `connected` (else 8000). */
  pingTimeout?: number | null;
  /** Between application pings; null: pingInterval; 0: none. */
  appPing?: number | null;
  /** From connect() to the `connected` frame. */
  connectTimeout?: number;
  restartWindow?: number;
  token?: string | null;
  /** The host has a token source: a fetchToken action before every attempt and before exp. */
  fetchToken?: boolean;
  /** Subscribe together with `connect` (anonymous gateways only). */
  eager?: boolean;
  /** A publication's deadline, unless publish() is given one (default 10000). */
  publishTimeout?: number;
  /** Sends of one publication at most, the first included (default 10). */
  publishAttempts?: number;
  /** Automatic idem keys are `<prefix>-<n>` (1 to 40 characters; null: 16 random ones). */
  idemPrefix?: string | null;
}

export type Action =
  | { type: "connect"; url: string }
  | { type: "send"; frame: Record<string, unknown> }
  | { type: "ping" }
  | { type: "deliver" }
  | { type: "subscribed"; topic: string; epoch: string; seq: number; recovered: boolean; resumed: boolean }
  | ({ type: "unrecovered"; topic: string } & LostRange)
  | { type: "subscribeError"; topic: string; code: string; message: string; retryAt: number | null }
  | { type: "ready"; session: string | null }
  | { type: "answer"; id: number | null; frame: Record<string, unknown> }
  | { type: "drop"; code: number | null; reason: string }
  | { type: "reconnect"; at: number; delay: number; code: number | null }
  | { type: "stop"; code: number | null; reason: string }
  | { type: "presence"; topic: string; subscribers: number }
  /** Ask the token source, then call giveToken() or tokenFailed(). */
  | { type: "fetchToken"; reason: "connect" | "refresh" }
  | { type: "refreshed"; expires: number | null }
  /** Acknowledged (a retry of an applied publication gets the original seq). */
  | { type: "published"; publication: Outgoing; seq: number }
  /** Answered with a retryable code: sent again, same key, at retryAt (or on the next connection). */
  | { type: "publishRetry"; publication: Outgoing; code: string; message: string; retryAt: number }
  /** Refused, out of budget (the last open code, "disconnected", "timeout") or the client stopped ("closed"). */
  | { type: "publishFailed"; publication: Outgoing; code: string; message: string };

export interface Stats {
  connects: number;
  duplicates: number;
  gaps: number;
  unrecovered: number;
  /** Publications sent again with their idem key. */
  retries: number;
}

export declare const NOTHING: readonly Action[];
export declare const PING: { readonly type: "ping" };
export declare const DELIVER: { readonly type: "deliver" };
/** What ClientCore.message returns for an in-order message (compare with ===). */
export declare const DELIVERED: readonly Action[];

/**
 * The client's rules as a sans-I/O state machine (the twin of Python's
 * fanroute.clientcore): one method per event, each returning the actions to carry
 * out in order. Times are ms on any monotonic clock.
 */
export declare class ClientCore {
  constructor(urls: string[], settings?: CoreSettings, options?: { random?: () => number; firstUrl?: number });
  readonly urls: string[];
  readonly settings: Required<CoreSettings>;
  readonly backoff: Backoff;
  readonly streams: Map<string, Stream>;
  /** Publications held until answered for good, oldest first. */
  readonly publications: Set<Outgoing>;
  /** The prefix of this client's automatic idem keys. */
  readonly idemPrefix: string;
  readonly stats: Stats;
  readonly phase: "idle" | "connecting" | "open" | "ready" | "stopped";
  readonly url: string | null;
  readonly session: string | null;
  /** The token the next `connect` frame carries. */
  token: string | null;
  /** pingInterval + pingTimeout. */
  readonly deadline: number;
  /** How often to call tick(). */
  readonly checkPeriod: number;
  position(topic: string): Position | null;
  nextId(): number;
  /** A fresh idem key: `<prefix>-<n>`. */
  nextIdem(): string;
  subscribe(topic: string, last?: number | null, presence?: boolean): readonly Action[];
  unsubscribe(topic: string): readonly Action[];
  /** Hold a publication (key `idem`, else a fresh one; deadline now + `timeout`, else
   * publishTimeout) until acknowledged; sent at once when a connection is ready. */
  publish(
    topic: string, payload: unknown, now: number, idem?: string | null, timeout?: number | null,
  ): { publication: Outgoing; actions: readonly Action[] };
  /** Give up on a publication (the host's deadline): a publishFailed, or nothing if already settled. */
  abandon(publication: Outgoing): readonly Action[];
  /** The token source answered: a token expiring in `ttl` ms (null: unknown), or null: none to be had. */
  giveToken(token: string | null, now: number, ttl?: number | null): readonly Action[];
  /** The token source failed: tried again after a backoff delay. */
  tokenFailed(now: number, reason?: string): readonly Action[];
  start(now: number): readonly Action[];
  /** No more reconnecting; the publications held fail (publishFailed). */
  stop(): readonly Action[];
  connect(now: number): readonly Action[];
  opened(now: number): readonly Action[];
  closed(code: number | null, now: number, reason?: string): readonly Action[];
  heard(now: number): void;
  tick(now: number): readonly Action[];
  message(topic: string, seq: unknown, skipped?: unknown): readonly Action[];
  received(frame: Record<string, unknown>, now: number): readonly Action[];
}

/** An `error` frame from the gateway, or a request that could not complete. */
export declare class FanrouteError extends Error {
  constructor(code: string, message: string);
  /** bad_request, unauthorized, forbidden, rate_limited, too_large, unavailable,
   * outcome_unknown, internal, or, from the client itself: disconnected (the connection
   * closed before the answer: it may have been applied), closed, timeout. */
  readonly code: string;
  readonly reason: string;
}

/** What getToken() is asked for. */
export interface TokenContext {
  reason: "connect" | "refresh";
}

export interface ClientOptions {
  /** JWT sent in the `connect` frame (fixed: when it expires the client stops). */
  token?: string | null;
  /** A token source (sync or async), asked before every connection attempt and again
   * a third of the token's life before its exp (sent with `refresh` on the open
   * connection). Return null or "" when no token can be had: the client stops. A
   * source that throws is asked again after a backoff delay. */
  getToken?: (context: TokenContext) => string | null | Promise<string | null>;
  /** Reconnect backoff: cap of the first draw (default 100). */
  minDelay?: number;
  /** Reconnect backoff: largest delay (default 10000). */
  maxDelay?: number;
  /** A connection up this long resets the backoff (default 5000). */
  resetAfter?: number;
  /** Interval of the client's `ping` (default: the gateway's ping_interval). */
  pingInterval?: number;
  /** The connection is dead when nothing arrived for pingInterval + pingTimeout
   * (default: the gateway's ping_timeout). */
  pingTimeout?: number;
  /** An attempt that got no `connected` within this is abandoned (default 10000). */
  connectTimeout?: number;
  /** Default timeout of publish(), retries included (default 10000). */
  publishTimeout?: number;
  /** The WebSocket class (default globalThis.WebSocket): for Node or tests. */
  WebSocket?: { new (url: string): WebSocket };
  /** Uniform [0, 1) source for jitter and the first URL (default Math.random). */
  random?: () => number;
}

export type State = "disconnected" | "connecting" | "connected";

export interface PublishOptions {
  /** How long to keep trying (default: publishTimeout). */
  timeout?: number;
  /** The idempotency key, 1 to 64 characters (default: `<client prefix>-<n>`). */
  idem?: string;
}

export interface SubscribeOptions {
  /** Begin with the topic's newest `last` messages (and get them again whenever a
   * reconnect cannot recover), so a ticker shows the current value at once. */
  last?: number | null;
  /** Receive the topic's subscriber count, once after subscribing and on change. */
  presence?: boolean;
}

export interface MessageContext {
  topic: string;
  seq: number;
  /** Messages of the topic left out just before this one (conflation): not a fault. */
  skipped?: number;
}

export interface ClientEvents {
  state: { state: State; previous: State };
  /** A socket is being opened. */
  connecting: { url: string; attempt: number };
  connected: { url: string; session: string | null };
  /** A connection (or an attempt) ended. With reconnect true the client is back in
   * "connecting" and tries again after `delay`; otherwise it stopped. */
  disconnected: { code: number; reason: string; url: string | null; reconnect: boolean; delay: number | null };
  /** The gateway confirmed a subscribe; `resumed` when it carried `since`. */
  subscribed: { topic: string; epoch: string; seq: number; recovered: boolean; resumed: boolean };
  /** Messages of `topic` up to `seq` may have been lost (history too short, or the
   * stream restarted); delivery goes on from seq + 1. */
  unrecovered: { topic: string } & LostRange;
  /** An error frame not tied to a publish, a refused subscribe (with topic), or
   * getToken() failing (code "token": it is asked again after a backoff delay). For a
   * subscribe, `final` says the subscription ended (refused for good, or withdrawn by
   * the server: code "unsubscribed") and its handlers were removed; otherwise it is
   * sent again in `retryIn` ms, with `since`. */
  error: { code: string; message: string; topic?: string; final?: boolean; retryIn?: number | null };
  /** A pushed subscriber count (subscribed with presence: true). */
  presence: PresenceCount;
  /** The gateway took a new token on the open connection (`expires`: its exp, seconds). */
  refreshed: { expires: number | null };
}

export interface PresenceCount {
  topic: string;
  subscribers: number;
}

export type SubscriptionState = "unsubscribed" | "subscribing" | "subscribed";

export interface Publication extends MessageContext {
  payload: unknown;
}

export interface SubscriptionEvents {
  state: { state: SubscriptionState; previous: SubscriptionState };
  /** Waiting for an answer: subscribe() called, the connection lost, a gap being repaired. */
  subscribing: { topic: string; code: number | string | null; reason: string };
  subscribed: { topic: string; epoch: string; seq: number; recovered: boolean; resumed: boolean };
  /** Ended: unsubscribe() (code null), refused, or withdrawn by the server (code "unsubscribed"). */
  unsubscribed: { topic: string; code: number | string | null; reason: string };
  publication: Publication;
  presence: PresenceCount;
  unrecovered: { topic: string } & LostRange;
  error: { code: string; message: string; topic?: string; final?: boolean; retryIn?: number | null };
}

/** One topic's subscription, with the states centrifuge-js users know. */
export declare class Subscription {
  constructor(client: FanrouteClient, topic: string, options?: SubscribeOptions);
  readonly client: FanrouteClient;
  readonly topic: string;
  readonly last: number | null;
  readonly presence: boolean;
  readonly state: SubscriptionState;
  /** The last subscriber count pushed (presence: true), or null. */
  readonly subscribers: number | null;
  readonly position: Position | null;
  subscribe(): void;
  unsubscribe(): void;
  on<K extends keyof SubscriptionEvents>(event: K, handler: (detail: SubscriptionEvents[K]) => void): () => void;
  off<K extends keyof SubscriptionEvents>(event: K, handler: (detail: SubscriptionEvents[K]) => void): void;
}

export declare class FanrouteClient {
  constructor(urls: string | string[], options?: ClientOptions);
  readonly urls: string[];
  readonly state: State;
  /** The gateway connected to, or null. */
  readonly url: string | null;
  readonly session: string | null;
  readonly lastClose: { code: number; reason: string } | null;
  readonly stats: Stats;
  readonly topics: string[];
  readonly backoff: Backoff;

  connect(): void;
  /** Stops reconnecting; subscriptions are kept for a later connect(). */
  close(code?: number, reason?: string): void;
  /** Returns a function that unsubscribes this handler; the last one removed ends the
   * topic's subscription. A topic has one subscription: the first options stay. */
  subscribe<T = unknown>(topic: string, handler: (payload: T, context: MessageContext) => void, options?: SubscribeOptions): () => void;
  /** The topic's subscription (created "unsubscribed" if there is none): call subscribe() on it. */
  newSubscription(topic: string, options?: SubscribeOptions): Subscription;
  getSubscription(topic: string): Subscription | null;
  /** Resolves to the seq the cluster gave the publication, once acknowledged: sent
   * again with the same idem key (`idem`, else one unique to this client) after a
   * reconnect or an unavailable / outcome_unknown / internal answer, so it is applied
   * once. Rejects after `timeout` (publishTimeout) or 10 sends with what was learnt
   * last, or at once on any other error. */
  publish(topic: string, payload: unknown, options?: PublishOptions): Promise<number>;
  /** Resolves to the topic's subscriber count across the cluster. */
  presenceCount(topic: string, options?: { timeout?: number }): Promise<number>;
  position(topic: string): Position | null;
  on<K extends keyof ClientEvents>(event: K, handler: (detail: ClientEvents[K]) => void): () => void;
  off<K extends keyof ClientEvents>(event: K, handler: (detail: ClientEvents[K]) => void): void;
}
