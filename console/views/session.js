// One conversation: its messages in order (user and assistant bubbles, tool cards), an
// audio player per recorded utterance, and new messages as they are stored.

import { h, replace } from '../dom.js';
import { t } from '../i18n.js';
import { get } from '../api.js';
import { live } from '../live.js';
import { formatDuration, formatFull, formatNumber, parseHistoryTime } from '../time.js';
import { AudioLoader, emptyState, errorBox, loading, messageList, roleOf } from './common.js';

export function render(container, params, scope) {
  const id = params.id;
  document.title = t('title.session');
  const audio = new AudioLoader();
  scope.add(() => audio.dispose());
  const list = messageList(audio, 'session-messages');
  const meta = h('div', { class: 'session-meta', testid: 'session-meta' });
  const deviceCrumb = h('span');
  const body = h('div', {}, loading());
  const liveNote = h('p', { class: 'help', testid: 'session-live-note', text: t('session.liveNote') });
  let mac = '';
  let first = null;
  let last = null;
  const counts = { user: 0, assistant: 0, tool: 0, audio: 0 };

  replace(
    container,
    h('section', { class: 'view view-session', testid: 'view-session', dataset: { sessionId: id } },
      h('p', { class: 'breadcrumb' }, h('a', { href: '#/fleet', text: t('nav.fleet') }), deviceCrumb, ' / ', h('span', { text: t('session.title') })),
      h('div', { class: 'view-head' }, h('h1', { text: t('session.title') })),
      h('p', { class: 'mono session-id', testid: 'session-id', text: id }),
      meta,
      h('section', { class: 'card' }, body, liveNote)),
  );

  function renderMeta() {
    if (!first) {
      replace(meta);
      return;
    }
    const start = parseHistoryTime(first.created_at);
    const end = parseHistoryTime(last.created_at);
    const fact = (key, value, testid) => [h('dt', { text: t(key) }), h('dd', { testid, text: value })];
    replace(meta, h('dl', { class: 'facts facts-inline' },
      mac ? [h('dt', { text: t('session.device') }), h('dd', {}, h('a', { href: `#/device/${mac}`, class: 'mono', testid: 'session-device', text: mac }))] : null,
      fact('session.started', formatFull(first.created_at), 'session-started'),
      fact('session.duration', start && end ? formatDuration(end - start) : t('common.unknown'), 'session-duration'),
      fact('session.messages', t('session.counts', {
        user: formatNumber(counts.user), assistant: formatNumber(counts.assistant), tool: formatNumber(counts.tool),
      }), 'session-counts'),
      fact('session.audio', formatNumber(counts.audio), 'session-audio-count')));
    replace(deviceCrumb, mac ? [' / ', h('a', { href: `#/device/${mac}`, class: 'mono', text: mac })] : []);
  }

  function addMessages(messages) {
    const fresh = messages.filter((m) => m.id > list.lastId());
    if (!list.add(messages)) return 0;
    for (const m of fresh) {
      const role = roleOf(m);
      if (role in counts) counts[role]++;
      if (m.audio_id) counts.audio++;
      if (!first) first = m;
      last = m;
      if (!mac && m.mac_address) mac = m.mac_address;
    }
    return fresh.length;
  }

  let pulling = false;
  let again = false;
  let loaded = false;

  async function pull() {
    if (pulling) {
      again = true;
      return;
    }
    pulling = true;
    try {
      do {
        again = false;
        let after = list.lastId();
        for (let page = 0; page < 100; page++) {
          const res = await get(`/api/history/sessions/${encodeURIComponent(id)}/messages`, { after_id: after, limit: 500 });
          if (!scope.alive) return;
          const atBottom = window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 40;
          const added = addMessages(res.messages || []);
          if (!loaded) {
            loaded = true;
            replace(body, list.el);
          }
          if (added && atBottom && page === 0 && list.count() > added) {
            list.el.lastElementChild.scrollIntoView({ block: 'end' });
          }
          if (!res.next) break;
          after = res.next;
        }
        if (list.count() === 0) {
          replace(body, emptyState(t('session.empty'), t('session.emptyHelp'), 'session-empty'), list.el);
        } else if (!body.contains(list.el) || body.children.length > 1) {
          replace(body, list.el);
        }
        renderMeta();
      } while (again && scope.alive);
    } catch (e) {
      if (scope.alive && !loaded) replace(body, errorBox(e, { retry: pull, testid: 'session-error' }));
    } finally {
      pulling = false;
    }
  }

  scope.add(live.on('chat_update', (ev) => {
    if (ev && ev.session_id === id) pull();
  }));
  scope.add(live.on('reconnected', () => pull()));
  pull();
}
