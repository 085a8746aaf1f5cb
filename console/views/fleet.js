// Fleet: counts, the device table (search, state filter, keyset paging) and live
// updates from the feed's presence events.

import { h, replace } from '../dom.js';
import { t } from '../i18n.js';
import { get } from '../api.js';
import { live } from '../live.js';
import { formatDateTime, formatFull, formatNumber, localMidnightMs } from '../time.js';
import { emptyState, errorBox, normalState, setBadge, stateBadge } from './common.js';
import { pushForm, pushList } from './push.js';

const PAGE = 100;
/** The filters survive leaving the view and coming back. */
const filters = { q: '', state: '' };

const COLUMNS = [
  ['state', 'fleet.col.state'],
  ['mac', 'fleet.col.mac'],
  ['last_seen', 'fleet.col.lastSeen'],
  ['node', 'fleet.col.node'],
  ['board', 'fleet.col.board'],
  ['firmware', 'fleet.col.firmware'],
  ['remote', 'fleet.col.remote'],
];

function cell(key, labelKey, ...children) {
  return h('td', { class: `col-${key}`, 'data-label': t(labelKey) }, ...children);
}

export function render(container, _params, scope) {
  document.title = t('title.fleet');
  const rows = new Map(); // mac -> {data, tr}
  let next = null;
  let total = 0;
  let generation = 0; // drops answers to superseded queries

  const countEls = {
    connected: h('span', { class: 'count-value', testid: 'fleet-count-online', text: '–' }),
    in_session: h('span', { class: 'count-value', testid: 'fleet-count-in-session', text: '–' }),
    in_call: h('span', { class: 'count-value', testid: 'fleet-count-in-call', text: '–' }),
    offline: h('span', { class: 'count-value', testid: 'fleet-count-offline', text: '–' }),
  };
  const countCard = (key, labelKey, helpKey) =>
    h('div', { class: 'count-card', testid: `fleet-count-card-${key}` },
      h('span', { class: 'count-label', text: t(labelKey) }),
      countEls[key],
      h('span', { class: 'count-help', text: t(helpKey) }));

  const search = h('input', {
    type: 'search',
    id: 'fleet-q',
    class: 'input',
    testid: 'fleet-search',
    maxlength: 64,
    placeholder: t('fleet.searchPlaceholder'),
    props: { value: filters.q },
  });
  const stateSelect = h('select', { id: 'fleet-state', class: 'input', testid: 'fleet-state-filter' },
    h('option', { value: '', text: t('fleet.filter.all') }),
    h('option', { value: 'online', text: t('state.online') }),
    h('option', { value: 'in_session', text: t('state.in_session') }),
    h('option', { value: 'in_call', text: t('state.in_call') }),
    h('option', { value: 'offline', text: t('fleet.filter.offlineToday') }));
  stateSelect.value = filters.state;

  const tbody = h('tbody', { testid: 'fleet-rows' });
  const status = h('p', { class: 'table-status', testid: 'fleet-status', role: 'status' });
  const more = h('button', { type: 'button', class: 'btn', testid: 'fleet-more', text: t('fleet.more'), hidden: true });
  const errorSlot = h('div');
  const table = h('table', { class: 'table fleet-table', testid: 'fleet-table' },
    h('caption', { class: 'visually-hidden', text: t('fleet.caption') }),
    h('thead', {}, h('tr', {}, COLUMNS.map(([key, label]) => h('th', { scope: 'col', class: `col-${key}`, text: t(label) })))),
    tbody);

  replace(
    container,
    h('section', { class: 'view view-fleet', testid: 'view-fleet' },
      h('div', { class: 'view-head' }, h('h1', { text: t('fleet.title') })),
      h('div', { class: 'counts', testid: 'fleet-counts' },
        countCard('connected', 'fleet.count.online', 'fleet.count.onlineHelp'),
        countCard('in_session', 'fleet.count.inSession', 'fleet.count.inSessionHelp'),
        countCard('in_call', 'fleet.count.inCall', 'fleet.count.inCallHelp'),
        countCard('offline', 'fleet.count.offline', 'fleet.count.offlineHelp')),
      h('div', { class: 'toolbar' },
        h('div', { class: 'field' }, h('label', { for: 'fleet-q', class: 'label', text: t('fleet.search') }), search),
        h('div', { class: 'field' }, h('label', { for: 'fleet-state', class: 'label', text: t('fleet.filter.label') }), stateSelect)),
      errorSlot,
      h('div', { class: 'table-wrap' }, table),
      h('div', { class: 'table-foot' }, status, more),
      fleetPush(scope)),
  );

  function renderCounts(counts) {
    if (!counts) return;
    countEls.connected.textContent = formatNumber(counts.connected);
    countEls.in_session.textContent = formatNumber(counts.in_session);
    countEls.in_call.textContent = formatNumber(counts.in_call || 0);
    countEls.offline.textContent = formatNumber(counts.offline);
  }

  function rowFor(d) {
    const badge = stateBadge(d.state, 'row-state');
    const lastSeen = h('time', { class: 'last-seen' });
    const remote = h('span', { class: 'mono' });
    const tr = h('tr', {
      class: 'device-row',
      testid: 'device-row',
      dataset: { mac: d.mac_address, state: normalState(d.state) },
      on: {
        click: (ev) => {
          if (ev.target.closest('a, button')) return;
          location.hash = `#/device/${d.mac_address}`;
        },
      },
    },
    cell('state', 'fleet.col.state', badge),
    cell('mac', 'fleet.col.mac', h('a', { href: `#/device/${d.mac_address}`, class: 'mono', testid: 'device-link', text: d.mac_address })),
    cell('last_seen', 'fleet.col.lastSeen', lastSeen),
    cell('node', 'fleet.col.node', h('span', { class: 'cell-node' })),
    cell('board', 'fleet.col.board', h('span', { class: 'cell-board' })),
    cell('firmware', 'fleet.col.firmware', h('span', { class: 'cell-firmware' })),
    cell('remote', 'fleet.col.remote', remote));
    const row = { data: d, tr, badge, lastSeen, remote };
    fillRow(row);
    return row;
  }

  function fillRow(row) {
    const d = row.data;
    setBadge(row.badge, d.state);
    row.tr.dataset.state = normalState(d.state);
    row.lastSeen.textContent = d.last_seen_ms ? formatDateTime(d.last_seen_ms) : t('common.unknown');
    row.lastSeen.title = d.last_seen_ms ? formatFull(d.last_seen_ms) : '';
    row.tr.querySelector('.cell-node').textContent = d.node || '–';
    row.tr.querySelector('.cell-board').textContent = d.board || '–';
    row.tr.querySelector('.cell-firmware').textContent = d.firmware || '–';
    row.remote.textContent = d.remote || '–';
  }

  function renderStatus() {
    const shown = rows.size;
    if (shown === 0) {
      const filtered = filters.q || filters.state;
      replace(tbody, h('tr', { class: 'empty-row' }, h('td', { colspan: COLUMNS.length },
        filtered
          ? emptyState(t('fleet.emptyFiltered'), t('fleet.emptyFilteredHelp'), 'fleet-empty')
          : emptyState(t('fleet.empty'), t('fleet.emptyHelp'), 'fleet-empty'))));
    }
    status.textContent = shown ? t('fleet.showing', { shown: formatNumber(shown), total: formatNumber(Math.max(total, shown)) }) : '';
    more.hidden = !next;
  }

  async function load(append) {
    const gen = ++generation;
    more.disabled = true;
    if (!append) status.textContent = t('common.loading');
    try {
      const page = await get('/api/console/fleet', {
        q: filters.q,
        state: filters.state,
        since_ms: localMidnightMs(),
        after: append ? next : '',
        limit: PAGE,
      });
      if (!scope.alive || gen !== generation) return;
      replace(errorSlot);
      if (!append) {
        rows.clear();
        tbody.replaceChildren();
      }
      for (const d of page.devices || []) {
        if (rows.has(d.mac_address)) continue;
        const row = rowFor(d);
        rows.set(d.mac_address, row);
        tbody.appendChild(row.tr);
      }
      next = page.next || null;
      total = Number(page.total) || 0;
      renderCounts(page.counts);
      renderStatus();
    } catch (e) {
      if (!scope.alive || gen !== generation) return;
      status.textContent = '';
      replace(errorSlot, errorBox(e, { retry: () => load(append), testid: 'fleet-error' }));
    } finally {
      more.disabled = false;
    }
  }

  const reload = () => load(false);

  const refreshCounts = scope.debounce(async () => {
    try {
      const page = await get('/api/console/fleet', { since_ms: localMidnightMs(), limit: 1 });
      if (scope.alive) renderCounts(page.counts);
    } catch {
      /* the next event or reload tries again */
    }
  }, 1000);

  /** Whether a device record matches the filters (the server's rules, for new rows). */
  function matches(d) {
    if (filters.state && normalState(d.state) !== filters.state) return false;
    if (filters.state === 'offline' && d.last_seen_ms && d.last_seen_ms < localMidnightMs()) return false;
    if (!filters.q) return true;
    const q = filters.q.toLowerCase();
    return ['mac_address', 'client_id', 'group', 'node', 'remote', 'board', 'firmware']
      .some((k) => d[k] && String(d[k]).toLowerCase().includes(q));
  }

  /** A device not in the table yet: fetched in full, shown where it sorts (by MAC). */
  async function addDevice(ev) {
    const mac = ev.mac_address;
    // Beyond the loaded pages, "more" brings it in due course.
    if (next && mac > next) return;
    let d = {
      mac_address: mac,
      state: normalState(ev.state),
      client_id: ev.client_id,
      remote: ev.remote,
      last_seen_ms: ev.at_ms,
    };
    try {
      const info = await get(`/api/console/devices/${encodeURIComponent(mac)}`);
      if (info && info.presence) d = { ...info.presence, state: d.state, last_seen_ms: Math.max(d.last_seen_ms || 0, info.presence.last_seen_ms || 0) };
    } catch {
      /* shown with what the event said */
    }
    if (!scope.alive || rows.has(mac) || !matches(d)) return;
    const row = rowFor(d);
    rows.set(mac, row);
    const after = [...rows.keys()].filter((k) => k > mac).sort()[0];
    const emptyRow = tbody.querySelector('.empty-row');
    if (emptyRow) emptyRow.remove();
    tbody.insertBefore(row.tr, after ? rows.get(after).tr : null);
    total += 1;
    renderStatus();
    row.tr.classList.add('row-new');
    scope.timeout(() => row.tr.classList.remove('row-new'), 2000);
  }

  scope.add(live.on('presence', (ev) => {
    if (!ev || !ev.mac_address) return;
    const row = rows.get(ev.mac_address);
    if (row) {
      const d = row.data;
      d.state = normalState(ev.state);
      if (ev.at_ms) d.last_seen_ms = ev.at_ms;
      if (ev.remote) d.remote = ev.remote;
      if (ev.state === 'in_session' || ev.state === 'in_call') d.session_id = ev.session_id;
      d.call_peer = ev.state === 'in_call' ? ev.call_peer : undefined;
      fillRow(row);
    } else {
      addDevice(ev);
    }
    refreshCounts();
  }));
  scope.add(live.on('reconnected', () => reload()));

  const onSearch = scope.debounce(() => {
    filters.q = search.value.trim();
    reload();
  }, 300);
  search.addEventListener('input', onSearch);
  stateSelect.addEventListener('change', () => {
    filters.state = stateSelect.value;
    reload();
  });
  more.addEventListener('click', () => load(true));

  reload();
}

/** Pushes to the whole fleet or a group, and the queue of recent pushes. */
function fleetPush(scope) {
  const targetSelect = h('select', { class: 'input', testid: 'push-target', 'aria-label': t('push.target') },
    h('option', { value: 'fleet', text: t('push.target.fleet') }),
    h('option', { value: 'group', text: t('push.target.group') }));
  const group = h('input', { type: 'text', class: 'input', testid: 'push-group', placeholder: 'GID_default', hidden: true });
  targetSelect.addEventListener('change', () => {
    group.hidden = targetSelect.value !== 'group';
  });
  const target = () => {
    if (targetSelect.value === 'fleet') return { fleet: true };
    if (!group.value.trim()) throw new Error(t('push.groupMissing'));
    return { group: group.value.trim() };
  };
  const list = pushList(scope, null);
  return h('section', { class: 'card', 'aria-labelledby': 'h-fleet-push', testid: 'fleet-push' },
    h('h2', { id: 'h-fleet-push', text: t('push.fleetTitle') }),
    h('label', { class: 'field' }, h('span', { class: 'label', text: t('push.target') }), targetSelect, group),
    pushForm('fleet-push-form', target, () => list.reload()),
    h('h3', { text: t('push.queue') }),
    list.el);
}
