/**
 * fanroute.js — the browser client for fanroute (client protocol version 1).
 *
 * One dependency-free ES module. The gateway serves it at `/fanroute.js`; the
 * TypeScript declarations are beside it at `/fanroute.d.ts`.
 *
 *     import { FanrouteClient } from "/fanroute.js";
 *     const client = new FanrouteClient(["ws://127.0.0.1:8081/ws", "ws://127.0.0.1:8082/ws"]);
 *     client.on("state", ({ state }) => console.log(state));
 *     const off = client.subscribe("prices.AAPL", (payload, { topic, seq }) => render(payload));
 *     client.connect();
 *     const seq = await client.publish("chat.room1", { text: "hi" });
 *
 * What it does for the page:
 *
 * - one WebSocket to one gateway at a time, rotating through the URLs it was given
 *   (it starts at a random one so that pages spread over the gateways);
 * - an application-level `ping` every `pingInterval`; a connection from which
 *   nothing arrived for `pingInterval + pingTimeout` (the gateway's values from
 *   `connected` unless given) is dead. A browser cannot see the gateway's WebSocket
 *   pings, so the client keeps its own deadline; a background tab whose timers fire
 *   late pings before it blames the gateway for its own silence;
 * - reconnection with exponential backoff and full jitter; the attempt count resets
 *   only after a connection stayed up for `resetAfter` ms, so a gateway that
 *   accepts and drops at once cannot pull pages into a tight loop;
 * - after every reconnect, each topic is subscribed again with `since` (the last
 *   epoch and seq the page saw); duplicates are dropped and gaps repaired by
 *   resubscribing, so every handler sees each message once and in `seq` order, or
 *   an `unrecovered` event where the cluster could not fill the gap;
 * - a subscribe refused for a transient reason (unavailable, rate_limited,
 *   internal) is retried with backoff; any other refusal, or the server withdrawing
 *   the subscription, ends it: an `error` event with `final: true`, and its handlers
 *   are removed;
 * - close codes: 4001, 4003 and 1008 stop reconnecting; 1012 comes back within a
 *   second, with jitter; 4029 waits the longest backoff; anything else backs off;
 * - live feeds: `subscribe(topic, handler, { last, presence })` (or
 *   `newSubscription(topic, options)`, a Subscription with the states "unsubscribed",
 *   "subscribing" and "subscribed" and their events): `last` starts with the newest
 *   messages and asks for them again with `since` on every resubscribe; presence
 *   counts arrive as `presence` events; a message with `skipped` (conflation) is a gap
 *   the gateway announced, delivered as it is;
 * - tokens: `getToken()` (sync or async) is asked before every attempt and again a
 *   third of the token's life before its exp; the new one goes out with `refresh` on
 *   the open connection. A 4001 whose reason is "token expired" reconnects with a new
 *   token; any other 4001, or getToken() returning null, stops the client;
 * - publishing exactly once: every publication carries an `idem` key (the caller's,
 *   or `<random prefix>-<n>`) and is held until acknowledged. One whose outcome is
 *   open — the connection lost before the answer, or answered `unavailable`,
 *   `outcome_unknown` or `internal` — goes out again with the same key on the next
 *   connection or after a backoff delay; the gateway answers a retry of what it
 *   applied with the original seq. Within `publishTimeout` and 10 sends; any other
 *   error answer rejects at once.
 *
 * Every one of those rules is in `ClientCore` below: a sans-I/O state machine (events
 * in, actions out, no socket, no timer, no clock of its own) that is the twin of the
 * Python `fanroute.clientcore`, case for case — `tests/data/client_cases.json` drives
 * both. `FanrouteClient` only moves frames between a WebSocket and it. The pure parts
 * (ClientCore, Backoff, reconnectRule, reconnectDelay, isValidTopic) are exported for
 * tests; the client takes its WebSocket class as an option so it can run under
 * Node's test runner with a fake socket.
 */

// The declarations beside this file (fanroute.d.ts) are the types the JSDoc here
// refers to: `tsc --checkJs` (tests/browser) checks the code against them.
/** @typedef {import("./fanroute.js").Action} Action */
/** @typedef {{ timeout?: number }} RequestOptions */
/** @typedef {{ timeout?: number, idem?: string }} PublishOptions */

// --- Close codes ----------------------------------------------------------------

export const CLOSE_NORMAL = 1000;
export const CLOSE_ABNORMAL = 1006;
export const CLOSE_POLICY = 1008;
export const CLOSE_RESTART = 1012;
export const CLOSE_TRY_AGAIN = 1013;
export const CLOSE_UNAUTHORIZED = 4001;
export const CLOSE_DISCONNECTED = 4003;
export const CLOSE_SLOW_CONSUMER = 4008;
export const CLOSE_HEARTBEAT_TIMEOUT = 4009;
export const CLOSE_RATE_LIMIT = 4029;

// What a client does after each close code: fanroute.codes (CloseCode.reconnect) in
// Python; the shared cases hold the two to the same table.
/** @type {Map<number, import("./fanroute.js").ReconnectRule>} */
const RULES = new Map([
  [CLOSE_POLICY, "never"],
  [CLOSE_UNAUTHORIZED, "never"],
  [CLOSE_DISCONNECTED, "never"],
  [CLOSE_RESTART, "prompt"],
  [CLOSE_RATE_LIMIT, "longest"],
]);

/** "never", "prompt", "longest" or "backoff": the rule for close `code` (any code).
 * @param {number | null} code
 * @returns {import("./fanroute.js").ReconnectRule} */
export function reconnectRule(code) {
  return RULES.get(code) ?? "backoff";
}

/** Close codes after which reconnecting cannot help: the client stops. */
export const TERMINAL_CLOSE_CODES = new Set([...RULES].filter(([, rule]) => rule === "never").map(([code]) => code));

/** A draining gateway (1012) asks clients back soon: spread them over this window. */
export const RESTART_WINDOW = 1000;

/** The reason of the 4001 close for a token that expired on an open connection
 * (fanroute.codes.TOKEN_EXPIRED_REASON): the one 4001 a client with `getToken`
 * recovers from, with a new token. Any other 4001 means a token was refused. */
export const TOKEN_EXPIRED_REASON = "token expired";

/** A token is refreshed at most this long (ms) before its exp. */
export const REFRESH_LEAD = 30000;

/**
 * Milliseconds from `wall` (ms since the epoch) until the JWT `token`'s exp, or null.
 * The claims are read, not verified: the client only needs to know when to ask for
 * the next token; the gateway checks it.
 */
export function tokenTtl(token, wall) {
  const parts = typeof token === "string" ? token.split(".") : [];
  if (parts.length !== 3) return null;
  let claims;
  try {
    const b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    claims = JSON.parse(atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4)));
  } catch {
    return null;
  }
  const exp = claims !== null && typeof claims === "object" ? claims.exp : undefined;
  return typeof exp === "number" && Number.isFinite(exp) ? exp * 1000 - wall : null;
}

/** When (ms from now) to refresh a token that expires in `ttl` ms: a third of its
 * life before then, at most REFRESH_LEAD before. */
export function refreshDelay(ttl) {
  return Math.max(0, ttl - Math.min(ttl / 3, REFRESH_LEAD));
}

/** Errors answering a subscribe that may pass by themselves: the subscribe is retried. */
export const TRANSIENT_ERRORS = new Set(["unavailable", "rate_limited", "internal"]);

/** Errors answering a publish after which it is sent again with its idem key (not
 * applied, outcome unknown, the gateway failed): a retry is applied at most once.
 * Not rate_limited: that is the publisher's own rate, and the caller is told at once. */
export const PUBLISH_RETRY_ERRORS = new Set(["unavailable", "outcome_unknown", "internal"]);

/** The longest idem key the protocol allows. */
export const MAX_IDEM_LENGTH = 64;
const IDEM_PREFIX_LENGTH = 40; // room for "-" and a counter within MAX_IDEM_LENGTH

// Codes of a publishFailed that come from the client, not from the gateway.
const DISCONNECTED = "disconnected"; // the connection was lost with it in flight: maybe applied
const TIMEOUT = "timeout"; // the deadline passed with nothing learnt
const CLOSED = "closed"; // the client stopped before it was sent: not applied

