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
 * - an application-level `ping` every `pingInterval`; a connection that answers a ping
 *   with nothing at all for `pingTimeout` is dead, so silence is noticed within about
 *   `pingInterval + pingTimeout` (a browser cannot see the gateway's WebSocket pings,
 *   so the client keeps its own deadline);
 * - reconnection with exponential backoff and full jitter; the attempt count resets
 *   only after a connection stayed healthy for `resetAfter` ms, so a gateway that
 *   accepts and drops at once cannot pull pages into a tight loop;
 * - after every reconnect, each topic is subscribed again with `since` (the last
 *   epoch and seq the page saw); duplicates are dropped and gaps repaired by
 *   resubscribing, so every handler sees each message once and in `seq` order, or
 *   an `unrecovered` event where the cluster could not fill the gap;
 * - close codes: see `reconnectDelay` below.
 *
 * The pure parts (Backoff, SeqTracker, reconnectDelay, isValidTopic) are exported
 * for tests and do no I/O; the client takes its WebSocket class as an option so it
 * can run under Node's test runner with a fake socket.
 */

// --- Close codes ----------------------------------------------------------------

export const CLOSE_NORMAL = 1000;
export const CLOSE_POLICY = 1008;
export const CLOSE_RESTART = 1012;
export const CLOSE_TRY_AGAIN = 1013;
export const CLOSE_UNAUTHORIZED = 4001;
export const CLOSE_SLOW_CONSUMER = 4008;
export const CLOSE_HEARTBEAT_TIMEOUT = 4009;
export const CLOSE_RATE_LIMIT = 4029;

/** Close codes after which reconnecting cannot help: the client stops. */
export const TERMINAL_CLOSE_CODES = new Set([CLOSE_UNAUTHORIZED, CLOSE_POLICY]);

/** A draining gateway (1012) asks clients back soon: spread them over this window. */
export const RESTART_WINDOW = 1000;

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
    const delay = this.random() * this.cap(this.attempt);
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
 * attempt, or `null` to stop reconnecting.
 *
 * - 4001 (unauthorized) and 1008 (policy violation): stop; the same token or the
 *   same behaviour would fail again. The application decides what to do.
 * - 1012 (service restart, a gateway draining): come back promptly, at a random
 *   moment within RESTART_WINDOW (or the backoff delay, if that is shorter).
 * - 4029 (rate limit exceeded repeatedly): wait between maxDelay and 1.5 × maxDelay,
 *   whatever the attempt count: a page that was cut off for flooding must not
 *   return at once.
 * - anything else (1006 lost, 1001, 1011, 1013, 4008 slow consumer, 4009 heartbeat
 *   timeout, ...): exponential backoff with full jitter.
 */
export function reconnectDelay(code, backoff, random = Math.random) {
  if (TERMINAL_CLOSE_CODES.has(code)) return null;
  const delay = backoff.next();
  if (code === CLOSE_RESTART) return Math.min(delay, random() * RESTART_WINDOW);
  if (code === CLOSE_RATE_LIMIT) return backoff.maxDelay * (1 + random() / 2);
  return delay;
}

// --- Topics and sequence numbers --------------------------------------------------

