// Unit tests of fanroute.js: the pure parts, and the client against a fake socket
// with mocked timers. Run: node --test gateway/static/tests/
import { test, describe, beforeEach, afterEach, mock } from "node:test";
import assert from "node:assert/strict";

import {
  Backoff,
  FanrouteClient,
  FanrouteError,
  RESTART_WINDOW,
  SeqTracker,
  isValidTopic,
  reconnectDelay,
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

  test("4001 and 1008 stop reconnecting", () => {
    assert.equal(reconnectDelay(4001, backoff()), null);
    assert.equal(reconnectDelay(1008, backoff()), null);
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

// --- SeqTracker --------------------------------------------------------------------

describe("SeqTracker", () => {
  test("a first subscribe starts at the stream's head", () => {
    const t = new SeqTracker();
    assert.equal(t.subscribing(), null);
    assert.equal(t.onMessage(3), "ignore"); // before the answer
    assert.equal(t.onSubscribed({ epoch: "e1", seq: 7, recovered: false }), null);
    assert.equal(t.onMessage(8), "deliver");
    assert.equal(t.onMessage(9), "deliver");
    assert.deepEqual(t.since(), { epoch: "e1", seq: 9 });
  });

  test("duplicates are dropped and counted", () => {
    const t = new SeqTracker();
    t.subscribing();
    t.onSubscribed({ epoch: "e", seq: 0, recovered: false });
    assert.equal(t.onMessage(1), "deliver");
    assert.equal(t.onMessage(1), "duplicate");
    assert.equal(t.onMessage(0), "duplicate");
    assert.equal(t.onMessage(2), "deliver");
    assert.equal(t.duplicates, 2);
  });

  test("a gap is reported and does not move the position", () => {
    const t = new SeqTracker();
    t.subscribing();
    t.onSubscribed({ epoch: "e", seq: 4, recovered: false });
    assert.equal(t.onMessage(5), "deliver");
    assert.equal(t.onMessage(7), "gap");
    assert.equal(t.gaps, 1);
    assert.deepEqual(t.since(), { epoch: "e", seq: 5 });
  });

  test("a recovered resubscribe continues from the last seen seq", () => {
    const t = new SeqTracker();
    t.subscribing();
    t.onSubscribed({ epoch: "e", seq: 2, recovered: false });
    t.onMessage(3);
    t.reset(); // connection lost
    assert.deepEqual(t.subscribing(), { epoch: "e", seq: 3 });
    assert.equal(t.onMessage(9), "ignore"); // stale, before the answer
    assert.equal(t.onSubscribed({ epoch: "e", seq: 6, recovered: true }), null);
    assert.deepEqual([4, 5, 6, 7].map((s) => t.onMessage(s)), ["deliver", "deliver", "deliver", "deliver"]);
  });

  test("an unrecovered resubscribe jumps to the new head and says what was lost", () => {
    const t = new SeqTracker();
    t.subscribing();
    t.onSubscribed({ epoch: "e", seq: 10, recovered: false });
    t.subscribing();
    const lost = t.onSubscribed({ epoch: "f", seq: 3, recovered: false });
    assert.deepEqual(lost, { epoch: "f", seq: 3, previous: { epoch: "e", seq: 10 } });
    assert.equal(t.onMessage(4), "deliver");
  });

  test("the gateway's unsolicited subscribed restarts the stream", () => {
    const t = new SeqTracker();
    t.subscribing();
    t.onSubscribed({ epoch: "e", seq: 1, recovered: false });
    t.onMessage(2);
    const lost = t.onSubscribed({ epoch: "g", seq: 0, recovered: false }, false);
    assert.deepEqual(lost, { epoch: "g", seq: 0, previous: { epoch: "e", seq: 2 } });
    assert.equal(t.onMessage(1), "deliver");
  });

  test("an unsolicited subscribed while our own subscribe is in flight is ignored", () => {
    const t = new SeqTracker();
    t.subscribing();
    t.onSubscribed({ epoch: "e", seq: 1, recovered: false });
    t.subscribing();
    assert.equal(t.onSubscribed({ epoch: "g", seq: 0, recovered: false }, false), null);
    assert.equal(t.awaiting, true);
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
    assert.deepEqual(ws.frames("unsubscribe"), [{ type: "unsubscribe", topic: "t" }]);
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

  test("publish resolves to the seq, rejects on error and on a lost connection", async () => {
    const c = makeClient(["ws://a/"]);
    c.connect();
    const ws = FakeSocket.all[0];
    const queued = c.publish("t", { x: 1 }); // before `connected`: queued
    ws.accept();
    const [p1] = ws.frames("publish");
    assert.deepEqual(p1.payload, { x: 1 });
    ws.deliver({ type: "published", topic: "t", id: p1.id, seq: 42 });
    assert.equal(await queued, 42);

    const refused = c.publish("t", 1);
    ws.deliver({ type: "error", id: ws.frames("publish")[1].id, code: "forbidden", message: "no" });
    await assert.rejects(refused, (e) => e instanceof FanrouteError && e.code === "forbidden");

    const lost = c.publish("t", 2);
    ws.serverClose(1006);
    await assert.rejects(lost, (e) => e.code === "disconnected");
    await assert.rejects(c.publish("bad topic", 1), (e) => e.code === "bad_request");
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
    assert.deepEqual(ws.frames("unsubscribe"), [{ type: "unsubscribe", topic: "t" }]);
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