/** 16 URL-safe random characters (96 bits): the prefix of a client's idem keys. */
function randomPrefix() {
  const bytes = new Uint8Array(12);
  if (typeof globalThis.crypto?.getRandomValues === "function") globalThis.crypto.getRandomValues(bytes);
  else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_");
}

const DEFAULT_PING_INTERVAL = 25000; // what a gateway announces unless configured otherwise
const DEFAULT_PING_TIMEOUT = 8000;

function uniform(random, a, b) {
  return a + (b - a) * random();
}

// --- Backoff --------------------------------------------------------------------

/**
 * Reconnect delays: exponential backoff with full jitter, in milliseconds.
 *
 * Full jitter (a uniform draw between 0 and the exponential cap) spreads the pages
 * that lost the same gateway over the whole window instead of letting them return
 * in waves. `next()` counts one more attempt; `connectionLasted(ms)` resets the count
 * only when the connection stayed up for at least `resetAfter` ms.
 */
export class Backoff {
  constructor({ minDelay = 100, maxDelay = 10000, factor = 2, resetAfter = 5000, random = Math.random } = {}) {
    if (!(minDelay >= 0 && maxDelay >= minDelay)) {
      throw new RangeError("backoff needs 0 <= minDelay <= maxDelay");
    }
    if (!(factor >= 1)) throw new RangeError("backoff factor must be at least 1");
    this.minDelay = minDelay;
    this.maxDelay = maxDelay;
    this.factor = factor;
    this.resetAfter = resetAfter;
    this.random = random;
    this.attempt = 0;
  }

  /** The upper bound of the draw for attempt number `attempt` (0-based). */
  cap(attempt) {
    return Math.min(this.maxDelay, this.minDelay * this.factor ** Math.min(attempt, 64));
  }

  /** The delay before the next attempt. */
  next() {
    const delay = uniform(this.random, 0, this.cap(this.attempt));
    this.attempt += 1;
    return delay;
  }

  /** Tell the policy how long the last connection stayed healthy (ms). */
  connectionLasted(ms) {
    if (ms >= this.resetAfter) this.attempt = 0;
  }

  reset() {
    this.attempt = 0;
  }
}

/**
 * What to do after a connection closed with `code`: the delay in ms before the next
 * attempt, or `null` to stop reconnecting. Every rule draws `backoff.next()` first
 * (so each attempt counts), then:
 *
 * - never (4001 unauthorized, 4003 disconnected by the server, 1008 policy): stop;
 *   the same token or the same behaviour would fail again;
 * - prompt (1012, a gateway draining): a random moment within RESTART_WINDOW (or
 *   the backoff delay, if that is shorter);
 * - longest (4029, rate limit exceeded repeatedly): between maxDelay and
 *   1.5 × maxDelay, whatever the attempt count: a page cut off for flooding must
 *   not return at once;
 * - backoff (anything else: 1006 lost, 1001, 1011, 1013, 4008, 4009, …): the draw.
 */
export function reconnectDelay(code, backoff, random = Math.random, restartWindow = RESTART_WINDOW) {
  const rule = reconnectRule(code);
  if (rule === "never") return null;
  const delay = backoff.next();
  if (rule === "prompt") return Math.min(delay, uniform(random, 0, restartWindow));
  if (rule === "longest") return uniform(random, backoff.maxDelay, 1.5 * backoff.maxDelay);
  return delay;
}

// --- Topics ---------------------------------------------------------------------------

