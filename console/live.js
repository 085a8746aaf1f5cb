// The /ws/admin feed: one WebSocket, authenticated with the subprotocols
// ["xiaozhi-admin", "bearer.<token>"], reconnected with exponential backoff (1 s, 2 s,
// 4 s ... at most 30 s), and an event bus the views subscribe to:
//
//   presence, chat_update, upstream_failure: the feed's messages, by `type`;
//   status: {state: 'connecting' | 'live' | 'reconnecting' | 'stopped', inSeconds, tooSlow};
//   reconnected: the feed is back after a gap (views re-read what they may have missed).

const MIN_BACKOFF_MS = 1000;
const MAX_BACKOFF_MS = 30000;
/** Close code the gateway uses for a consumer that fell behind. */
export const CLOSE_TOO_SLOW = 1013;

export class LiveFeed {
  constructor() {
    this.listeners = new Map();
    this.ws = null;
    this.token = '';
    this.backoff = MIN_BACKOFF_MS;
    this.retryTimer = null;
    this.tickTimer = null;
    this.everOpened = false;
    this.stopped = true;
    this.status = { state: 'stopped', inSeconds: 0, tooSlow: false };
  }

  /** Subscribes to one event type; returns the unsubscribe function. */
  on(type, fn) {
    if (!this.listeners.has(type)) this.listeners.set(type, new Set());
    this.listeners.get(type).add(fn);
    return () => this.listeners.get(type)?.delete(fn);
  }

  emit(type, data) {
    for (const fn of [...(this.listeners.get(type) || [])]) {
      try {
        fn(data);
      } catch (e) {
        // A view's bug must not stop the others from hearing the event.
        console.warn(`live ${type} listener failed`, e);
      }
    }
  }

  setStatus(status) {
    this.status = status;
    this.emit('status', status);
  }

  start(token) {
    this.stop();
    this.token = token;
    this.stopped = false;
    this.backoff = MIN_BACKOFF_MS;
    this.everOpened = false;
    this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    clearInterval(this.tickTimer);
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.onopen = ws.onclose = ws.onmessage = ws.onerror = null;
      try {
        ws.close(1000, 'signed out');
      } catch {
        /* already closed */
      }
    }
    this.setStatus({ state: 'stopped', inSeconds: 0, tooSlow: false });
  }

  url() {
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    return `${scheme}//${location.host}/ws/admin`;
  }

  connect() {
    if (this.stopped) return;
    this.setStatus({ state: 'connecting', inSeconds: 0, tooSlow: false });
    let ws;
    try {
      ws = new WebSocket(this.url(), ['xiaozhi-admin', `bearer.${this.token}`]);
    } catch {
      this.scheduleRetry(false);
      return;
    }
    this.ws = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
      const wasBack = this.everOpened;
      this.everOpened = true;
      this.backoff = MIN_BACKOFF_MS;
      this.setStatus({ state: 'live', inSeconds: 0, tooSlow: false });
      if (wasBack) this.emit('reconnected', {});
    };
    ws.onmessage = (ev) => {
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (msg && typeof msg.type === 'string') this.emit(msg.type, msg);
    };
    ws.onerror = () => {
      /* the close event follows and says what to do */
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.scheduleRetry(ev.code === CLOSE_TOO_SLOW);
      // Refused before it opened: maybe the token is no longer accepted.
      if (!opened) this.emit('refused', {});
    };
  }

  scheduleRetry(tooSlow) {
    if (this.stopped) return;
    const delay = this.backoff;
    this.backoff = Math.min(this.backoff * 2, MAX_BACKOFF_MS);
    const due = Date.now() + delay;
    const tick = () => {
      const inSeconds = Math.max(0, Math.ceil((due - Date.now()) / 1000));
      this.setStatus({ state: 'reconnecting', inSeconds, tooSlow });
    };
    tick();
    clearInterval(this.tickTimer);
    this.tickTimer = setInterval(tick, 1000);
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => {
      clearInterval(this.tickTimer);
      this.connect();
    }, delay);
  }

  /** Reconnects now (the user pressed "reconnect"). */
  retryNow() {
    if (this.stopped || this.ws) return;
    clearTimeout(this.retryTimer);
    clearInterval(this.tickTimer);
    this.connect();
  }
}

export const live = new LiveFeed();
