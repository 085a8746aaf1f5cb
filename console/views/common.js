// Pieces several views share: state badges, error boxes, empty states, the confirm
// dialog, and the chat-message rendering (bubbles, tool cards, audio players).

import { h, replace } from '../dom.js';
import { t } from '../i18n.js';
import { describeError, request } from '../api.js';
import { formatFull, formatTime } from '../time.js';

/** online / in_session / in_call / offline (session_ended reads as online). */
export function normalState(state) {
  if (state === 'session_ended') return 'online';
  if (state === 'online' || state === 'in_session' || state === 'in_call' || state === 'offline') return state;
  return 'unknown';
}

export function stateLabel(state) {
  return t(`state.${normalState(state)}`);
}

/** A state badge; `testid` names it for tests. */
export function stateBadge(state, testid) {
  const s = normalState(state);
  return h('span', { class: `badge badge-${s}`, testid, dataset: { state: s } }, stateLabel(s));
}

export function setBadge(el, state) {
  const s = normalState(state);
  el.className = `badge badge-${s}`;
  el.dataset.state = s;
  el.textContent = stateLabel(s);
}

/** An error box: what happened and what to do, the server's words, and a retry. */
export function errorBox(err, { retry, testid = 'error' } = {}) {
  const d = describeError(err);
  return h('div', { class: 'error-box', role: 'alert', testid },
    h('p', { class: 'error-message', text: d.message }),
    d.detail ? h('p', { class: 'error-detail' }, h('code', { text: d.detail })) : null,
    retry ? h('button', { type: 'button', class: 'btn', text: t('common.retry'), on: { click: retry } }) : null);
}

export function emptyState(title, text, testid = 'empty') {
  return h('div', { class: 'empty', testid },
    h('p', { class: 'empty-title', text: title }),
    text ? h('p', { class: 'empty-text', text }) : null);
}

export function loading(testid = 'loading') {
  return h('p', { class: 'loading', testid, role: 'status', text: t('common.loading') });
}

/**
 * Asks for confirmation in the page's <dialog> (not window.confirm, so tests and
 * keyboards can answer it). Resolves true when confirmed.
 */
export function confirmDialog({ title, text, confirmLabel }) {
  const dialog = document.getElementById('confirm-dialog');
  const ok = document.getElementById('confirm-ok');
  const cancel = document.getElementById('confirm-cancel');
  document.getElementById('confirm-title').textContent = title;
  document.getElementById('confirm-text').textContent = text;
  ok.textContent = confirmLabel;
  cancel.textContent = t('dialog.cancel');
  return new Promise((resolve) => {
    const done = (answer) => {
      ok.removeEventListener('click', onOk);
      cancel.removeEventListener('click', onCancel);
      dialog.removeEventListener('cancel', onCancel);
      if (dialog.open) dialog.close();
      resolve(answer);
    };
    const onOk = () => done(true);
    const onCancel = (ev) => {
      if (ev) ev.preventDefault();
      done(false);
    };
    ok.addEventListener('click', onOk);
    cancel.addEventListener('click', onCancel);
    dialog.addEventListener('cancel', onCancel);
    dialog.showModal();
    cancel.focus();
  });
}

// --- messages ----------------------------------------------------------------------

const ROLES = { 1: 'user', 2: 'assistant', 3: 'tool' };

export function roleOf(m) {
  return ROLES[m.chat_type] || 'other';
}

/** Pretty-printed JSON when `s` is JSON, else `s`. */
function prettyJson(s) {
  try {
    return JSON.stringify(JSON.parse(s), null, 2);
  } catch {
    return s;
  }
}

/**
 * Audio players whose WAV is fetched (with the bearer header, into a blob URL) when
 * they come into view, or when play is pressed first. One per view; `dispose` revokes
 * the blob URLs.
 */
export class AudioLoader {
  constructor() {
    this.urls = [];
    this.observer = new IntersectionObserver((entries) => {
      for (const e of entries) {
        if (e.isIntersecting) this.load(e.target);
      }
    }, { rootMargin: '200px' });
    this.disposed = false;
  }