const TOPIC_RE = /^[A-Za-z0-9._:\-/@=+,#~]{1,256}$/;

/** True when `topic` is a valid topic name (letters, digits and . _ : - / @ = + , # ~).
 * @param {unknown} topic
 * @returns {topic is string} */
export function isValidTopic(topic) {
  return typeof topic === "string" && TOPIC_RE.test(topic);
}

// --- The client core (sans-I/O) ----------------------------------------------------------

// Phases of the connection.
const IDLE = "idle"; // no socket: not started, or waiting for a reconnect to come due
const CONNECTING = "connecting"; // an attempt is under way
const OPEN = "open"; // the WebSocket is up, `connect` sent, no `connected` yet
const READY = "ready"; // `connected` received
const STOPPED = "stopped"; // a terminal close code, or the page stopped it

// States of one subscription.
const WAITING = "waiting"; // to be subscribed on the next ready connection
const PENDING = "pending"; // a subscribe is in flight
const ACTIVE = "active"; // confirmed: messages are tracked
const RETRY = "retry"; // refused for a transient reason: subscribed again at retryAt

const CONNECT_ID = 0;

// What a fetchToken action is for.
const FOR_CONNECT = "connect"; // the next connection attempt waits for it
const FOR_REFRESH = "refresh"; // the open connection's token runs out soon

/** Returned when there is nothing to do (never mutate it). */
export const NOTHING = Object.freeze([]);
export const PING = Object.freeze({ type: "ping" });
/** Deliver the message just given: it carries nothing, the host holds the frame. */
export const DELIVER = Object.freeze({ type: "deliver" });
/** What `ClientCore.message` returns for an in-order message (compare with ===). */
export const DELIVERED = Object.freeze([DELIVER]);

function positive(value) {
  return typeof value === "number" && Number.isFinite(value) && value > 0 ? value : null;
}

/** One publication the core holds until it is acknowledged or fails. */
export class Outgoing {
  constructor(topic, payload, idem, deadline) {
    this.topic = topic;
    this.payload = payload;
    this.idem = idem; // the same on every send
    this.deadline = deadline; // no retry at or after it
    /** @type {import("./fanroute.js").OutgoingState} */
    this.state = WAITING; // waiting (for a connection), pending (in flight), retry (at retryAt)
    /** @type {number | null} */
    this.request = null; // id of the send in flight
    this.attempts = 0; // sends so far
    this.tries = 0; // retryable answers so far (the backoff's attempt count)
    /** @type {number | null} */
    this.retryAt = null;
    /** @type {string | null} */
    this.code = null; // what left the outcome open last (null: nothing yet)
    this.message = "";
  }
}

/** One subscription's position and state. */
export class Stream {
  constructor(topic, last = null, presence = false) {
    this.topic = topic;
    this.last = last; // ask for the newest `last` messages (again on every resubscribe)
    this.presence = presence; // ask for pushed subscriber counts
    this.epoch = null; // null until the first `subscribed`
    this.seq = 0; // the last seq delivered (or where the stream started)
    /** @type {import("./fanroute.js").StreamState} */
    this.state = WAITING;
    this.request = null; // id of the subscribe in flight
    this.resuming = false; // that subscribe carries `since`
    this.confirmed = false;
    this.retryAt = null;
    this.tries = 0; // transient refusals since the last success
    this.duplicates = 0;
    this.gaps = 0;
    this.unrecovered = 0;
    this.subscribers = null; // the last presence count received
    // After a `subscribed` to which `last` applied: its seq, while the first message
    // may still start above `floor` (the history held fewer than `last`).
    this.window = null;
    this.floor = 0;
    this.windowMarks = false; // a shortfall in the window is a loss (a resubscribe)
  }

  /** The `since` cursor to resubscribe with, or null before the first answer. */
  since() {
    return this.epoch === null ? null : { epoch: this.epoch, seq: this.seq };
  }
}

/**
 * One client's connection and subscriptions as a state machine: the host calls one
 * method per event and carries out the actions returned, in order. Times are ms on
 * any monotonic clock (`now`); frames are decoded objects. The host calls `tick(now)`
 * at least every `checkPeriod` while a connection is opening or open, and
 * `connect(now)` once a `reconnect` action is due.
 *
 * Actions: `{type: "connect", url}`, `{type: "send", frame}`, `PING`, `DELIVER`,
 * `{type: "subscribed", topic, epoch, seq, recovered, resumed}`,
 * `{type: "unrecovered", topic, epoch, seq, previous}`,
 * `{type: "subscribeError", topic, code, message, retryAt}` (retryAt null: ended),
 * `{type: "ready", session}`, `{type: "answer", id, frame}`, `{type: "drop", code, reason}`
 * (close the socket, then report `closed(code)`), `{type: "reconnect", at, delay, code}`,
 * `{type: "stop", code, reason}`, `{type: "presence", topic, subscribers}`,
 * `{type: "fetchToken", reason}` (ask the token source, then call `giveToken` or
 * `tokenFailed`), `{type: "refreshed", expires}`, and for publications (`publish()`
 * returns the held Outgoing with the actions): `{type: "published", publication, seq}`,
 * `{type: "publishRetry", publication, code, message, retryAt}`,
 * `{type: "publishFailed", publication, code, message}`.
 *
 * The rules, case by case the same as fanroute.clientcore (see its docstring):
 * sequence (deliver the next seq, drop duplicates, repair a gap nobody announced with
 * `skipped` by unsubscribe + subscribe with since, ignore messages while a subscribe
 * is in flight); answers to subscribe (recovered:true continues, recovered:false after
 * since or an unsolicited `subscribed` is `unrecovered`); errors answering a subscribe
 * (transient codes retried after a full-jitter delay with since kept, any other code
 * ends the subscription, as does the server's unsolicited `unsubscribed`); latest
 * messages (`last`, asked again with every resubscribe; after an answer to which it
 * applies the stream stands at seq - last and may start higher, a loss marked exactly
 * on a resubscribe); presence counts; tokens (`fetchToken`: a token asked before every
 * attempt and refreshed at refreshDelay(ttl); a 4001 with TOKEN_EXPIRED_REASON
 * reconnects with a new one, any other 4001 stops); close codes (`reconnectDelay`); backoff reset after `backoffReset` ms from `connected`; the
 * heartbeat (dead after pingInterval + pingTimeout of silence from `connected`; a
 * tick more than pingInterval late with nothing of ours unanswered pings first);
 * publications (held with an idem key until answered for good; sent again with it on
 * every new connection and, after PUBLISH_RETRY_ERRORS, after a full-jitter delay per
 * publication; at most publishAttempts sends and no retry past the deadline, then the
 * last open code; any other code at once; stop fails them: closed, or the open code).
 */
export class ClientCore {
  constructor(urls, settings = {}, { random = Math.random, firstUrl = 0 } = {}) {
    if (urls.length === 0) throw new TypeError("a client needs at least one URL");
    this.urls = [...urls];
    this.settings = {
      minDelay: 50,
      maxDelay: 10000,
      backoffReset: 5000,
      pingInterval: null, // null: the gateway's (`connected`), else 25000
      pingTimeout: null, // null: the gateway's, else 8000
      appPing: null, // ms between app pings; null: pingInterval; 0: none
      connectTimeout: 5000, // from connect() to the `connected` frame
      restartWindow: RESTART_WINDOW,
      token: null,
      fetchToken: false, // the host has a token source: ask it before every attempt and before exp
      eager: false, // subscribe together with `connect` (anonymous gateways only)
      publishTimeout: 10000, // a publication's deadline, unless publish() is given one
      publishAttempts: 10, // sends of one publication at most, the first included
      idemPrefix: null, // keys are "<prefix>-<n>"; null: 16 random characters
      ...settings,
    };
    const s = this.settings;
    this.random = random;
    this.backoff = new Backoff({ minDelay: s.minDelay, maxDelay: s.maxDelay, resetAfter: s.backoffReset, random });
    this.streams = new Map();
    this.stats = { connects: 0, duplicates: 0, gaps: 0, unrecovered: 0, retries: 0 };
    /** @type {"idle" | "connecting" | "open" | "ready" | "stopped"} */
    this.phase = IDLE;
    this.url = null;
    this.session = null;
    this._nextUrl = firstUrl % this.urls.length;
    this._ids = 0;
    this._requests = new Map(); // our own commands in flight: id -> Stream, or null (ignore the answer)
    this._attemptAt = 0;
    this._readyAt = 0;
    this.lastRx = 0;
    this._lastPing = 0;
    this._lastTick = 0;
    this.interval = s.pingInterval || DEFAULT_PING_INTERVAL;
    this.timeout = s.pingTimeout || DEFAULT_PING_TIMEOUT;
    this._pingEvery = 0;
    this._due = Infinity; // no tick needs a full look before this
    this._late = Infinity; // a tick this long after the previous one means we were paused
    this.token = s.token ?? null; // what the next `connect` frame carries
    this._fetching = null; // a fetchToken out, and what for
    this._refreshAt = null; // when to ask for the next token
    this._refreshId = null; // the `refresh` command in flight
    this._tokenTries = 0; // failed refresh fetches in a row
    this._lead = Infinity; // how long before its exp the token is refreshed
    const prefix = s.idemPrefix ?? randomPrefix();
    if (typeof prefix !== "string" || prefix.length < 1 || prefix.length > IDEM_PREFIX_LENGTH) {
      throw new RangeError(`idemPrefix must be 1 to ${IDEM_PREFIX_LENGTH} characters`);
    }
    this.idemPrefix = prefix;
    this._idems = 0;
    /** Publications held until answered for good, in the order they were made.
     * @type {Set<Outgoing>} */
    this.publications = new Set();
    /** @type {Map<number, Outgoing>} */
    this._publishing = new Map(); // id of a publish in flight -> its publication
  }

  // --- what the host reads ---

  /** Silence after which the connection counts as dead: pingInterval + pingTimeout. */
  get deadline() {
    return this.interval + this.timeout;
  }

  /** How often the host should call tick() (a quarter of the tightest timer, a
   * token's refresh lead included). */
  get checkPeriod() {
    return Math.max(10, Math.min(this.interval, this.timeout, this.settings.connectTimeout, this._lead) / 4);
  }

  position(topic) {
    return this.streams.get(topic)?.since() ?? null;
  }

  /** An id for a command of the host's own (a presence query): never one the core uses. */
  nextId() {
    this._ids += 1;
    return this._ids;
  }

  /** A fresh idem key: `<prefix>-<n>`. */
  nextIdem() {
    this._idems += 1;
    return `${this.idemPrefix}-${this._idems}`;
  }

  // --- the page's side ---

  subscribe(topic, last = null, presence = false) {
    if (this.streams.has(topic)) return NOTHING;
    if (last !== null && last !== undefined && !(Number.isInteger(last) && last >= 1)) {
      throw new RangeError("last must be an integer of at least 1");
    }
    const s = new Stream(topic, last ?? null, !!presence);
    this.streams.set(topic, s);
    return this._canSend() ? [this._subscribe(s)] : NOTHING;
  }

  unsubscribe(topic) {
    if (!this.streams.delete(topic) || !this._canSend()) return NOTHING;
    return [{ type: "send", frame: { type: "unsubscribe", topic, id: this.nextId() } }];
  }

  /** Hold a publication until it is acknowledged; sent at once when a connection is
   * ready. `idem`: the caller's key (1 to 64 characters), else a fresh one; `timeout`:
   * ms until its deadline (publishTimeout). Returns the held Outgoing (the actions
   * about it carry it) and the actions.
   * @returns {{ publication: Outgoing, actions: readonly Action[] }} */
  publish(topic, payload, now, idem = null, timeout = null) {
    if (idem === null || idem === undefined) {
      idem = this.nextIdem();
    } else if (typeof idem !== "string" || idem.length < 1 || idem.length > MAX_IDEM_LENGTH) {
      throw new RangeError(`idem must be a string of 1 to ${MAX_IDEM_LENGTH} characters`);
    }
    const pub = new Outgoing(topic, payload, idem, now + (timeout ?? this.settings.publishTimeout));
    this.publications.add(pub);
    return { publication: pub, actions: this._canSend() ? [this._sendPublication(pub, now)] : NOTHING };
  }

  /** The host gives up on `publication` (its deadline passed, or its caller went away):
   * it is not sent again. A publishFailed with what was learnt last ("timeout" if
   * nothing), or nothing if it was already settled.
   * @returns {readonly Action[]} */
  abandon(publication) {
    if (!this.publications.has(publication)) return NOTHING;
    return [this._failPublication(publication, publication.code ?? TIMEOUT, publication.message || "no answer in time")];
  }

  start(now) {
    if (this.phase !== IDLE && this.phase !== STOPPED) return NOTHING;
    this.backoff.reset();
    this.phase = IDLE;
    return this.connect(now);
  }

  /** No more reconnecting; positions are kept. The publications held fail.
   * @returns {readonly Action[]} */
  stop() {
    this._loseConnection();
    this.phase = STOPPED;
    return this._failPublications("the client was closed");
  }

  // --- the connection ---

  connect(now) {
    if (this.phase !== IDLE) return NOTHING;
    this.phase = CONNECTING;
    this._attemptAt = this._lastTick = now;
    this._due = now + this.settings.connectTimeout;
    if (this.settings.fetchToken) {
      this._fetching = FOR_CONNECT; // the connect timeout covers the token source too
      return [{ type: "fetchToken", reason: FOR_CONNECT }];
    }
    return [this._connectUrl()];
  }

  /** @returns {Action} */
  _connectUrl() {
    this.url = this.urls[this._nextUrl];
    this._nextUrl = (this._nextUrl + 1) % this.urls.length;
    return { type: "connect", url: this.url };
  }

  /** The token source answered a fetchToken: `token`, which expires in `ttl` ms (null:
   * unknown, never refreshed), or null/"": no token can be had, the client stops. */
  giveToken(token, now, ttl = null) {
    const reason = this._fetching;
    this._fetching = null;
    if (reason === null) return NOTHING; // stale: the attempt timed out or the client stopped
    if (token === null || token === undefined || token === "") {
      const why = "the token source gave no token";
      if (reason === FOR_REFRESH && this.phase === READY) return [{ type: "drop", code: CLOSE_UNAUTHORIZED, reason: why }];
      this._loseConnection();
      this.phase = STOPPED;
      return [...this._failPublications(why), { type: "stop", code: CLOSE_UNAUTHORIZED, reason: why }];
    }
    this.token = token;
    this._tokenTries = 0;
    this._refreshAt = ttl === null || ttl === undefined ? null : now + refreshDelay(ttl);
    if (ttl !== null && ttl !== undefined) this._lead = Math.max(ttl - refreshDelay(ttl), 10);
    if (reason === FOR_CONNECT) return this.phase === CONNECTING ? [this._connectUrl()] : NOTHING;
    if (this.phase !== READY) return NOTHING; // the connection went meanwhile; the next attempt fetches anew
    this._reschedule();
    this._refreshId = this.nextId();
    return [{ type: "send", frame: { type: "refresh", token, id: this._refreshId } }];
  }

  /** The token source failed (threw): try again after a backoff delay. */
  tokenFailed(now, reason = "") {
    const kind = this._fetching;
    this._fetching = null;
    if (kind === FOR_CONNECT && this.phase === CONNECTING) return this.closed(null, now, reason || "the token source failed");
    if (kind === FOR_REFRESH && this.phase === READY) this._retryRefresh(now);
    return NOTHING;
  }

  _retryRefresh(now) {
    const cap = this.backoff.cap(this._tokenTries);
    this._tokenTries += 1;
    this._refreshAt = now + Math.max(this.settings.minDelay, uniform(this.random, 0, cap));
    this._reschedule();
  }

  opened(now) {
    if (this.phase !== CONNECTING) return NOTHING;
    this.phase = OPEN;
    const hello = { type: "connect", id: CONNECT_ID };
    if (this.token !== null && this.token !== undefined) hello.token = this.token;
    /** @type {Action[]} */
    const out = [{ type: "send", frame: hello }];
    if (this.settings.eager) out.push(...this._subscribeAll(), ...this._sendPublications(now));
    return out;
  }

  closed(code, now, reason = "") {
    if (this.phase === IDLE || this.phase === STOPPED) return NOTHING;
    if (this.phase === READY) this.backoff.connectionLasted(now - this._readyAt);
    this._loseConnection();
    const delay = code === CLOSE_UNAUTHORIZED && reason === TOKEN_EXPIRED_REASON && this.settings.fetchToken
      ? this.backoff.next() // a new token will do: back soon
      : reconnectDelay(code, this.backoff, this.random, this.settings.restartWindow);
    if (delay === null) {
      this.phase = STOPPED;
      return [...this._failPublications(reason || `closed with ${code}`), { type: "stop", code, reason }];
    }
    this.phase = IDLE;
    return [{ type: "reconnect", at: now + delay, delay, code }];
  }

  heard(now) {
    this.lastRx = now;
  }

  tick(now) {
    const previous = this._lastTick;
    this._lastTick = now;
    if (now < this._due && now - previous <= this._late) return NOTHING;
    return this._timers(now, now - previous > this._late);
  }

  // --- frames from the gateway ---

  message(topic, seq, skipped = 0) {
    const s = this.streams.get(topic);
    if (s === undefined || s.state !== ACTIVE || !Number.isInteger(seq)) return NOTHING;
    const last = s.seq;
    if (seq <= last) {
      s.duplicates += 1;
      this.stats.duplicates += 1;
      return NOTHING;
    }
    if (seq !== last + 1 && (!Number.isInteger(skipped) || seq - skipped > last + 1)) {
      if (s.window !== null && last === s.floor && seq <= s.window + 1) return this._windowStart(s, seq);
      // A gap nobody announced: ask again from the last message we have.
      s.gaps += 1;
      this.stats.gaps += 1;
      return [{ type: "send", frame: { type: "unsubscribe", topic, id: this._own(null) } }, this._subscribe(s)];
    }
    s.seq = seq;
    return DELIVERED;
  }

  received(frame, now) {
    this.lastRx = now;
    const kind = frame.type;
    if (kind === undefined || kind === null || kind === "message") {
      if (typeof frame.topic !== "string") return NOTHING;
      return this.message(frame.topic, frame.seq, frame.skipped ?? 0);
    }
    if (kind === "pong") return NOTHING;
    const id = Number.isInteger(frame.id) ? frame.id : null;
    if (kind === "connected") return this._onConnected(frame, now);
    if (kind === "subscribed") return this._onSubscribed(frame, id);
    if (kind === "unsubscribed") return this._onUnsubscribed(frame, id);
    if (kind === "published" && id !== null && this._publishing.has(id)) return this._onPublished(frame, id);
    if (kind === "error") return this._onError(frame, id, now);
    if (kind === "presence" && id === null) return this._onPresence(frame);
    if (kind === "refreshed" && id !== null && id === this._refreshId) {
      this._refreshId = null;
      const expires = typeof frame.expires === "number" && Number.isFinite(frame.expires) ? frame.expires : null;
      return [{ type: "refreshed", expires }];
    }
    return id !== null ? [{ type: "answer", id, frame }] : NOTHING;
  }

  // --- inside ---

  _canSend() {
    return this.phase === READY || (this.phase === OPEN && this.settings.eager);
  }

  _own(stream) {
    const id = this.nextId();
    this._requests.set(id, stream);
    return id;
  }

  /** @returns {Action} */
  _subscribe(s) {
    const id = this._own(s);
    s.request = id;
    s.state = PENDING;
    s.retryAt = null;
    s.window = null;
    const frame = { type: "subscribe", topic: s.topic, id };
    s.resuming = s.epoch !== null;
    if (s.resuming) frame.since = { epoch: s.epoch, seq: s.seq };
    if (s.last !== null) frame.last = s.last; // with since: applies only if recovery fails
    if (s.presence) frame.presence = true;
    return { type: "send", frame };
  }

  _subscribeAll() {
    const out = [];
    for (const s of this.streams.values()) if (s.state === WAITING) out.push(this._subscribe(s));
    return out;
  }

  _loseConnection() {
    this._requests.clear();
    for (const s of this.streams.values()) {
      s.state = WAITING;
      s.request = null;
      s.resuming = false;
      s.retryAt = null;
    }
    this._publishing.clear();
    for (const pub of this.publications) {
      if (pub.state === PENDING) { // it may have been applied: the retry says
        pub.code = DISCONNECTED;
        pub.message = "the connection was lost before the answer; it may have been applied";
      }
      pub.state = WAITING;
      pub.request = null;
      pub.retryAt = null;
    }
    this.session = null;
    this._due = this._late = Infinity;
    this._fetching = this._refreshAt = this._refreshId = null;
  }

  _onConnected(frame, now) {
    if (this.phase !== OPEN) return NOTHING;
    const s = this.settings;
    this.phase = READY;
    this.session = typeof frame.session === "string" ? frame.session : null;
    const fromFrame = (v) => (positive(v) === null ? null : v * 1000);
    this.interval = s.pingInterval || fromFrame(frame.ping_interval) || DEFAULT_PING_INTERVAL;
    this.timeout = s.pingTimeout || fromFrame(frame.ping_timeout) || DEFAULT_PING_TIMEOUT;
    this._pingEvery = s.appPing === null || s.appPing === undefined ? this.interval : s.appPing;
    this._readyAt = this.lastRx = this._lastPing = this._lastTick = now;
    this._late = this.interval;
    this.stats.connects += 1;
    /** @type {Action[]} */
    const out = [{ type: "ready", session: this.session }];
    if (!s.eager) out.push(...this._subscribeAll(), ...this._sendPublications(now));
    this._reschedule();
    return out;
  }

  _onSubscribed(frame, id) {
    const { epoch, seq } = frame;
    const recovered = frame.recovered === true;
    if (typeof epoch !== "string" || !Number.isInteger(seq)) return NOTHING;
    if (id === null) {
      // Unsolicited: the stream restarted. While our own subscribe is in flight,
      // its answer will say where the stream stands.
      const s = this.streams.get(frame.topic);
      if (s === undefined || s.state !== ACTIVE) return NOTHING;
      return [this._unrecovered(s, epoch, seq)];
    }
    const s = this._requests.get(id) ?? null;
    this._requests.delete(id);
    if (s === null || this.streams.get(s.topic) !== s || s.request !== id) return NOTHING; // stale
    const resumed = s.resuming;
    s.state = ACTIVE;
    s.request = null;
    s.resuming = false;
    s.tries = 0;
    s.confirmed = true;
    /** @type {Action[]} */
    const out = [{ type: "subscribed", topic: s.topic, epoch, seq, recovered, resumed }];
    if (resumed && recovered) {
      s.epoch = epoch; // the missed messages follow, from s.seq + 1
    } else if (s.last !== null) {
      this._openWindow(s, epoch, seq, resumed, out);
    } else if (resumed) {
      out.push(this._unrecovered(s, epoch, seq));
    } else {
      s.epoch = epoch;
      s.seq = seq;
    }
    return out;
  }

  /** `last` applies: the newest messages up to `seq` follow, oldest first. */
  _openWindow(s, epoch, seq, resumed, out) {
    let floor = Math.max(seq - s.last, 0);
    if (resumed && s.epoch === epoch) floor = Math.min(Math.max(floor, s.seq), seq); // what we have is not asked again
    if (!resumed) {
      s.epoch = epoch;
      s.seq = floor;
    } else if (s.epoch !== epoch || floor > s.seq) {
      out.push(this._unrecovered(s, epoch, floor));
    }
    s.window = seq;
    s.floor = floor;
    s.windowMarks = resumed;
  }

  /** The first message after a `last` answer starts above the floor: the history held
   * fewer messages. On a resubscribe the ones in between are lost. */
  _windowStart(s, seq) {
    s.window = null;
    if (!s.windowMarks) {
      s.seq = seq;
      return DELIVERED;
    }
    const lost = this._unrecovered(s, s.epoch, seq - 1);
    s.seq = seq;
    return [lost, DELIVER];
  }

  _onPresence(frame) {
    const count = frame.subscribers;
    const s = this.streams.get(frame.topic);
    if (s === undefined || !Number.isInteger(count) || count < 0) return NOTHING;
    s.subscribers = count;
    return [{ type: "presence", topic: s.topic, subscribers: count }];
  }

  /** @returns {Action} */
  _unrecovered(s, epoch, seq) {
    const previous = s.since();
    s.epoch = epoch;
    s.seq = seq;
    s.unrecovered += 1;
    this.stats.unrecovered += 1;
    return { type: "unrecovered", topic: s.topic, epoch, seq, previous };
  }

  _onUnsubscribed(frame, id) {
    if (id !== null) {
      if (this._requests.has(id)) {
        this._requests.delete(id); // the first half of a gap repair
        return NOTHING;
      }
      return [{ type: "answer", id, frame }];
    }
    // Unsolicited: the server withdrew the subscription; resubscribing would be refused.
    const s = this.streams.get(frame.topic);
    if (s === undefined) return NOTHING;
    this.streams.delete(s.topic);
    return [{ type: "subscribeError", topic: s.topic, code: "unsubscribed", message: "the server ended the subscription", retryAt: null }];
  }

  _onError(frame, id, now) {
    const code = String(frame.code ?? "error");
    const message = String(frame.message ?? "");
    if (id === CONNECT_ID && this.phase === OPEN) {
      if (code === "unauthorized") return [{ type: "drop", code: CLOSE_UNAUTHORIZED, reason: message }];
      return [{ type: "answer", id, frame }];
    }
    if (id !== null && id === this._refreshId) {
      this._refreshId = null;
      // A refused new token is final (the gateway closes with 4001 too).
      if (code === "unauthorized") return [{ type: "drop", code: CLOSE_UNAUTHORIZED, reason: `token refused: ${message}` }];
      this._retryRefresh(now); // a limit, say: ask again a little later
      return NOTHING;
    }
    if (id !== null && this._publishing.has(id)) {
      const pub = /** @type {Outgoing} */ (this._publishing.get(id));
      this._publishing.delete(id);
      return this._publishRefused(pub, id, code, message, now);
    }
    if (id === null || !this._requests.has(id)) return [{ type: "answer", id, frame }];
    const s = this._requests.get(id);
    this._requests.delete(id);
    if (s === null || this.streams.get(s.topic) !== s || s.request !== id) return NOTHING;
    return [this._refused(s, code, message, now)];
  }

  /** @returns {Action} */
  _refused(s, code, message, now) {
    s.request = null;
    s.resuming = false;
    if (TRANSIENT_ERRORS.has(code)) {
      const delay = Math.max(this.settings.minDelay, uniform(this.random, 0, this.backoff.cap(s.tries)));
      s.tries += 1;
      s.state = RETRY;
      s.retryAt = now + delay;
      this._due = Math.min(this._due, s.retryAt);
      return { type: "subscribeError", topic: s.topic, code, message, retryAt: s.retryAt };
    }
    this.streams.delete(s.topic);
    return { type: "subscribeError", topic: s.topic, code, message, retryAt: null };
  }

  // --- publications ---

  /** Send `pub` (again, with its key and a new id), or fail it: out of budget.
   * @returns {Action} */
  _sendPublication(pub, now) {
    if (pub.attempts >= this.settings.publishAttempts || now >= pub.deadline) {
      return this._failPublication(pub, pub.code ?? TIMEOUT, pub.message || "no answer in time");
    }
    if (pub.attempts > 0) this.stats.retries += 1;
    pub.attempts += 1;
    const id = this.nextId();
    pub.request = id;
    pub.state = PENDING;
    pub.retryAt = null;
    this._publishing.set(id, pub);
    return { type: "send", frame: { type: "publish", topic: pub.topic, payload: pub.payload, id, idem: pub.idem } };
  }

  /** A new connection: every publication held goes out (again), oldest first. */
  _sendPublications(now) {
    const out = [];
    for (const pub of [...this.publications]) if (pub.state === WAITING) out.push(this._sendPublication(pub, now));
    return out;
  }

  /** @returns {Action} */
  _failPublication(pub, code, message) {
    this.publications.delete(pub);
    pub.state = WAITING;
    pub.request = null;
    pub.retryAt = null;
    return { type: "publishFailed", publication: pub, code, message };
  }

  /** The client stops: what was never sent was not applied; the rest may have been. */
  _failPublications(why) {
    return [...this.publications].map((pub) => this._failPublication(pub, pub.code ?? CLOSED, why));
  }

  _onPublished(frame, id) {
    const pub = /** @type {Outgoing} */ (this._publishing.get(id));
    this._publishing.delete(id);
    if (!this.publications.has(pub) || pub.request !== id) return NOTHING; // abandoned meanwhile
    this.publications.delete(pub);
    pub.state = WAITING;
    pub.request = null;
    return [{ type: "published", publication: pub, seq: frame.seq }];
  }

  /** A publish was answered with an error: send it again later, or fail it.
   * @returns {readonly Action[]} */
  _publishRefused(pub, id, code, message, now) {
    if (!this.publications.has(pub) || pub.request !== id) return NOTHING; // abandoned meanwhile
    pub.request = null;
    if (PUBLISH_RETRY_ERRORS.has(code)) {
      pub.code = code;
      pub.message = message;
      if (pub.attempts < this.settings.publishAttempts) {
        const at = now + Math.max(this.settings.minDelay, uniform(this.random, 0, this.backoff.cap(pub.tries)));
        if (at < pub.deadline) {
          pub.tries += 1;
          pub.state = RETRY;
          pub.retryAt = at;
          this._due = Math.min(this._due, at);
          return [{ type: "publishRetry", publication: pub, code, message, retryAt: at }];
        }
      }
    }
    return [this._failPublication(pub, code, message)];
  }

  _timers(now, late) {
    if (this.phase === CONNECTING || this.phase === OPEN) {
      if (now - this._attemptAt > this.settings.connectTimeout) {
        this._due = Infinity;
        this._fetching = null; // a token that comes now is for an attempt given up
        return [{ type: "drop", code: null, reason: "connect timeout" }];
      }
      return NOTHING;
    }
    if (this.phase !== READY) {
      this._due = Infinity;
      return NOTHING;
    }
    if (this._refreshAt !== null && this._refreshAt <= now && this._fetching === null) {
      this._refreshAt = null;
      this._fetching = FOR_REFRESH;
      this._reschedule();
      return [{ type: "fetchToken", reason: FOR_REFRESH }, ...this._timers(now, late)];
    }
    const grace = late && this._lastPing <= this.lastRx;
    if (grace) {
      // We were paused, with nothing of ours unanswered: our pause is not the
      // gateway's silence. Ping now and give it pingTimeout to answer.
      this.lastRx = Math.max(this.lastRx, now - this.interval);
    }
    if (now - this.lastRx > this.deadline) {
      this._due = this._late = Infinity; // once: the host closes, then reports closed()
      return [{ type: "drop", code: CLOSE_HEARTBEAT_TIMEOUT, reason: "heartbeat timeout" }];
    }
    const out = [];
    if (this._pingEvery && (grace || now - this._lastPing >= this._pingEvery)) {
      this._lastPing = now;
      out.push(PING);
    }
    for (const s of this.streams.values()) {
      if (s.state === RETRY && s.retryAt !== null && s.retryAt <= now) out.push(this._subscribe(s));
    }
    for (const pub of [...this.publications]) {
      if (pub.state === RETRY && pub.retryAt !== null && pub.retryAt <= now) out.push(this._sendPublication(pub, now));
    }
    this._reschedule();
    return out;
  }

  _reschedule() {
    let due = this.lastRx + this.deadline;
    if (this._pingEvery) due = Math.min(due, this._lastPing + this._pingEvery);
    for (const s of this.streams.values()) if (s.retryAt !== null) due = Math.min(due, s.retryAt);
    for (const pub of this.publications) if (pub.retryAt !== null) due = Math.min(due, pub.retryAt);
    if (this._refreshAt !== null) due = Math.min(due, this._refreshAt);
    this._due = due;
  }
}

// --- Errors -------------------------------------------------------------------------

/** An `error` frame from the gateway, or a request that could not complete. */
export class FanrouteError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.name = "FanrouteError";
    this.code = code;
    this.reason = message;
  }
}