const TOPIC_RE = /^[A-Za-z0-9._:\-/@=+,#~]{1,256}$/;

/** True when `topic` is a valid topic name (letters, digits and . _ : - / @ = + , # ~). */
export function isValidTopic(topic) {
  return typeof topic === "string" && TOPIC_RE.test(topic);
}

/**
 * Where one topic's stream stands, as the page has seen it.
 *
 * `epoch`/`seq` is the last message handed to the page (or the position the
 * subscription started from). While a subscribe is in flight (`awaiting`), messages
 * are ignored: the `subscribed` answer says where the stream stands, and what was
 * missed follows it.
 */
export class SeqTracker {
  constructor() {
    this.epoch = null;
    this.seq = 0;
    this.awaiting = false;
    this.resuming = false; // the subscribe in flight carries `since`
    this.duplicates = 0;
    this.gaps = 0;
  }

  /** The `since` cursor for the next subscribe, or null on a first subscribe. */
  since() {
    return this.epoch === null ? null : { epoch: this.epoch, seq: this.seq };
  }

  /** A subscribe is being sent: returns its `since` (or null). */
  subscribing() {
    const since = this.since();
    this.awaiting = true;
    this.resuming = since !== null;
    return since;
  }

  /** The connection dropped: whatever was in flight will be asked again. */
  reset() {
    this.awaiting = false;
    this.resuming = false;
  }

  /**
   * Apply a `subscribed` event. `solicited` is false for the gateway's unsolicited
   * `subscribed` (no id), which says the stream restarted. Returns null when the
   * stream goes on without a break, or `{epoch, seq, previous}` when messages before
   * `seq + 1` may have been lost.
   */
  onSubscribed({ epoch, seq, recovered }, solicited = true) {
    if (!solicited && this.awaiting) return null; // our own answer is on its way
    const previous = this.since();
    const resuming = this.resuming || !solicited;
    this.awaiting = false;
    this.resuming = false;
    if (recovered === true && resuming) {
      this.epoch = epoch; // the missed messages follow, from this.seq + 1
      return null;
    }
    this.epoch = epoch;
    this.seq = seq;
    return resuming ? { epoch, seq, previous } : null;
  }

  /** Classify a message: "deliver", "duplicate", "gap" or "ignore". */
  onMessage(seq) {
    if (this.awaiting || this.epoch === null) return "ignore";
    if (!Number.isInteger(seq)) return "deliver"; // untracked (not sent by fanroute)
    if (seq <= this.seq) {
      this.duplicates += 1;
      return "duplicate";
    }
    if (seq !== this.seq + 1) {
      this.gaps += 1;
      return "gap";
    }
    this.seq = seq;
    return "deliver";
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

const DEFAULT_PING_INTERVAL = 25000;
const DEFAULT_PING_TIMEOUT = 8000;

function reportError(err) {
  // A throwing handler must not break the client; the page still sees the error.
  if (typeof globalThis.reportError === "function") globalThis.reportError(err);
  else setTimeout(() => { throw err; }, 0);
}

export class FanrouteClient {
  /**
   * @param urls one WebSocket URL or a list of them (one per gateway)
   * @param options see fanroute.d.ts (times in milliseconds)
   */
  constructor(urls, options = {}) {
    this.urls = typeof urls === "string" ? [urls] : [...urls];
    if (this.urls.length === 0) throw new TypeError("FanrouteClient needs at least one URL");
    const random = options.random ?? Math.random;
    this.options = {
      token: options.token ?? null,
      pingInterval: options.pingInterval ?? null,
      pingTimeout: options.pingTimeout ?? null,
      connectTimeout: options.connectTimeout ?? 10000,
      publishTimeout: options.publishTimeout ?? 10000,
      WebSocket: options.WebSocket ?? globalThis.WebSocket,
      random,
    };
    this.backoff = new Backoff({
      minDelay: options.minDelay ?? 100,
      maxDelay: options.maxDelay ?? 10000,
      resetAfter: options.resetAfter ?? 5000,
      random,
    });
    this.state = "disconnected";
    this.url = null; // the gateway currently connected to
    this.session = null;
    this.lastClose = null; // {code, reason} of the last connection that ended
    this.stats = { connects: 0, duplicates: 0, gaps: 0, unrecovered: 0 };
    this._next = Math.floor(random() * this.urls.length) % this.urls.length;
    this._attempt = 0;
    this._ws = null;
    this._ids = 1;
    this._handlers = new Map(); // event -> Set<fn>
    this._topics = new Map(); // topic -> {handlers, tracker, id, retry, tries}
    this._requests = new Map(); // id -> {kind: "subscribe"|"publish", ...}
    this._queue = []; // publishes waiting for a connection
    this._timers = { reconnect: null, connect: null, heartbeat: null };
    this._stopped = true;
    this._connectedAt = 0;
    this._lastRx = 0;
    this._lastPing = 0;
  }

  // --- events --------------------------------------------------------------------

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
    for (const fn of [...(this._handlers.get(event) ?? [])]) {
      try {
        fn(detail);
      } catch (err) {
        reportError(err);
      }
    }
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
    this.backoff.reset();
    this._open();
  }

  /** Close the connection and stop reconnecting. Subscriptions are kept: a later
   * connect() resumes them from where they stood. */
  close(code = CLOSE_NORMAL, reason = "client closed") {
    if (this._stopped && this._ws === null) return;
    this._stopped = true;
    const ws = this._ws;
    this._detach();
    if (ws !== null) {
      try {
        ws.close(code, reason);
      } catch {
        /* already closing */
      }
    }
    this._ended(code, reason, "closed");
  }

  /**
   * Subscribe `handler` to `topic`; returns a function that unsubscribes it.
   * Handlers of one topic share one subscription on the wire.
   */
  subscribe(topic, handler) {
    if (!isValidTopic(topic)) {
      throw new FanrouteError("bad_request", `invalid topic ${JSON.stringify(topic)}`);
    }
    if (typeof handler !== "function") throw new TypeError("subscribe needs a handler function");
    let entry = this._topics.get(topic);
    if (!entry) {
      entry = { handlers: new Set(), tracker: new SeqTracker(), id: null, retry: null, tries: 0 };
      this._topics.set(topic, entry);
      if (this.state === "connected") this._sendSubscribe(topic, entry);
    }
    // Wrap so the same function can be subscribed twice and removed once.
    const box = { handler };
    entry.handlers.add(box);
    return () => this._unsubscribe(topic, entry, box);
  }

  /** The position the page reached in `topic`: `{epoch, seq}`, or null. */
  position(topic) {
    return this._topics.get(topic)?.tracker.since() ?? null;
  }

  /** The topics subscribed to. */
  get topics() {
    return [...this._topics.keys()];
  }

  /**
   * Publish `payload` to `topic`; resolves to the seq the cluster gave it.
   * Waits for a connection (up to `publishTimeout`). If the connection drops before
   * the answer, it rejects with code "disconnected": the publication may or may not
   * have happened (it is not sent again, so it never happens twice).
   */
  publish(topic, payload, { timeout } = {}) {
    return new Promise((resolve, reject) => {
      if (!isValidTopic(topic)) {
        reject(new FanrouteError("bad_request", `invalid topic ${JSON.stringify(topic)}`));
        return;
      }
      if (payload === undefined) {
        reject(new FanrouteError("bad_request", "publish needs a payload"));
        return;
      }
      if (this._stopped && this.state === "disconnected") {
        reject(new FanrouteError("closed", "the client is not connecting (call connect())"));
        return;
      }
      const item = { kind: "publish", topic, payload, resolve, reject, timer: null, id: null };
      item.timer = setTimeout(() => {
        this._forget(item);
        reject(new FanrouteError("timeout", `no answer to publish on ${topic}`));
      }, timeout ?? this.options.publishTimeout);
      if (this.state === "connected") this._sendPublish(item);
      else this._queue.push(item);
    });
  }

  // --- the wire ------------------------------------------------------------------

  _send(frame) {
    this._ws.send(JSON.stringify(frame));
  }

  _sendSubscribe(topic, entry) {
    clearTimeout(entry.retry);
    entry.retry = null;
    const id = this._ids++;
    const frame = { type: "subscribe", topic, id };
    const since = entry.tracker.subscribing();
    if (since !== null) frame.since = since;
    entry.id = id;
    this._requests.set(id, { kind: "subscribe", topic, entry });
    this._send(frame);
  }

  _sendPublish(item) {
    item.id = this._ids++;
    this._requests.set(item.id, item);
    this._send({ type: "publish", topic: item.topic, payload: item.payload, id: item.id });
  }

  _forget(item) {
    if (item.id !== null) this._requests.delete(item.id);
    const i = this._queue.indexOf(item);
    if (i >= 0) this._queue.splice(i, 1);
  }

  _unsubscribe(topic, entry, box) {
    if (!entry.handlers.delete(box) || entry.handlers.size > 0) return;
    if (this._topics.get(topic) !== entry) return;
    this._topics.delete(topic);
    clearTimeout(entry.retry);
    if (this.state === "connected") this._send({ type: "unsubscribe", topic });
  }

  _open() {
    this._timers.reconnect = null;
    const url = this.urls[this._next];
    this._next = (this._next + 1) % this.urls.length;
    this._attempt += 1;
    this._setState("connecting");
    this._emit("connecting", { url, attempt: this._attempt });
    let ws;
    try {
      ws = new this.options.WebSocket(url);
    } catch (err) {
      // A malformed URL: no point retrying it, but others in the list may work.
      this._lost(1006, String(err?.message ?? err), url);
      return;
    }
    this._ws = ws;
    this._wsUrl = url;
    ws.onopen = () => {
      if (this._ws !== ws) return;
      const hello = { type: "connect", id: 0 };
      if (this.options.token !== null) hello.token = this.options.token;
      this._send(hello);
    };
    ws.onmessage = (event) => {
      if (this._ws !== ws) return;
      this._lastRx = Date.now();
      this._receive(event.data);
    };
    ws.onclose = (event) => {
      if (this._ws !== ws) return;
      this._detach();
      this._lost(event.code, event.reason ?? "", url);
    };
    ws.onerror = () => {}; // a close event always follows
    this._timers.connect = setTimeout(() => this._drop(4000, "connect timeout"), this.options.connectTimeout);
  }

  /** Abandon the current socket from our side and go on as if it had closed. */
  _drop(code, reason) {
    const ws = this._ws;
    if (ws === null) return;
    const url = this._wsUrl;
    this._detach();
    try {
      ws.close(code, reason);
    } catch {
      /* a socket still CONNECTING may refuse a code; it is abandoned anyway */
    }
    this._lost(code, reason, url);
  }

  _detach() {
    const ws = this._ws;
    if (ws !== null) ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    this._ws = null;
    clearTimeout(this._timers.connect);
    clearInterval(this._timers.heartbeat);
    this._timers.connect = this._timers.heartbeat = null;
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
    if (msg === null || typeof msg !== "object") return;
    const type = msg.type;
    if (type === undefined || type === "message") {
      this._onMessage(msg);
    } else if (type === "pong") {
      // liveness only: _lastRx is already updated
    } else if (type === "connected") {
      this._onConnected(msg);
    } else if (type === "subscribed") {
      this._onSubscribed(msg);
    } else if (type === "published") {
      const item = this._requests.get(msg.id);
      if (item?.kind === "publish") {
        this._requests.delete(msg.id);
        clearTimeout(item.timer);
        item.resolve(msg.seq);
      }
    } else if (type === "error") {
      this._onError(msg);
    }
  }

  _onConnected(msg) {
    if (this.state === "connected") return;
    clearTimeout(this._timers.connect);
    this._timers.connect = null;
    this.url = this._wsUrl;
    this.session = msg.session ?? null;
    this._attempt = 0;
    this.stats.connects += 1;
    const now = Date.now();
    this._connectedAt = this._lastRx = this._lastPing = now;
    const interval = this.options.pingInterval ?? (msg.ping_interval > 0 ? msg.ping_interval * 1000 : DEFAULT_PING_INTERVAL);
    const timeout = this.options.pingTimeout ?? (msg.ping_timeout > 0 ? msg.ping_timeout * 1000 : DEFAULT_PING_TIMEOUT);
    this._startHeartbeat(interval, timeout);
    this._setState("connected");
    for (const [topic, entry] of this._topics) this._sendSubscribe(topic, entry);
    for (const item of this._queue.splice(0)) this._sendPublish(item);
    this._emit("connected", { url: this.url, session: this.session });
  }

  _startHeartbeat(interval, timeout) {
    // Dead means: a ping went out, nothing at all came back since, for `timeout`.
    // Judged from the last ping rather than from a fixed silence window, because a
    // background tab's timers may fire a minute late: a late tick then sends a
    // fresh ping instead of mistaking the browser's own throttling for silence.
    const tick = Math.max(10, Math.min(interval, timeout) / 4);
    this._timers.heartbeat = setInterval(() => {
      const now = Date.now();
      if (this._lastRx < this._lastPing) {
        if (now - this._lastPing > timeout) this._drop(CLOSE_HEARTBEAT_TIMEOUT, "heartbeat timeout");
        return;
      }
      if (now - this._lastPing >= interval) {
        this._lastPing = now;
        this._send({ type: "ping", ts: now });
      }
    }, tick);
  }

  _onMessage(msg) {
    const entry = this._topics.get(msg.topic);
    if (!entry) return;
    const verdict = entry.tracker.onMessage(msg.seq);
    if (verdict === "duplicate") {
      this.stats.duplicates += 1;
    } else if (verdict === "gap") {
      // Ask again from the last message we have; the missed ones come first.
      this.stats.gaps += 1;
      this._send({ type: "unsubscribe", topic: msg.topic });
      this._sendSubscribe(msg.topic, entry);
    } else if (verdict === "deliver") {
      const ctx = { topic: msg.topic, seq: msg.seq };
      for (const box of [...entry.handlers]) {
        try {
          box.handler(msg.payload, ctx);
        } catch (err) {
          reportError(err);
        }
      }
    }
  }

  _onSubscribed(msg) {
    let entry;
    const solicited = msg.id !== undefined && msg.id !== null;
    if (solicited) {
      const req = this._requests.get(msg.id);
      if (req?.kind !== "subscribe") return;
      this._requests.delete(msg.id);
      entry = req.entry;
      if (this._topics.get(req.topic) !== entry || entry.id !== msg.id) return; // stale
    } else {
      entry = this._topics.get(msg.topic);
      if (!entry) return;
    }
    const resuming = entry.tracker.resuming;
    const lost = entry.tracker.onSubscribed(msg, solicited);
    entry.tries = 0;
    if (solicited) {
      this._emit("subscribed", {
        topic: msg.topic, epoch: msg.epoch, seq: msg.seq, recovered: msg.recovered === true, resumed: resuming,
      });
    }
    if (lost !== null) {
      this.stats.unrecovered += 1;
      this._emit("unrecovered", { topic: msg.topic, ...lost });
    }
  }

  _onError(msg) {
    const error = new FanrouteError(msg.code ?? "error", msg.message ?? "");
    const req = msg.id !== undefined ? this._requests.get(msg.id) : undefined;
    if (msg.id === 0 && this.state === "connecting") {
      // The connect frame was refused (a bad token): the gateway closes next.
      this._emit("error", { code: error.code, message: error.reason });
      if (error.code === "unauthorized") this._drop(CLOSE_UNAUTHORIZED, error.reason);
      return;
    }
    if (req?.kind === "publish") {
      this._requests.delete(msg.id);
      clearTimeout(req.timer);
      req.reject(error);
      return;
    }
    if (req?.kind === "subscribe") {
      this._requests.delete(msg.id);
      const entry = req.entry;
      this._emit("error", { topic: req.topic, code: error.code, message: error.reason });
      if (this._topics.get(req.topic) !== entry || entry.id !== msg.id) return;
      entry.tracker.reset();
      if (error.code === "unavailable" || error.code === "rate_limited") {
        // The shard is away for a moment: ask again later, with the same backoff shape.
        const cap = this.backoff.cap(entry.tries++);
        entry.retry = setTimeout(() => {
          entry.retry = null;
          if (this.state === "connected" && this._topics.get(req.topic) === entry) this._sendSubscribe(req.topic, entry);
        }, Math.max(this.backoff.minDelay, this.options.random() * cap));
      }
      return;
    }
    this._emit("error", { code: error.code, message: error.reason });
  }

  /** A socket ended (or never opened): settle requests, then reconnect or stop. */
  _lost(code, reason, url) {
    const wasConnected = this.state === "connected";
    if (wasConnected) this.backoff.connectionLasted(Date.now() - this._connectedAt);
    if (this._stopped) return;
    const delay = reconnectDelay(code, this.backoff, this.options.random);
    if (delay === null) {
      this._stopped = true;
      this._ended(code, reason, "terminal");
      return;
    }
    this._settle(code);
    this.lastClose = { code, reason };
    this.url = this.session = null;
    this._setState("connecting");
    this._emit("disconnected", { code, reason, url, reconnect: true, delay });
    this._timers.reconnect = setTimeout(() => this._open(), delay);
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
    this._emit("disconnected", { code, reason, url, reconnect: false, delay: null });
  }

  _settle(code) {
    for (const [id, req] of this._requests) {
      if (req.kind === "publish") {
        clearTimeout(req.timer);
        req.reject(new FanrouteError("disconnected", `the connection closed (${code}) before the answer came; the publication may or may not have happened`));
      }
      this._requests.delete(id);
    }
    for (const entry of this._topics.values()) {
      entry.tracker.reset();
      clearTimeout(entry.retry);
      entry.retry = null;
    }
  }
}
