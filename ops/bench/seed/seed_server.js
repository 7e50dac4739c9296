// The source design's Node server (ws), adapted to explicit subscribes: the yardstick
// `fanroute bench` runs beside fanroute as the "seed" target.
//
// It is the design's router as written — one Map of topic -> Set of sockets, JSON
// in and out, a send per subscriber — with the one change the benchmark needs: a
// client subscribes with {"type":"subscribe","topic":T,"id":N} (answered with
// {"type":"subscribed",...}) instead of by publishing to a topic, and a delivery
// carries its seq, so the same load generator drives fanroute, the websockets
// reference and this server. The frame of a delivery is built once per publication
// and sent to every subscriber, as ws's own broadcast example does.
//
//   node ops/bench/seed/seed_server.js --port 8766
'use strict';
const { WebSocketServer } = require('ws');

function arg(name, fallback) {
  const i = process.argv.indexOf(name);
  return i > 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

const host = arg('--host', '127.0.0.1');
const port = Number(arg('--port', '8766'));
const backlog = Number(arg('--backlog', '4096'));
const topics = new Map(); // topic -> Set of sockets
const seqs = new Map(); // topic -> last seq

function reply(ws, frame) {
  ws.send(JSON.stringify(frame));
}

const wss = new WebSocketServer({ host, port, backlog, perMessageDeflate: false, maxPayload: 64 * 1024 });
wss.on('connection', (ws) => {
  const mine = new Set();
  ws.on('message', (data, isBinary) => {
    let msg;
    try {
      msg = JSON.parse(isBinary ? data : String(data));
    } catch {
      reply(ws, { type: 'error', code: 'bad_request', message: 'not JSON' });
      return;
    }
    if (msg === null || typeof msg !== 'object') return;
    const kind = msg.type === undefined ? 'publish' : msg.type;
    const topic = msg.topic;
    if (kind === 'ping') {
      reply(ws, { type: 'pong', ts: msg.ts });
    } else if (kind === 'publish' && typeof topic === 'string' && msg.payload !== undefined) {
      const seq = (seqs.get(topic) || 0) + 1;
      seqs.set(topic, seq);
      const frame = JSON.stringify({ topic, payload: msg.payload, seq });
      const subs = topics.get(topic);
      if (subs) {
        for (const client of subs) {
          if (client.readyState === 1) client.send(frame);
        }
      }
      if (msg.id !== undefined) reply(ws, { type: 'published', topic, id: msg.id, seq });
    } else if (kind === 'subscribe' && typeof topic === 'string') {
      if (!topics.has(topic)) topics.set(topic, new Set());
      topics.get(topic).add(ws);
      mine.add(topic);
      const answer = { type: 'subscribed', topic, epoch: 'seed', seq: seqs.get(topic) || 0, recovered: false };
      if (msg.id !== undefined) answer.id = msg.id;
      reply(ws, answer);
    } else if (kind === 'unsubscribe' && typeof topic === 'string') {
      const subs = topics.get(topic);
      if (subs) subs.delete(ws);
      mine.delete(topic);
      reply(ws, { type: 'unsubscribed', topic, id: msg.id });
    } else {
      reply(ws, { type: 'error', code: 'bad_request', message: 'unknown command' });
    }
  });
  ws.on('close', () => {
    for (const topic of mine) {
      const subs = topics.get(topic);
      if (subs) subs.delete(ws);
    }
  });
});
wss.on('listening', () => {
  console.log(`seed ws://${host}:${wss.address().port}/`);
});
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => process.exit(0));
}