// --- The client ---------------------------------------------------------------------

function reportError(err) {
  // A throwing handler must not break the client; the page still sees the error.
  if (typeof globalThis.reportError === "function") globalThis.reportError(err);
  else setTimeout(() => { throw err; }, 0);
}

/** A tiny event emitter: listeners that throw are reported, never break the client. */
class Emitter {
  constructor() {
    this._handlers = new Map(); // event -> Set<fn>
  }

  /** Listen to an event; returns a function that stops listening. */
  on(event, fn) {
    let set = this._handlers.get(event);
    if (!set) this._handlers.set(event, (set = new Set()));
    set.add(fn);
    return () => this.off(event, fn);
  }

  off(event, fn) {
    this._handlers.get(event)?.delete(fn);
  }

  _emit(event, detail) {
    const set = this._handlers.get(event);
    if (!set || set.size === 0) return;
    for (const fn of [...set]) {
      try {
        fn(detail);
      } catch (err) {
        reportError(err);
      }
    }
  }
}

/**
 * One topic's subscription, with the states centrifuge-js users know:
 * "unsubscribed" → "subscribing" → "subscribed", and back to "subscribing" whenever
 * the connection is lost or a gap is being repaired (messages wait for the answer).
 * A token refresh does not touch it. Events: `state` {state, previous}, `subscribing`
 * {code, reason}, `subscribed` {epoch, seq, recovered, resumed}, `unsubscribed`
 * {code, reason}, `publication` {topic, seq, payload, skipped?}, `presence`
 * {topic, subscribers}, `unrecovered`, `error`.
 */
