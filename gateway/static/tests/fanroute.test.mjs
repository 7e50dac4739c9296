// Unit tests of fanroute.js: the pure parts, the shared client cases, and the client
// against a fake socket with mocked timers. Run: node --test gateway/static/tests/
import { test, describe, beforeEach, afterEach, mock } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

import {
  Backoff,
  ClientCore,
  DELIVERED,
  FanrouteClient,
  FanrouteError,
  NOTHING,
  RESTART_WINDOW,
  TERMINAL_CLOSE_CODES,
  isValidTopic,
  reconnectDelay,
  reconnectRule,
  refreshDelay,
  tokenTtl,
  TOKEN_EXPIRED_REASON,
} from "../fanroute.js";

// --- Backoff ---------------------------------------------------------------------

describe("Backoff", () => {
  test("the cap doubles from minDelay up to maxDelay", () => {
    const b = new Backoff({ minDelay: 100, maxDelay: 2000 });
    assert.deepEqual([0, 1, 2, 3, 4, 5, 6, 100].map((n) => b.cap(n)), [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
  });

  test("full jitter: each delay is a uniform draw in [0, cap)", () => {
    const draws = [0, 0.5, 0.999, 0.25];
    const b = new Backoff({ minDelay: 100, maxDelay: 10000, random: () => draws.shift() });
    assert.equal(b.next(), 0); // attempt 0, cap 100
    assert.equal(b.next(), 100); // attempt 1, cap 200
    assert.ok(Math.abs(b.next() - 399.6) < 1e-9); // attempt 2, cap 400
    assert.equal(b.next(), 200); // attempt 3, cap 800
    assert.equal(b.attempt, 4);
  });

  test("delays never exceed maxDelay, however many attempts", () => {
    const b = new Backoff({ minDelay: 50, maxDelay: 3000, random: () => 0.9999 });
    for (let i = 0; i < 200; i++) assert.ok(b.next() < 3000);
  });

  test("the schedule resets only after a healthy period", () => {
    const b = new Backoff({ minDelay: 100, maxDelay: 10000, resetAfter: 5000, random: () => 0.5 });
    b.next(); b.next(); b.next();
    b.connectionLasted(4999); // a connection that dropped quickly does not reset
    assert.equal(b.attempt, 3);
    assert.equal(b.next(), 400);
    b.connectionLasted(5000);
    assert.equal(b.attempt, 0);
    assert.equal(b.next(), 50);
  });

  test("bad parameters are refused", () => {
    assert.throws(() => new Backoff({ minDelay: 10, maxDelay: 5 }), RangeError);
    assert.throws(() => new Backoff({ minDelay: -1 }), RangeError);
    assert.throws(() => new Backoff({ factor: 0.5 }), RangeError);
  });
});

describe("reconnectDelay", () => {
  const backoff = () => new Backoff({ minDelay: 100, maxDelay: 8000, random: () => 0.5 });

  test("4001, 4003 and 1008 stop reconnecting", () => {
    assert.equal(reconnectDelay(4001, backoff()), null);
    assert.equal(reconnectDelay(4003, backoff()), null);
    assert.equal(reconnectDelay(1008, backoff()), null);
    assert.deepEqual([...TERMINAL_CLOSE_CODES].sort(), [1008, 4001, 4003]);
  });

  test("1012 comes back within the restart window even after many attempts", () => {
    const b = backoff();
    for (let i = 0; i < 10; i++) b.next();
    const delay = reconnectDelay(1012, b, () => 0.999);
    assert.ok(delay < RESTART_WINDOW);
    assert.ok(delay > 0);
  });

  test("4029 waits at least maxDelay", () => {
    for (const r of [0, 0.5, 0.999]) {
      const delay = reconnectDelay(4029, backoff(), () => r);
      assert.ok(delay >= 8000 && delay < 12000, String(delay));
    }
  });

  test("other codes follow the backoff", () => {
    for (const code of [1000, 1001, 1006, 1011, 1013, 4008, 4009]) {
      const b = backoff();
      assert.equal(reconnectDelay(code, b), 50);
      assert.equal(reconnectDelay(code, b), 100);
    }
  });
});

test("isValidTopic follows the protocol's character set", () => {
  for (const t of ["prices.AAPL", "a", "chat/room-1", "x:y_z@w=1+2,3#4~5", "9".repeat(256)]) assert.ok(isValidTopic(t), t);
  for (const t of ["", "a b", "quote\"", "é", "9".repeat(257), null, 42]) assert.ok(!isValidTopic(t), String(t));
});

// --- The shared cases (tests/data/client_cases.json, also run by tests/unit/test_clientcore.py) ---

const TABLE = JSON.parse(readFileSync(new URL("../../../tests/data/client_cases.json", import.meta.url), "utf8"));

// The table is in seconds and snake_case; fanroute.js works in milliseconds.
const MS = new Set(["min_delay", "max_delay", "backoff_reset", "ping_interval", "ping_timeout", "app_ping", "connect_timeout", "restart_window", "publish_timeout"]);
// fetch_token's value is a flag, not a time.
const camel = (name) => name.replace(/_([a-z])/g, (_, c) => c.toUpperCase());
const ms = (s) => (s === null ? null : s * 1000);
const sec = (m) => (m === null ? null : m / 1000);

function settingsOf(c) {
  const out = {};
  for (const [k, v] of Object.entries({ ...TABLE.settings_defaults, ...c.settings })) out[camel(k)] = MS.has(k) ? ms(v) : v;
  return out;
}

function scripted(draws) {
  let i = 0;
  return () => draws[i++ % draws.length];
}

function canonical(a) {
  switch (a.type) {
    case "connect": return { type: "connect", url: a.url };
    case "send": return { type: "send", frame: a.frame };
    case "ping": return { type: "ping" };
    case "deliver": return { type: "deliver" };
    case "subscribed": return { type: "subscribed", topic: a.topic, epoch: a.epoch, seq: a.seq, recovered: a.recovered, resumed: a.resumed };
    case "unrecovered": return { type: "unrecovered", topic: a.topic, epoch: a.epoch, seq: a.seq, previous: a.previous };
    case "subscribeError": return { type: "subscribe_error", topic: a.topic, code: a.code, retry_at: sec(a.retryAt) };
    case "ready": return { type: "ready", session: a.session };
    case "answer": return { type: "answer", id: a.id };
    case "drop": return { type: "drop", code: a.code };
    case "reconnect": return { type: "reconnect", at: sec(a.at), delay: sec(a.delay) };
    case "stop": return { type: "stop", code: a.code };
    case "presence": return { type: "presence", topic: a.topic, subscribers: a.subscribers };
    case "fetchToken": return { type: "fetch_token", reason: a.reason };
    case "refreshed": return { type: "refreshed", expires: a.expires };
    case "published": return { type: "published", idem: a.publication.idem, seq: a.seq };
    case "publishRetry": return { type: "publish_retry", idem: a.publication.idem, code: a.code, retry_at: sec(a.retryAt) };
    case "publishFailed": return { type: "publish_failed", idem: a.publication.idem, code: a.code };
  }
  throw new Error(`unknown action ${JSON.stringify(a)}`);
}

// Deep equality, numbers within 1e-9 (floats in seconds against ms / 1000).
function same(got, want) {
  if (typeof want === "number" && !Number.isInteger(want) || typeof got === "number" && !Number.isInteger(got)) {
    return typeof got === "number" && typeof want === "number" && Math.abs(got - want) <= 1e-9 * Math.max(1, Math.abs(want));
  }
  if (Array.isArray(want)) return Array.isArray(got) && got.length === want.length && want.every((w, i) => same(got[i], w));
  if (want !== null && typeof want === "object") {
    if (got === null || typeof got !== "object" || Array.isArray(got)) return false;
    const keys = Object.keys(want);
    return Object.keys(got).length === keys.length && keys.every((k) => k in got && same(got[k], want[k]));
  }
  return got === want;
}

function run(core, step) {
  const now = ms(step.now ?? 0);
  switch (step.do) {
    case "up":
      core.connect(now);
      core.opened(now);
      return core.received(step.frame, now);
    case "receive": return core.received(step.frame, now);
    case "closed": return core.closed(step.code, now, step.reason ?? "");
    case "token": return core.giveToken(step.token, now, step.ttl === undefined || step.ttl === null ? null : ms(step.ttl));
    case "token_failed": return core.tokenFailed(now);
    case "start": case "connect": case "opened": case "tick": return core[step.do](now);
    case "subscribe": return core.subscribe(step.topic, step.last ?? null, step.presence ?? false);
    case "unsubscribe": return core.unsubscribe(step.topic);
    case "stop": return core.stop();
    case "publish": return core.publish(step.topic, step.payload, now, step.idem ?? null, step.timeout === undefined ? null : ms(step.timeout)).actions;
    case "abandon": return core.abandon(held(core, step.idem));
  }
  throw new Error(`unknown step ${step.do}`);
}

function held(core, idem) {
  return [...core.publications].find((p) => p.idem === idem);
}

function state(core, key, want) {
  switch (key) {
    case "phase": return core.phase;
    case "attempt": return core.backoff.attempt;
    case "deadline": return sec(core.deadline);
    case "topics": return [...core.streams.keys()];
    case "position": return Object.fromEntries(Object.keys(want).map((t) => [t, core.position(t)]));
    case "stream": return Object.fromEntries(Object.keys(want).map((t) => [t, core.streams.get(t)?.state ?? null]));
    case "stats": return Object.fromEntries(Object.keys(want).map((k) => [k, core.stats[k]]));
    case "token": return core.token;
    case "publications": return Object.fromEntries(Object.keys(want).map((k) => [k, held(core, k)?.state ?? null]));
  }
  throw new Error(`unknown check ${key}`);
}

describe("shared client cases", () => {
  test("the table is there and not empty", () => assert.ok(TABLE.cases.length >= 40, String(TABLE.cases.length)));
  for (const c of TABLE.cases) {
    test(c.name, () => {
      const core = new ClientCore(c.urls, settingsOf(c), { random: scripted(c.random) });
      c.steps.forEach((step, i) => {
        const where = `step ${i} ${JSON.stringify(step)}`;
        const got = run(core, step).map(canonical);
        if ("expect" in step) {
          const want = step.expect.map((a) => Object.fromEntries(["type", ...TABLE.action_fields[a.type]].map((k) => [k, a[k]])));
          assert.ok(same(got, want), `${where}\n got  ${JSON.stringify(got)}\n want ${JSON.stringify(want)}`);
        }
        for (const [key, want] of Object.entries(step.check ?? {})) {
          const value = state(core, key, want);
          assert.ok(same(value, want), `${where}\n ${key}: got ${JSON.stringify(value)}, want ${JSON.stringify(want)}`);
        }
      });
    });
  }

  test("each close code's rule is the one the table names", () => {
    for (const c of TABLE.cases.filter((x) => x.name.startsWith("close "))) {
      const [code, rule] = c.name.slice("close ".length).split(": ");
      assert.equal(reconnectRule(code === "None" ? null : Number(code)), rule, c.name);
    }
  });
});

describe("ClientCore", () => {
  test("in-order messages take the allocation-free path", () => {
    const core = new ClientCore(["u"]);
    core.subscribe("t");
    core.connect(0);
    core.opened(0);
    core.received({ type: "connected" }, 0);
    core.received({ type: "subscribed", topic: "t", id: 1, epoch: "e", seq: 0, recovered: false }, 0);
    assert.equal(core.message("t", 1), DELIVERED);
    assert.equal(core.message("t", 1), NOTHING);
    assert.equal(core.tick(100), NOTHING);
  });
});

// --- The client against a fake socket ----------------------------------------------

class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url;
    this.sent = [];
    this.closed = null;
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    FakeSocket.all.push(this);
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close(code, reason) {
    this.closed = { code, reason };
  }
  // --- the server's side ---
  open() {
    this.onopen?.({});
  }
  deliver(obj) {
    this.onmessage?.({ data: JSON.stringify(obj) });
  }
  serverClose(code, reason = "") {
    this.onclose?.({ code, reason });
  }
  accept(extra = {}) {
    this.open();
    this.deliver({ type: "connected", session: "s", ping_interval: 1, ping_timeout: 1, ...extra });
  }
  frames(type) {
    return this.sent.filter((f) => f.type === type);
  }
}

// Node 20's mock.timers.tick(ms) moves Date.now() to the end before it runs the due
// callbacks; advancing in small steps keeps the clock right inside each callback.
function advance(ms, step = 25) {
  for (let done = 0; done < ms; done += step) mock.timers.tick(Math.min(step, ms - done));
}

function makeClient(urls = ["ws://a/", "ws://b/"], options = {}) {
  return new FanrouteClient(urls, { WebSocket: FakeSocket, random: () => 0.5, minDelay: 100, maxDelay: 1000, ...options });
}

describe("FanrouteClient", () => {
  beforeEach(() => {
    FakeSocket.all = [];
    mock.timers.enable({ apis: ["setTimeout", "setInterval", "Date"], now: 1_000_000 });
  });
  afterEach(() => mock.timers.reset());

  test("connects, sends connect with the token, then subscribes", () => {
    const c = makeClient(["ws://a/"], { token: "jwt" });
    const states = [];
    c.on("state", ({ state }) => states.push(state));
    c.subscribe("prices.AAPL", () => {});
    c.connect();
    const ws = FakeSocket.all[0];
    ws.open();
    assert.deepEqual(ws.sent[0], { type: "connect", id: 0, token: "jwt" });
    assert.equal(ws.frames("subscribe").length, 0); // not before `connected`
    ws.deliver({ type: "connected", session: "s1", ping_interval: 1, ping_timeout: 1 });
    assert.deepEqual(ws.frames("subscribe"), [{ type: "subscribe", topic: "prices.AAPL", id: 1 }]);
    assert.deepEqual(states, ["connecting", "connected"]);
    assert.equal(c.url, "ws://a/");
    assert.equal(c.session, "s1");
  });

  test("handlers get each message once and in order; gaps are repaired with since", () => {
    const c = makeClient(["ws://a/"]);
    const got = [];
    c.subscribe("t", (payload, { seq }) => got.push([seq, payload]));
    c.connect();
    const ws = FakeSocket.all[0];
    ws.accept();
    ws.deliver({ type: "subscribed", topic: "t", id: 1, epoch: "e", seq: 0, recovered: false });
    ws.deliver({ topic: "t", payload: "a", seq: 1 });
    ws.deliver({ topic: "t", payload: "a", seq: 1 });
    ws.deliver({ topic: "t", payload: "c", seq: 3 }); // gap: 2 is missing
    assert.deepEqual(ws.frames("unsubscribe"), [{ type: "unsubscribe", topic: "t", id: 2 }]);
    const resub = ws.frames("subscribe").at(-1);
    assert.deepEqual(resub.since, { epoch: "e", seq: 1 });
    ws.deliver({ topic: "t", payload: "d", seq: 4 }); // ignored until the answer
    ws.deliver({ type: "subscribed", topic: "t", id: resub.id, epoch: "e", seq: 4, recovered: true });
    for (const [seq, p] of [[2, "b"], [3, "c"], [4, "d"], [5, "e"]]) ws.deliver({ topic: "t", payload: p, seq });
    assert.deepEqual(got, [[1, "a"], [2, "b"], [3, "c"], [4, "d"], [5, "e"]]);
    assert.equal(c.stats.duplicates, 1);
    assert.equal(c.stats.gaps, 1);
  });

  test("after a drop it rotates to the next URL and resubscribes with since", () => {
    const c = makeClient(["ws://a/", "ws://b/"]);
    const got = [];
    const disconnects = [];
    c.on("disconnected", (d) => disconnects.push(d));
    c.subscribe("t", (_p, { seq }) => got.push(seq));
    c.connect();
    const first = FakeSocket.all[0];
    first.accept();
    first.deliver({ type: "subscribed", topic: "t", id: 1, epoch: "e", seq: 5, recovered: false });
    first.deliver({ topic: "t", payload: 0, seq: 6 });
    first.serverClose(1006);
    assert.equal(c.state, "connecting");
    assert.equal(disconnects[0].code, 1006);
    assert.equal(disconnects[0].reconnect, true);
    assert.equal(disconnects[0].delay, 50); // 0.5 × minDelay: the first attempt is prompt
    assert.equal(FakeSocket.all.length, 1);
    mock.timers.tick(50);
    const second = FakeSocket.all[1];
    assert.notEqual(second.url, first.url);
    second.accept();
    const sub = second.frames("subscribe")[0];
    assert.deepEqual(sub.since, { epoch: "e", seq: 6 });
    second.deliver({ type: "subscribed", topic: "t", id: sub.id, epoch: "e", seq: 8, recovered: true });
    second.deliver({ topic: "t", payload: 0, seq: 7 });
    second.deliver({ topic: "t", payload: 0, seq: 8 });
    assert.deepEqual(got, [6, 7, 8]);
  });

  test("an unrecovered topic is announced and the stream goes on", () => {
    const c = makeClient(["ws://a/"]);
    const lost = [];
    const got = [];
    c.on("unrecovered", (d) => lost.push(d));
    c.subscribe("t", (_p, { seq }) => got.push(seq));
    c.connect();
    const ws = FakeSocket.all[0];
    ws.accept();
    ws.deliver({ type: "subscribed", topic: "t", id: 1, epoch: "e", seq: 0, recovered: false });
    ws.deliver({ topic: "t", payload: 0, seq: 1 });
    ws.deliver({ type: "subscribed", topic: "t", epoch: "f", seq: 40, recovered: false }); // no id
    ws.deliver({ topic: "t", payload: 0, seq: 41 });
    assert.deepEqual(lost, [{ topic: "t", epoch: "f", seq: 40, previous: { epoch: "e", seq: 1 } }]);
    assert.deepEqual(got, [1, 41]);
  });

  test("4003 stops reconnecting like 4001", () => {
    const c = makeClient(["ws://a/"]);
    const disconnects = [];
    c.on("disconnected", (d) => disconnects.push(d));
    c.connect();
    FakeSocket.all[0].accept();
    FakeSocket.all[0].serverClose(4003, "disconnected by the server");
    assert.equal(c.state, "disconnected");
    assert.deepEqual(disconnects.map((d) => [d.code, d.reconnect]), [[4003, false]]);
    mock.timers.tick(60_000);
    assert.equal(FakeSocket.all.length, 1);
  });

  test("4029 keeps the page away for the longest backoff", () => {
    const c = makeClient(["ws://a/"], { maxDelay: 1000 });
    const disconnects = [];
    c.on("disconnected", (d) => disconnects.push(d));
    c.connect();
    FakeSocket.all[0].accept();
    FakeSocket.all[0].serverClose(4029, "rate limit");
    assert.equal(disconnects[0].delay, 1250); // 1000 + 0.5 × 500
    mock.timers.tick(1249);
    assert.equal(FakeSocket.all.length, 1);
    mock.timers.tick(1);
    assert.equal(FakeSocket.all.length, 2);
  });

  test("a refused resubscribe is retried (transient) or ends the topic (permanent), never stuck", () => {
    const c = makeClient(["ws://a/"], { pingInterval: 60_000, pingTimeout: 60_000 });
    const errors = [];
    const got = [];
    c.on("error", (e) => errors.push(e));
    c.subscribe("t", (_p, { seq }) => got.push(["t", seq]));
    c.subscribe("u", (_p, { seq }) => got.push(["u", seq]));
    c.connect();
    const first = FakeSocket.all[0];
    first.accept();
    first.deliver({ type: "subscribed", topic: "t", id: 1, epoch: "e", seq: 3, recovered: false });
    first.deliver({ type: "subscribed", topic: "u", id: 2, epoch: "e", seq: 0, recovered: false });
    first.serverClose(1006);
    mock.timers.tick(50);
    const second = FakeSocket.all[1];
    second.accept();
    const [t, u] = second.frames("subscribe");
    assert.deepEqual([t.since, u.since], [{ epoch: "e", seq: 3 }, { epoch: "e", seq: 0 }]);
    second.deliver({ type: "error", id: t.id, code: "unavailable", message: "shard away" });
    second.deliver({ type: "error", id: u.id, code: "forbidden", message: "no" });
    assert.deepEqual(errors.map((e) => [e.topic, e.code, e.final]), [["t", "unavailable", false], ["u", "forbidden", true]]);
    assert.deepEqual(c.topics, ["t"]);
    advance(2500); // the retry is due after max(minDelay, 0.5 × cap(0)) = 100 ms, sent at the next tick (every 2.5 s here)
    const again = second.frames("subscribe").at(-1);
    assert.deepEqual([again.topic, again.since], ["t", { epoch: "e", seq: 3 }]);
    second.deliver({ type: "subscribed", topic: "t", id: again.id, epoch: "e", seq: 4, recovered: true });
    second.deliver({ topic: "t", payload: 0, seq: 4 });
    second.deliver({ topic: "u", payload: 0, seq: 1 });
    assert.deepEqual(got, [["t", 4]]);
  });

  test("a subscription the server withdraws ends", () => {
    const c = makeClient(["ws://a/"]);
    const errors = [];
    c.on("error", (e) => errors.push(e));
    c.subscribe("t", () => {});
    c.connect();
    const ws = FakeSocket.all[0];
    ws.accept();
    ws.deliver({ type: "subscribed", topic: "t", id: 1, epoch: "e", seq: 0, recovered: false });
    ws.deliver({ type: "unsubscribed", topic: "t" });
    assert.deepEqual(errors.map((e) => [e.topic, e.code, e.final]), [["t", "unsubscribed", true]]);
    assert.deepEqual(c.topics, []);
  });

  test("4001 stops reconnecting; 1012 reconnects within the restart window", () => {
    const c = makeClient(["ws://a/"]);
    c.connect();
    FakeSocket.all[0].accept();
    FakeSocket.all[0].serverClose(1012, "draining");
    assert.ok(c.lastClose.code === 1012);
    mock.timers.tick(RESTART_WINDOW);
    assert.equal(FakeSocket.all.length, 2);
    FakeSocket.all[1].open();
    FakeSocket.all[1].serverClose(4001, "unauthorized");
    assert.equal(c.state, "disconnected");
    mock.timers.tick(60_000);
    assert.equal(FakeSocket.all.length, 2);
  });

  test("backoff grows while attempts fail and resets only after a healthy period", () => {
    const delays = [];
    const c = makeClient(["ws://a/"], { resetAfter: 5000 });
    c.on("disconnected", (d) => delays.push(d.delay));
    c.connect();
    for (let i = 0; i < 4; i++) {
      FakeSocket.all.at(-1).serverClose(1006);
      mock.timers.tick(delays.at(-1));
    }
    assert.deepEqual(delays, [50, 100, 200, 400]);
    FakeSocket.all.at(-1).accept();
    mock.timers.tick(1000); // up, but not for long
    FakeSocket.all.at(-1).serverClose(1006);
    assert.equal(delays.at(-1), 500); // cap(4) = min(1000, 1600) = 1000, × 0.5
  });

  test("a connection that goes silent is dropped by the heartbeat deadline", () => {
    const c = makeClient(["ws://a/"], { pingInterval: 1000, pingTimeout: 500 });
    const disconnects = [];
    c.on("disconnected", (d) => disconnects.push(d));
    c.connect();
    const ws = FakeSocket.all[0];
    ws.accept();
    advance(1000);
    assert.equal(ws.frames("ping").length, 1);
    ws.deliver({ type: "pong", ts: 1 }); // alive
    advance(1000); // the next ping goes out, and nothing comes back...
    assert.equal(ws.frames("ping").length, 2);
    advance(450);
    assert.equal(c.state, "connected");
    advance(200); // ...for more than pingTimeout after it (checked every 125 ms)
    assert.equal(disconnects.length, 1);
    assert.equal(disconnects[0].code, 4009);
    assert.equal(ws.closed.code, 4009);
  });

  test("any frame counts as an answer to a ping", () => {
    const c = makeClient(["ws://a/"], { pingInterval: 1000, pingTimeout: 500 });
    c.subscribe("t", () => {});
    c.connect();
    const ws = FakeSocket.all[0];
    ws.accept();
    ws.deliver({ type: "subscribed", topic: "t", id: 1, epoch: "e", seq: 0, recovered: false });
    for (let seq = 1; seq <= 40; seq++) {
      advance(100);
      ws.deliver({ topic: "t", payload: seq, seq }); // messages, never a pong
    }
    assert.equal(c.state, "connected");
    assert.ok(ws.frames("ping").length >= 3);
  });

  test("a healthy connection resets the backoff", () => {
    const delays = [];
    const c = makeClient(["ws://a/"], { resetAfter: 5000, pingInterval: 1000, pingTimeout: 1000 });
    c.on("disconnected", (d) => delays.push(d.delay));
    c.connect();
    for (let i = 0; i < 3; i++) {
      FakeSocket.all.at(-1).serverClose(1006);
      mock.timers.tick(delays.at(-1));
    }
    const ws = FakeSocket.all.at(-1);
    ws.accept();
    for (let i = 0; i < 6; i++) {
      advance(1000);
      ws.deliver({ type: "pong", ts: i });
    }
    assert.equal(c.state, "connected");
    ws.serverClose(1001);
    assert.deepEqual(delays, [50, 100, 200, 50]);
  });

  test("publish resolves to the seq, rejects at once on a definite refusal", async () => {
    const c = makeClient(["ws://a/"]);
    c.connect();
    const ws = FakeSocket.all[0];
    const queued = c.publish("t", { x: 1 }); // before `connected`: held
    ws.accept();
    const [p1] = ws.frames("publish");
    assert.deepEqual(p1.payload, { x: 1 });
    assert.match(p1.idem, /^[A-Za-z0-9_-]{16}-1$/); // the client's random prefix, then a counter
    ws.deliver({ type: "published", topic: "t", id: p1.id, seq: 42 });
    assert.equal(await queued, 42);

    const refused = c.publish("t", 1);
    ws.deliver({ type: "error", id: ws.frames("publish")[1].id, code: "forbidden", message: "no" });
    await assert.rejects(refused, (e) => e instanceof FanrouteError && e.code === "forbidden");
    advance(2000);
    assert.equal(ws.frames("publish").length, 2); // not sent again
    await assert.rejects(c.publish("bad topic", 1), (e) => e.code === "bad_request");
    await assert.rejects(c.publish("t", 1, { idem: "" }), (e) => e.code === "bad_request");
    await assert.rejects(c.publish("t", 1, { idem: "x".repeat(65) }), (e) => e.code === "bad_request");
    assert.equal(ws.frames("publish").length, 2);
  });

  test("a publication whose connection drops before the answer is sent again with its key after the reconnect", async () => {
    const c = makeClient(["ws://a/", "ws://b/"]);
    c.connect();
    const first = FakeSocket.all[0];
    first.accept();
    const seq = c.publish("t", "once", { idem: "order-7" });
    const [sent] = first.frames("publish");
    assert.equal(sent.idem, "order-7");
    first.serverClose(1006); // the gateway may have applied it: the answer is lost
    let settled = false;
    seq.then(() => { settled = true; }, () => { settled = true; });
    mock.timers.tick(50);
    const second = FakeSocket.all[1];
    second.accept();
    const [again] = second.frames("publish");
    assert.deepEqual(again, { ...sent, id: again.id }); // same topic, payload and key
    await Promise.resolve();
    assert.equal(settled, false);
    second.deliver({ type: "published", topic: "t", id: again.id, seq: 9 }); // the original's seq
    assert.equal(await seq, 9);
    assert.equal(c.stats.retries, 1);
  });

  test("unavailable and outcome_unknown are retried with the same key after a backoff delay, within the budget", async () => {
    const c = makeClient(["ws://a/"]);
    c.connect();
    const ws = FakeSocket.all[0];
    ws.accept();
    const seq = c.publish("t", 1);
    const key = ws.frames("publish")[0].idem;
    ws.deliver({ type: "error", id: ws.frames("publish")[0].id, code: "unavailable", message: "shard away" });
    assert.equal(ws.frames("publish").length, 1);
    advance(300); // retried at max(minDelay, 0.5 × cap(0)) = 100 ms, on the next tick
    assert.equal(ws.frames("publish").length, 2);
    ws.deliver({ type: "error", id: ws.frames("publish")[1].id, code: "outcome_unknown", message: "link lost" });
    advance(300);
    const frames = ws.frames("publish");
    assert.equal(frames.length, 3);
    assert.deepEqual(frames.map((f) => f.idem), [key, key, key]);
    assert.equal(new Set(frames.map((f) => f.id)).size, 3);
    ws.deliver({ type: "published", topic: "t", id: frames[2].id, seq: 5 });
    assert.equal(await seq, 5);

    // The deadline: what was learnt last is the error.
    const late = c.publish("t", 2, { timeout: 1000 });
    ws.deliver({ type: "error", id: ws.frames("publish")[3].id, code: "outcome_unknown", message: "link lost" });
    ws.serverClose(1006); // no connection until the deadline
    advance(1000);
    await assert.rejects(late, (e) => e.code === "outcome_unknown");
  });

  test("a publication with no connection up rejects with timeout at its deadline; close() rejects held ones", async () => {
    const c = makeClient(["ws://a/"]);
    c.connect();
    const never = c.publish("t", 1, { timeout: 500 });
    advance(500);
    await assert.rejects(never, (e) => e.code === "timeout");
    const held = c.publish("t", 2);
    c.close();
    await assert.rejects(held, (e) => e.code === "closed");
    assert.equal(FakeSocket.all[0].frames("publish").length, 0);
  });

  test("unsubscribing the last handler unsubscribes on the wire", () => {
    const c = makeClient(["ws://a/"]);
    c.connect();
    const ws = FakeSocket.all[0];
    ws.accept();
    const off1 = c.subscribe("t", () => {});
    const off2 = c.subscribe("t", () => {});
    assert.equal(ws.frames("subscribe").length, 1);
    off1();
    off1();
    assert.equal(ws.frames("unsubscribe").length, 0);
    off2();
    assert.deepEqual(ws.frames("unsubscribe"), [{ type: "unsubscribe", topic: "t", id: 2 }]);
    assert.deepEqual(c.topics, []);
  });

  test("close() stops reconnecting and keeps the position for a later connect()", () => {
    const c = makeClient(["ws://a/"]);
    c.subscribe("t", () => {});
    c.connect();
    const ws = FakeSocket.all[0];
    ws.accept();
    ws.deliver({ type: "subscribed", topic: "t", id: 1, epoch: "e", seq: 3, recovered: false });
    c.close();
    assert.equal(ws.closed.code, 1000);
    assert.equal(c.state, "disconnected");
    mock.timers.tick(60_000);
    assert.equal(FakeSocket.all.length, 1);
    c.connect();
    FakeSocket.all[1].accept();
    assert.deepEqual(FakeSocket.all[1].frames("subscribe")[0].since, { epoch: "e", seq: 3 });
  });

  test("a throwing handler does not stop delivery to the others", () => {
    const c = makeClient(["ws://a/"]);
    const errors = [];
    const saved = globalThis.reportError;
    globalThis.reportError = (e) => errors.push(e);
    try {
      const got = [];
      c.subscribe("t", () => { throw new Error("boom"); });
      c.subscribe("t", (_p, { seq }) => got.push(seq));
      c.connect();
      const ws = FakeSocket.all[0];
      ws.accept();
      ws.deliver({ type: "subscribed", topic: "t", id: 1, epoch: "e", seq: 0, recovered: false });
      ws.deliver({ topic: "t", payload: 1, seq: 1 });
      assert.deepEqual(got, [1]);
      assert.equal(errors.length, 1);
    } finally {
      globalThis.reportError = saved;
    }
  });
});

// --- last, presence, subscription states, tokens -----------------------------------

// A JWT with only the claims the client reads (it never verifies one).
function fakeJwt(claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  return `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}.sig`;
}

test("tokenTtl reads exp without verifying; refreshDelay is a third of the life early", () => {
  assert.equal(tokenTtl(fakeJwt({ sub: "u", exp: 1030 }), 1_000_000), 30_000);
  assert.equal(tokenTtl(fakeJwt({ sub: "u" }), 0), null);
  for (const bad of ["", "a.b", "a.!!!.c", null]) assert.equal(tokenTtl(bad, 0), null);
  assert.equal(refreshDelay(3000), 2000);
  assert.equal(refreshDelay(3_600_000), 3_600_000 - 30_000);
  assert.equal(TOKEN_EXPIRED_REASON, "token expired");
});

describe("FanrouteClient: live features and tokens", () => {
  beforeEach(() => {
    FakeSocket.all = [];
    mock.timers.enable({ apis: ["setTimeout", "setInterval", "Date"], now: 1_000_000 });
  });
  afterEach(() => mock.timers.reset());

  test("last and presence go on the subscribe, and with since on every resubscribe", () => {
    const c = makeClient(["ws://a/"]);
    const got = [];
    const counts = [];
    c.on("presence", (d) => counts.push(["client", d.subscribers]));
    c.subscribe("t", (_p, { seq }) => got.push(seq), { last: 3, presence: true });
    c.getSubscription("t").on("presence", (d) => counts.push(["sub", d.subscribers]));
    c.connect();
    const ws = FakeSocket.all[0];
    ws.accept();
    assert.deepEqual(ws.frames("subscribe"), [{ type: "subscribe", topic: "t", id: 1, last: 3, presence: true }]);
    ws.deliver({ type: "subscribed", topic: "t", id: 1, epoch: "e", seq: 10, recovered: false });
    for (const seq of [8, 9, 10]) ws.deliver({ topic: "t", payload: seq, seq });
    ws.deliver({ type: "presence", topic: "t", subscribers: 4 });
    assert.deepEqual(got, [8, 9, 10]);
    assert.deepEqual(counts, [["sub", 4], ["client", 4]]);
    assert.equal(c.getSubscription("t").subscribers, 4);
    ws.serverClose(1006);
    mock.timers.tick(50);
    FakeSocket.all[1].accept();
    assert.deepEqual(FakeSocket.all[1].frames("subscribe"), [
      { type: "subscribe", topic: "t", id: 2, since: { epoch: "e", seq: 10 }, last: 3, presence: true },
    ]);
  });

  test("skipped is a legitimate gap: delivered with its count, no resubscribe", () => {
    const c = makeClient(["ws://a/"]);
    const got = [];
    c.subscribe("prices.X", (_p, ctx) => got.push([ctx.seq, ctx.skipped ?? 0]));
    c.connect();
    const ws = FakeSocket.all[0];
    ws.accept();
    ws.deliver({ type: "subscribed", topic: "prices.X", id: 1, epoch: "e", seq: 0, recovered: false });
    ws.deliver({ topic: "prices.X", payload: 1, seq: 1 });
    ws.deliver({ topic: "prices.X", payload: 9, seq: 9, skipped: 7 });
    assert.deepEqual(got, [[1, 0], [9, 7]]);
    assert.equal(ws.frames("subscribe").length, 1);
    assert.equal(c.stats.gaps, 0);
    assert.equal(c.stats.unrecovered, 0);
  });

  test("subscription states: unsubscribed, subscribing, subscribed, with events", () => {
    const c = makeClient(["ws://a/"]);
    const sub = c.newSubscription("t", { last: 1 });
    const states = [];
    sub.on("state", ({ state, previous }) => states.push(`${previous}>${state}`));
    const seen = [];
    sub.on("publication", (p) => seen.push(p.seq));
    assert.equal(sub.state, "unsubscribed");
    sub.subscribe();
    c.connect();
    const ws = FakeSocket.all[0];
    ws.accept();
    ws.deliver({ type: "subscribed", topic: "t", id: 1, epoch: "e", seq: 1, recovered: false });
    ws.deliver({ topic: "t", payload: 1, seq: 1 });
    ws.serverClose(1006); // the connection went: subscribing until the next answer
    mock.timers.tick(50);
    FakeSocket.all[1].accept();
    const again = FakeSocket.all[1].frames("subscribe")[0];
    FakeSocket.all[1].deliver({ type: "subscribed", topic: "t", id: again.id, epoch: "e", seq: 1, recovered: true });
    sub.unsubscribe();
    assert.deepEqual(states, [
      "unsubscribed>subscribing", "subscribing>subscribed", "subscribed>subscribing", "subscribing>subscribed", "subscribed>unsubscribed",
    ]);
    assert.deepEqual(seen, [1]);
    assert.deepEqual(FakeSocket.all[1].frames("unsubscribe").map((f) => f.topic), ["t"]);
    assert.deepEqual(c.topics, []);
  });

  test("a withdrawn subscription goes to unsubscribed with the code", () => {
    const c = makeClient(["ws://a/"]);
    const sub = c.newSubscription("t");
    const ended = [];
    sub.on("unsubscribed", (d) => ended.push(d.code));
    sub.subscribe();
    c.connect();
    FakeSocket.all[0].accept();
    FakeSocket.all[0].deliver({ type: "subscribed", topic: "t", id: 1, epoch: "e", seq: 0, recovered: false });
    FakeSocket.all[0].deliver({ type: "unsubscribed", topic: "t" });
    assert.equal(sub.state, "unsubscribed");
    assert.deepEqual(ended, ["unsubscribed"]);
  });

  test("getToken (sync): a token for every attempt, refreshed before exp on the same connection", () => {
    const calls = [];
    let n = 0;
    const c = makeClient(["ws://a/"], {
      pingInterval: 60_000, pingTimeout: 60_000,
      getToken: (ctx) => { calls.push(ctx.reason); n += 1; return fakeJwt({ sub: "u", n, exp: Date.now() / 1000 + 3 }); },
    });
    const refreshed = [];
    c.on("refreshed", (d) => refreshed.push(d.expires));
    const sub = c.newSubscription("t");
    sub.subscribe();
    c.connect();
    const ws = FakeSocket.all[0];
    ws.open();
    assert.equal(JSON.parse(Buffer.from(ws.sent[0].token.split(".")[1], "base64url")).n, 1);
    ws.deliver({ type: "connected", session: "s", ping_interval: 60, ping_timeout: 60 });
    ws.deliver({ type: "subscribed", topic: "t", id: 1, epoch: "e", seq: 0, recovered: false });
    advance(2100); // refreshed at 2/3 of 3 s (ticks every 250 ms: a quarter of the 1 s lead)
    const [r1] = ws.frames("refresh");
    assert.ok(r1, JSON.stringify(ws.sent));
    ws.deliver({ type: "refreshed", expires: 123, id: r1.id });
    assert.deepEqual(refreshed, [123]);
    advance(2100);
    assert.equal(ws.frames("refresh").length, 2);
    assert.deepEqual(calls, ["connect", "refresh", "refresh"]);
    assert.equal(sub.state, "subscribed");
    assert.equal(FakeSocket.all.length, 1);
  });

  test("getToken (async): a 4001 for an expired token reconnects with a new one; a refused one stops", async () => {
    let n = 0;
    const c = makeClient(["ws://a/"], { getToken: async () => fakeJwt({ sub: "u", n: ++n }) });
    const disconnects = [];
    c.on("disconnected", (d) => disconnects.push([d.code, d.reconnect]));
    c.connect();
    await Promise.resolve();
    await Promise.resolve();
    const first = FakeSocket.all[0];
    first.accept();
    first.serverClose(4001, TOKEN_EXPIRED_REASON);
    assert.deepEqual(disconnects, [[4001, true]]);
    mock.timers.tick(50);
    await Promise.resolve();
    await Promise.resolve();
    const second = FakeSocket.all[1];
    assert.ok(second, "reconnected");
    second.open();
    assert.equal(JSON.parse(Buffer.from(second.sent[0].token.split(".")[1], "base64url")).n, 2);
    second.serverClose(4001, "unauthorized");
    assert.deepEqual(disconnects, [[4001, true], [4001, false]]);
    assert.equal(c.state, "disconnected");
    mock.timers.tick(60_000);
    assert.equal(FakeSocket.all.length, 2);
  });

  test("getToken returning nothing stops the client; throwing retries with backoff", async () => {
    let answers = [new Error("token service down"), null];
    const c = makeClient(["ws://a/"], { getToken: () => { const a = answers.shift(); if (a instanceof Error) throw a; return a; } });
    const events = [];
    c.on("disconnected", (d) => events.push([d.code, d.reconnect]));
    c.on("error", (e) => events.push([e.code]));
    c.connect();
    assert.deepEqual(events, [["token"], [1006, true]]);
    mock.timers.tick(50);
    assert.deepEqual(events.at(-1), [4001, false]);
    assert.equal(c.state, "disconnected");
    assert.equal(FakeSocket.all.length, 0);
  });

  test("4003 is terminal with a token source too", () => {
    const c = makeClient(["ws://a/"], { getToken: () => fakeJwt({ sub: "u" }) });
    c.connect();
    FakeSocket.all[0].accept();
    FakeSocket.all[0].serverClose(4003, "disconnected by the server");
    mock.timers.tick(60_000);
    assert.equal(c.state, "disconnected");
    assert.equal(FakeSocket.all.length, 1);
  });

  test("presenceCount asks the gateway and resolves to the count", async () => {
    const c = makeClient(["ws://a/"]);
    c.connect();
    const ws = FakeSocket.all[0];
    ws.accept();
    const count = c.presenceCount("live.1");
    const [q] = ws.frames("presence");
    assert.equal(q.topic, "live.1");
    ws.deliver({ type: "presence", topic: "live.1", subscribers: 7, id: q.id });
    assert.equal(await count, 7);
  });
});
