// Type declarations for fanroute.js, the browser client of fanroute (protocol v1).
// All times are in milliseconds.

export declare const CLOSE_NORMAL: 1000;
export declare const CLOSE_POLICY: 1008;
export declare const CLOSE_RESTART: 1012;
export declare const CLOSE_TRY_AGAIN: 1013;
export declare const CLOSE_UNAUTHORIZED: 4001;
export declare const CLOSE_SLOW_CONSUMER: 4008;
export declare const CLOSE_HEARTBEAT_TIMEOUT: 4009;
export declare const CLOSE_RATE_LIMIT: 4029;
/** Close codes after which the client stops reconnecting (4001, 1008). */
export declare const TERMINAL_CLOSE_CODES: ReadonlySet<number>;
/** 1012 (a gateway draining): the client returns at a random moment within this window. */
export declare const RESTART_WINDOW: number;

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
export declare function reconnectDelay(code: number, backoff: Backoff, random?: () => number): number | null;

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

/** Where one topic's stream stands; pure (no I/O). */
export declare class SeqTracker {
  epoch: string | null;
  seq: number;
  awaiting: boolean;
  resuming: boolean;
  duplicates: number;
  gaps: number;
  since(): Position | null;
  subscribing(): Position | null;
  reset(): void;
  onSubscribed(event: { epoch: string; seq: number; recovered: boolean }, solicited?: boolean): LostRange | null;
  onMessage(seq: number): "deliver" | "duplicate" | "gap" | "ignore";
}

/** An `error` frame from the gateway, or a request that could not complete. */
export declare class FanrouteError extends Error {
  /** bad_request, unauthorized, forbidden, rate_limited, too_large, unavailable,
   * or, from the client itself: disconnected, closed, timeout. */
  readonly code: string;
  readonly reason: string;
}

export interface ClientOptions {
  /** JWT sent in the `connect` frame. */
  token?: string;
  /** Reconnect backoff: cap of the first draw (default 100). */
  minDelay?: number;
  /** Reconnect backoff: largest delay (default 10000). */
  maxDelay?: number;
  /** A connection up this long resets the backoff (default 5000). */
  resetAfter?: number;
  /** Interval of the client's `ping` (default: the gateway's ping_interval). */
  pingInterval?: number;
  /** The connection is dead when nothing arrived for this long after a ping
   * (so silence is noticed within about pingInterval + pingTimeout;
   * default: the gateway's ping_timeout). */
  pingTimeout?: number;
  /** An attempt that got no `connected` within this is abandoned (default 10000). */
  connectTimeout?: number;
  /** Default timeout of publish() (default 10000). */
  publishTimeout?: number;
  /** The WebSocket class (default globalThis.WebSocket): for Node or tests. */
  WebSocket?: { new (url: string): WebSocket };
  /** Uniform [0, 1) source for jitter and the first URL (default Math.random). */
  random?: () => number;
}

export type State = "disconnected" | "connecting" | "connected";

export interface MessageContext {
  topic: string;
  seq: number;
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
  /** An error frame not tied to a publish, or a refused subscribe (with topic). */
  error: { code: string; message: string; topic?: string };
}

export declare class FanrouteClient {
  constructor(urls: string | string[], options?: ClientOptions);
  readonly urls: string[];
  readonly state: State;
  /** The gateway connected to, or null. */
  readonly url: string | null;
  readonly session: string | null;
  readonly lastClose: { code: number; reason: string } | null;
  readonly stats: { connects: number; duplicates: number; gaps: number; unrecovered: number };
  readonly topics: string[];
  readonly backoff: Backoff;

  connect(): void;
  /** Stops reconnecting; subscriptions are kept for a later connect(). */
  close(code?: number, reason?: string): void;
  /** Returns a function that unsubscribes this handler. */
  subscribe<T = unknown>(topic: string, handler: (payload: T, context: MessageContext) => void): () => void;
  /** Resolves to the seq the cluster gave the publication. */
  publish(topic: string, payload: unknown, options?: { timeout?: number }): Promise<number>;
  position(topic: string): Position | null;
  on<K extends keyof ClientEvents>(event: K, handler: (detail: ClientEvents[K]) => void): () => void;
  off<K extends keyof ClientEvents>(event: K, handler: (detail: ClientEvents[K]) => void): void;
}