export class Subscription extends Emitter {
  constructor(client, topic, { last = null, presence = false } = {}) {
    super();
    if (last !== null && last !== undefined && !(Number.isInteger(last) && last >= 1)) {
      throw new RangeError("last must be an integer of at least 1");
    }
    this.client = client;
    this.topic = topic;
    this.last = last ?? null;
    this.presence = !!presence;
    /** @type {import("./fanroute.js").SubscriptionState} */
    this.state = "unsubscribed";
    /** The last subscriber count pushed (with `presence: true`), or null. */
    this.subscribers = null;
    this._boxes = new Set(); // handlers added by client.subscribe(topic, handler)
  }

  /** Where the page stands in the topic: `{epoch, seq}`, or null. */
  get position() {
    return this.client.position(this.topic);
  }

  /** Start (or keep) the subscription; it is sent once a connection is ready. */
  subscribe() {
    this.client._startSubscription(this);
  }

  /** End it: the handlers hear nothing more until subscribe() is called again. */
  unsubscribe() {
    this.client._stopSubscription(this, "unsubscribe called");
  }

  _setState(state, detail) {
    if (state === this.state) return;
    const previous = this.state;
    this.state = state;
    this._emit("state", { state, previous });
    this._emit(state, { topic: this.topic, ...detail });
  }
}