  player(audioId) {
    const audio = h('audio', {
      controls: true,
      preload: 'none',
      class: 'audio',
      testid: 'message-audio',
      dataset: { audioId, loaded: 'false' },
      'aria-label': t('msg.audio'),
    });
    const status = h('span', { class: 'audio-status', testid: 'audio-status' });
    audio.addEventListener('play', () => {
      if (audio.dataset.loaded !== 'true') {
        audio._wantPlay = true;
        this.load(audio);
      }
    });
    this.observer.observe(audio);
    audio._status = status;
    return h('div', { class: 'audio-row' }, audio, status);
  }

  async load(audio) {
    if (audio.dataset.loaded !== 'false' || this.disposed) return;
    audio.dataset.loaded = 'loading';
    this.observer.unobserve(audio);
    audio._status.textContent = t('msg.audioLoading');
    try {
      const blob = await request(`/api/history/audio/${encodeURIComponent(audio.dataset.audioId)}`, { as: 'blob' });
      if (this.disposed) return;
      const url = URL.createObjectURL(blob);
      this.urls.push(url);
      // The blob is local: read its header now, so the duration shows (and is known).
      audio.preload = 'metadata';
      audio.src = url;
      audio.dataset.loaded = 'true';
      audio._status.textContent = '';
      audio.load();
      if (audio._wantPlay) audio.play().catch(() => {});
    } catch (e) {
      if (this.disposed) return;
      audio.dataset.loaded = 'error';
      audio._status.textContent = describeError(e).message;
    }
  }

  dispose() {
    this.disposed = true;
    this.observer.disconnect();
    for (const u of this.urls.splice(0)) URL.revokeObjectURL(u);
  }
}

/** What a tool record is: a call (with the tool's name) or a result. */
function toolLabel(content) {
  try {
    const v = JSON.parse(content);
    const first = Array.isArray(v) ? v[0] : v;
    const name = first && first.function && first.function.name;
    if (typeof name === 'string') return t('msg.toolCall', { name });
    if (first && typeof first === 'object' && 'tool_call_id' in first) return t('msg.toolResult');
  } catch {
    /* not JSON: a plain tool record */
  }
  return t('msg.role.tool');
}

/** One chat message: a user / assistant bubble or a tool card. */
export function messageItem(m, audio) {
  const role = roleOf(m);
  const time = h('time', { class: 'msg-time', title: formatFull(m.created_at), text: formatTime(m.created_at) });
  const who = h('span', { class: 'msg-who', text: role === 'tool' ? toolLabel(m.content || '') : t(`msg.role.${role}`) });
  const body =
    role === 'tool'
      ? h('pre', { class: 'tool-json', testid: 'tool-json' }, h('code', { text: prettyJson(m.content || '') }))
      : h('p', { class: 'msg-text', text: m.content || '' });
  return h('li', {
    class: `msg msg-${role}`,
    testid: 'transcript-message',
    dataset: { id: m.id, role, sessionId: m.session_id || '' },
  },
  h('div', { class: role === 'tool' ? 'tool-card' : 'bubble' },
    h('div', { class: 'msg-head' }, who, time),
    body,
    m.audio_id && audio ? audio.player(m.audio_id) : null));
}

/**
 * A message list that appends rows it has not shown yet (by id). Returns the <ol> and
 * `add(messages)` (which returns how many were new) and `lastId()`.
 */
export function messageList(audio, testid) {
  const list = h('ol', { class: 'messages', testid, 'aria-live': 'polite' });
  const seen = new Set();
  let last = 0;
  return {
    el: list,
    add(messages) {
      let added = 0;
      for (const m of messages) {
        if (seen.has(m.id)) continue;
        seen.add(m.id);
        last = Math.max(last, m.id);
        list.appendChild(messageItem(m, audio));
        added++;
      }
      return added;
    },
    lastId: () => last,
    count: () => seen.size,
    clear() {
      seen.clear();
      last = 0;
      replace(list);
    },
  };
}