export class FanrouteClient extends Emitter {
  /**
   * @param urls one WebSocket URL or a list of them (one per gateway)
   * @param options see fanroute.d.ts (times in milliseconds)
   */
  constructor(urls, options = {}) {
    super();
    this.urls = typeof urls === "string" ? [urls] : [...urls];
    if (this.urls.length === 0) throw new TypeError("FanrouteClient needs at least one URL");
    if (options.getToken !== undefined && typeof options.getToken !== "function") {
      throw new TypeError("getToken must be a function");
    }
    const random = options.random ?? Math.random;
    this.options = {
      token: options.token ?? null,
      getToken: options.getToken ?? null,
      pingInterval: options.pingInterval ?? null,
      pingTimeout: options.pingTimeout ?? null,
      connectTimeout: options.connectTimeout ?? 10000,
      publishTimeout: options.publishTimeout ?? 10000,
      WebSocket: options.WebSocket ?? globalThis.WebSocket,
      random,
    };
    const first = Math.floor(random() * this.urls.length) % this.urls.length;
    this._core = new ClientCore(this.urls, {
      minDelay: options.minDelay ?? 100,
      maxDelay: options.maxDelay ?? 10000,
      backoffReset: options.resetAfter ?? 5000,
      pingInterval: this.options.pingInterval,
      pingTimeout: this.options.pingTimeout,
      connectTimeout: this.options.connectTimeout,
      fetchToken: this.options.getToken !== null,
    }, { random, firstUrl: first });
    this.backoff = this._core.backoff;
    /** @type {import("./fanroute.js").State} */
    this.state = "disconnected";
    this.url = null; // the gateway currently connected to
    this.session = null;
    this.lastClose = null; // {code, reason} of the last connection that ended
    this._attempt = 0;
    this._ws = null;
    this._wsUrl = null;
    this._subs = new Map(); // topic -> Subscription
    this._requests = new Map(); // id -> presence query waiting for its answer
    this._publications = new Map(); // Outgoing -> the publish() waiting for it
    this._queue = []; // requests waiting for a connection
    this._timers = { reconnect: null, tick: null };
    this._stopped = true;
    this._tokenCalls = 0; // a token that arrives after close() or a newer call is dropped
  }

  /** Counts so far: connects, duplicates dropped, gaps repaired, unrecovered. */
  get stats() {
    return this._core.stats;
  }

  _setState(state) {
    if (state === this.state) return;
    const previous = this.state;
    this.state = state;
    this._emit("state", { state, previous });
  }

  // --- the page's side -----------------------------------------------------------

  /** Start connecting (and keep reconnecting until close() or a terminal code). */
  connect() {
    if (!this._stopped) return;
    this._stopped = false;
    this._apply(this._core.start(Date.now()));
  }

  /** Close the connection and stop reconnecting. Subscriptions are kept: a later
   * connect() resumes them from where they stood. */
  close(code = CLOSE_NORMAL, reason = "client closed") {
    if (this._stopped && this._ws === null) return;
    this._stopped = true;
    this._tokenCalls += 1;
    const failed = this._core.stop();
    const ws = this._ws;
    this._detach();
    if (ws !== null) {
      try {
        ws.close(code, reason);
      } catch {
        /* already closing */
      }
    }
    this._apply(failed); // the publications held: rejected
    this._ended(code, reason, "closed");
  }

  /**
   * The subscription to `topic` (created, in state "unsubscribed", if there is none):
   * call its subscribe(). Options: `last` (begin with the topic's newest `last`
   * messages, and get them again when a reconnect cannot recover), `presence`
   * (pushed subscriber counts). A topic has one subscription: the options of the
   * first call stay.
   */
  newSubscription(topic, options = {}) {
    if (!isValidTopic(topic)) {
      throw new FanrouteError("bad_request", `invalid topic ${JSON.stringify(topic)}`);
    }
    let sub = this._subs.get(topic);
    if (!sub) {
      sub = new Subscription(this, topic, options);
      this._subs.set(topic, sub);
    }
    return sub;
  }

  /** The subscription to `topic`, or null. */
  getSubscription(topic) {
    return this._subs.get(topic) ?? null;
  }

  /**
   * Subscribe `handler` to `topic`; returns a function that unsubscribes it.
   * Handlers of one topic share one subscription on the wire; the last one removed
   * ends it. `options` as for newSubscription().
   */
  subscribe(topic, handler, options = {}) {
    if (typeof handler !== "function") throw new TypeError("subscribe needs a handler function");
    const sub = this.newSubscription(topic, options);
    // Wrap so the same function can be subscribed twice and removed once.
    const box = { handler };
    sub._boxes.add(box);
    sub.subscribe();
    return () => {
      if (!sub._boxes.delete(box) || sub._boxes.size > 0) return;
      if (this._subs.get(topic) === sub) sub.unsubscribe();
    };
  }

  /** The position the page reached in `topic`: `{epoch, seq}`, or null. */
  position(topic) {
    return this._core.position(topic);
  }

  /** The topics subscribed to (or being subscribed). */
  get topics() {
    return [...this._subs.values()].filter((s) => s.state !== "unsubscribed").map((s) => s.topic);
  }

  /**
   * Publish `payload` to `topic`; resolves to the seq the cluster gave it, once
   * acknowledged, through retries. The publication carries an `idem` key (`idem`, 1
   * to 64 characters, or one unique to this client) and is sent again with it when
   * its outcome is open: on the next connection if the connection drops before the
   * answer, after a backoff delay if it is answered unavailable, outcome_unknown or
   * internal. The cluster applies it once, and a retry gets the original seq. Waits
   * for a connection; after `timeout` (publishTimeout) or 10 sends it rejects with what
   * it learnt last ("disconnected": sent, no answer came, it may have been applied;
   * "timeout": nothing learnt). Any other error answer rejects at once.
   * @param {string} topic
   * @param {unknown} payload
   * @param {PublishOptions} [options]
   * @returns {Promise<number>}
   */
  publish(topic, payload, { timeout, idem } = {}) {
    if (payload === undefined) return Promise.reject(new FanrouteError("bad_request", "publish needs a payload"));
    if (!isValidTopic(topic)) return Promise.reject(new FanrouteError("bad_request", `invalid topic ${JSON.stringify(topic)}`));
    if (this._stopped && this.state === "disconnected") {
      return Promise.reject(new FanrouteError("closed", "the client is not connecting (call connect())"));
    }
    const wait = timeout ?? this.options.publishTimeout;
    let held;
    try {
      held = this._core.publish(topic, payload, Date.now(), idem ?? null, wait);
    } catch (err) {
      return Promise.reject(new FanrouteError("bad_request", String(err?.message ?? err)));
    }
    const { publication, actions } = held;
    return new Promise((resolve, reject) => {
      // The deadline is the core's too; this timer is what ends a wait while no
      // connection is up (the core is told nothing then).
      const timer = setTimeout(() => this._apply(this._core.abandon(publication)), wait);
      this._publications.set(publication, { resolve, reject, timer });
      this._apply(actions);
    });
  }

  /** How many connections are subscribed to `topic` across the cluster (needs the
   * right to subscribe to it). Waits for a connection like publish().
   * @param {string} topic
   * @param {RequestOptions} [options]
   * @returns {Promise<number>}
   */
  presenceCount(topic, { timeout } = {}) {
    return this._request({ type: "presence", topic }, (msg) => msg.subscribers, timeout);
  }

  _request(frame, answer, timeout) {
    return new Promise((resolve, reject) => {
      if (!isValidTopic(frame.topic)) {
        reject(new FanrouteError("bad_request", `invalid topic ${JSON.stringify(frame.topic)}`));
        return;
      }
      if (this._stopped && this.state === "disconnected") {
        reject(new FanrouteError("closed", "the client is not connecting (call connect())"));
        return;
      }
      const item = { frame, answer, resolve, reject, timer: null, id: null };
      item.timer = setTimeout(() => {
        this._forget(item);
        reject(new FanrouteError("timeout", `no answer to ${frame.type} on ${frame.topic}`));
      }, timeout ?? this.options.publishTimeout);
      if (this.state === "connected") this._sendRequest(item);
      else this._queue.push(item);
    });
  }

  // --- subscriptions ----------------------------------------------------------------

  _startSubscription(sub) {
    if (this._subs.get(sub.topic) !== sub) this._subs.set(sub.topic, sub);
    if (this._core.streams.has(sub.topic)) return;
    sub._setState("subscribing", { code: null, reason: "subscribe called" });
    this._apply(this._core.subscribe(sub.topic, sub.last, sub.presence));
  }

  _stopSubscription(sub, reason, code = null) {
    if (this._subs.get(sub.topic) === sub) this._subs.delete(sub.topic);
    this._apply(this._core.unsubscribe(sub.topic));
    sub._setState("unsubscribed", { code, reason });
  }

  /** Every subscription waits for the next connection (kept for resubscribing). */
  _subscriptionsWait(code, reason) {
    for (const sub of this._subs.values()) {
      if (sub.state === "subscribed") sub._setState("subscribing", { code, reason });
    }
  }

  // --- the core's actions ----------------------------------------------------------

  /** Carry out what the core asked for, in order (`frame`: the frame that caused them). */
  _apply(actions, frame) {
    for (const a of actions) {
      switch (a.type) {
        case "deliver":
          this._deliver(frame);
          break;
        case "send":
          this._send(a.frame);
          if (a.frame.type === "subscribe") {
            this._subs.get(a.frame.topic)?._setState("subscribing", { code: null, reason: "resubscribing" });
          }
          break;
        case "ping":
          this._send({ type: "ping", ts: Date.now() });
          break;
        case "connect":
          this._open(a.url);
          break;
        case "fetchToken":
          this._fetchToken(a.reason);
          break;
        case "ready":
          this._onReady(a);
          break;
        case "subscribed": {
          const detail = { topic: a.topic, epoch: a.epoch, seq: a.seq, recovered: a.recovered, resumed: a.resumed };
          this._subs.get(a.topic)?._setState("subscribed", detail);
          this._emit("subscribed", detail);
          break;
        }
        case "unrecovered": {
          const detail = { topic: a.topic, epoch: a.epoch, seq: a.seq, previous: a.previous };
          this._subs.get(a.topic)?._emit("unrecovered", detail);
          this._emit("unrecovered", detail);
          break;
        }
        case "presence": {
          const sub = this._subs.get(a.topic);
          const detail = { topic: a.topic, subscribers: a.subscribers };
          if (sub) {
            sub.subscribers = a.subscribers;
            sub._emit("presence", detail);
          }
          this._emit("presence", detail);
          break;
        }
        case "subscribeError": {
          const final = a.retryAt === null;
          const detail = { topic: a.topic, code: a.code, message: a.message, final, retryIn: final ? null : a.retryAt - Date.now() };
          const sub = this._subs.get(a.topic);
          if (sub) {
            sub._emit("error", detail);
            if (final) {
              this._subs.delete(a.topic); // ended: its handlers hear nothing more
              sub._setState("unsubscribed", { code: a.code, reason: a.message });
            } else {
              sub._setState("subscribing", { code: a.code, reason: a.message });
            }
          }
          this._emit("error", detail);
          break;
        }
        case "refreshed":
          this._emit("refreshed", { expires: a.expires });
          break;
        case "answer":
          this._onAnswer(a);
          break;
        case "published":
        case "publishFailed": {
          const item = this._publications.get(a.publication);
          if (item === undefined) break;
          this._publications.delete(a.publication);
          clearTimeout(item.timer);
          if (a.type === "published") item.resolve(a.seq);
          else item.reject(new FanrouteError(a.code, a.message));
          break;
        }
        case "publishRetry":
          break; // the core sends it again at retryAt (or on the next connection)
        case "drop":
          if (a.code === CLOSE_UNAUTHORIZED) this._emit("error", { code: "unauthorized", message: a.reason });
          this._drop(a.code, a.reason);
          return;
        case "reconnect":
        case "stop":
          // From closed(), tokenFailed() or giveToken(): the connection (or attempt) is over.
          this._afterClose([a], a.code ?? CLOSE_ABNORMAL, a.reason ?? "", null);
          return;
      }
    }
  }

  _deliver(frame) {
    const sub = this._subs.get(frame.topic);
    if (!sub) return;
    const ctx = { topic: frame.topic, seq: frame.seq };
    if (Number.isInteger(frame.skipped) && frame.skipped > 0) ctx.skipped = frame.skipped;
    for (const box of [...sub._boxes]) {
      try {
        box.handler(frame.payload, ctx);
      } catch (err) {
        reportError(err);
      }
    }
    sub._emit("publication", { ...ctx, payload: frame.payload });
  }

  _onReady(a) {
    this.url = this._wsUrl;
    this.session = a.session;
    this._attempt = 0;
    this._startTicker(); // the gateway's ping settings change the period
    this._setState("connected");
    for (const item of this._queue.splice(0)) this._sendRequest(item);
    this._emit("connected", { url: this.url, session: this.session });
  }

  _onAnswer(a) {
    const msg = a.frame;
    const item = a.id !== null ? this._requests.get(a.id) : undefined;
    if (item !== undefined) {
      this._requests.delete(a.id);
      clearTimeout(item.timer);
      if (msg.type === "error") item.reject(new FanrouteError(msg.code ?? "error", msg.message ?? ""));
      else item.resolve(item.answer(msg));
    } else if (msg.type === "error") {
      this._emit("error", { code: msg.code ?? "error", message: msg.message ?? "" });
    }
  }

  // --- tokens --------------------------------------------------------------------

  /** Ask getToken() (sync or async) and hand the answer to the core. */
  _fetchToken(reason) {
    const call = ++this._tokenCalls;
    if (reason === "connect") {
      this._setState("connecting");
      this._startTicker(); // the connect timeout covers a token source that never answers
    }
    const settle = (token, error) => {
      if (call !== this._tokenCalls || this._stopped) return;
      const now = Date.now();
      if (error !== undefined) {
        this._emit("error", { code: "token", message: `getToken failed: ${error?.message ?? error}` });
        this._apply(this._core.tokenFailed(now, "getToken failed"));
        return;
      }
      const value = typeof token === "string" && token !== "" ? token : null;
      this._apply(this._core.giveToken(value, now, value === null ? null : tokenTtl(value, now)));
    };
    let result;
    try {
      result = this.options.getToken({ reason });
    } catch (err) {
      settle(undefined, err);
      return;
    }
    if (result !== null && typeof result === "object" && typeof result.then === "function") {
      result.then((token) => settle(token), (err) => settle(undefined, err ?? new Error("rejected")));
    } else {
      settle(result);
    }
  }

  // --- the wire ------------------------------------------------------------------

  _send(frame) {
    this._ws?.send(JSON.stringify(frame));
  }

  _sendRequest(item) {
    item.id = this._core.nextId();
    this._requests.set(item.id, item);
    this._send({ ...item.frame, id: item.id });
  }

  _forget(item) {
    if (item.id !== null) this._requests.delete(item.id);
    const i = this._queue.indexOf(item);
    if (i >= 0) this._queue.splice(i, 1);
  }

  _startTicker() {
    clearInterval(this._timers.tick);
    this._timers.tick = setInterval(() => this._apply(this._core.tick(Date.now())), this._core.checkPeriod);
  }

  _open(url) {
    this._timers.reconnect = null;
    this._attempt += 1;
    if (this.options.getToken === null) this._core.token = this.options.token; // read at every attempt
    this._setState("connecting");
    this._emit("connecting", { url, attempt: this._attempt });
    let ws;
    try {
      ws = new this.options.WebSocket(url);
    } catch (err) {
      // A malformed URL: no point retrying it, but others in the list may work.
      this._lost(CLOSE_ABNORMAL, String(err?.message ?? err), url);
      return;
    }
    this._ws = ws;
    this._wsUrl = url;
    ws.onopen = () => {
      if (this._ws === ws) this._apply(this._core.opened(Date.now()));
    };
    ws.onmessage = (event) => {
      if (this._ws === ws) this._receive(event.data);
    };
    ws.onclose = (event) => {
      if (this._ws !== ws) return;
      this._detach();
      this._lost(event.code, event.reason ?? "", url);
    };
    ws.onerror = () => {}; // a close event always follows
    this._startTicker();
  }

  /** Abandon the current socket (or the wait for a token) from our side and go on
   * as if it had closed. */
  _drop(code, reason) {
    const ws = this._ws;
    const url = ws === null ? null : this._wsUrl;
    this._detach();
    if (ws !== null) {
      try {
        if (code === null) ws.close();
        else ws.close(code, reason);
      } catch {
        /* a socket still CONNECTING may refuse a code; it is abandoned anyway */
      }
    }
    this._lost(code ?? CLOSE_ABNORMAL, reason, url);
  }

  _detach() {
    const ws = this._ws;
    if (ws !== null) ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    this._ws = null;
    clearInterval(this._timers.tick);
    this._timers.tick = null;
  }

  _receive(data) {
    if (typeof data !== "string") return; // this client speaks JSON only
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      this._emit("error", { code: "bad_frame", message: "a frame from the gateway is not JSON" });
      return;
    }
    if (msg === null || typeof msg !== "object" || Array.isArray(msg)) return;
    this._apply(this._core.received(msg, Date.now()), msg);
  }

  /** A socket ended (or never opened): settle requests, then reconnect or stop. */
  _lost(code, reason, url) {
    if (this._stopped) return;
    this._afterClose(this._core.closed(code, Date.now(), reason), code, reason, url);
  }

  _afterClose(actions, code, reason, url) {
    if (this._stopped) return;
    clearInterval(this._timers.tick);
    this._timers.tick = null;
    for (const a of actions) {
      if (a.type === "stop") {
        this._stopped = true;
        this._ended(code, reason, "terminal");
        return;
      }
      if (a.type === "reconnect") {
        this._settle(code);
        this.lastClose = { code, reason };
        this.url = this.session = null;
        this._setState("connecting");
        this._subscriptionsWait(code, reason);
        this._emit("disconnected", { code, reason, url, reconnect: true, delay: a.delay });
        this._timers.reconnect = setTimeout(() => this._apply(this._core.connect(Date.now())), a.delay);
      }
    }
  }

  /** No more reconnecting: after close() or a terminal close code. */
  _ended(code, reason, why) {
    clearTimeout(this._timers.reconnect);
    this._timers.reconnect = null;
    const url = this.url;
    this._settle(code);
    for (const item of this._queue.splice(0)) {
      clearTimeout(item.timer);
      item.reject(new FanrouteError(why === "closed" ? "closed" : "disconnected", reason || `closed with ${code}`));
    }
    this.lastClose = { code, reason };
    this.url = this.session = null;
    this._setState("disconnected");
    this._subscriptionsWait(code, reason);
    this._emit("disconnected", { code, reason, url, reconnect: false, delay: null });
  }

  _settle(code) {
    for (const [id, item] of this._requests) {
      clearTimeout(item.timer);
      item.reject(new FanrouteError("disconnected", `the connection closed (${code}) before the answer came`));
      this._requests.delete(id);
    }
  }
}
