// Fleet statistics: sessions, messages and audio minutes per day over a range (7, 30 or
// 90 days, or chosen dates), the totals and the most active devices.

import { h, replace } from '../dom.js';
import { t } from '../i18n.js';
import { get } from '../api.js';
import { dayChart } from '../charts.js';
import { addDays, formatNumber, historyToday } from '../time.js';
import { emptyState, errorBox, loading } from './common.js';

/** The chosen range survives leaving the view: {days} or {from, to}. */
const range = { days: 30, from: '', to: '' };

function currentRange() {
  if (range.days) {
    const to = historyToday();
    return { from: addDays(to, -(range.days - 1)), to };
  }
  return { from: range.from, to: range.to };
}

export function render(container, _params, scope) {
  document.title = t('title.stats');
  const presets = [7, 30, 90].map((n) =>
    h('button', {
      type: 'button',
      class: 'btn btn-toggle',
      testid: `stats-range-${n}`,
      'aria-pressed': String(range.days === n),
      text: t('stats.lastDays', { n }),
      on: {
        click: () => {
          range.days = n;
          sync();
          load();
        },
      },
    }));
  const fromInput = h('input', { type: 'date', id: 'stats-from', class: 'input', testid: 'stats-from' });
  const toInput = h('input', { type: 'date', id: 'stats-to', class: 'input', testid: 'stats-to' });
  const rangeError = h('p', { class: 'form-error', role: 'alert', hidden: true, testid: 'stats-range-error' });
  const form = h('form', {
    class: 'range-form',
    testid: 'stats-range-form',
    on: {
      submit: (ev) => {
        ev.preventDefault();
        const from = fromInput.value;
        const to = toInput.value;
        rangeError.hidden = true;
        if (!from || !to) {
          rangeError.textContent = t('stats.needDates');
          rangeError.hidden = false;
          return;
        }
        if (from > to) {
          rangeError.textContent = t('stats.fromAfterTo');
          rangeError.hidden = false;
          return;
        }
        range.days = 0;
        range.from = from;
        range.to = to;
        sync();
        load();
      },
    },
  },
  h('div', { class: 'field' }, h('label', { for: 'stats-from', class: 'label', text: t('stats.from') }), fromInput),
  h('div', { class: 'field' }, h('label', { for: 'stats-to', class: 'label', text: t('stats.to') }), toInput),
  h('button', { type: 'submit', class: 'btn', testid: 'stats-apply', text: t('stats.apply') }));

  const totals = h('div', { class: 'counts', testid: 'stats-totals' });
  const charts = h('div', { class: 'stats-charts' }, loading());
  const top = h('div', { testid: 'stats-top' });
  let chartObjs = [];
  const destroyCharts = () => {
    for (const c of chartObjs) if (c) c.destroy();
    chartObjs = [];
  };
  scope.add(destroyCharts);

  replace(
    container,
    h('section', { class: 'view view-stats', testid: 'view-stats' },
      h('div', { class: 'view-head' }, h('h1', { text: t('stats.title') })),
      h('div', { class: 'toolbar range-bar' },
        h('div', { class: 'btn-group', role: 'group', 'aria-label': t('stats.range') }, presets),
        form),
      rangeError,
      h('p', { class: 'help', testid: 'stats-range-label' }),
      totals,
      charts,
      h('section', { class: 'card', 'aria-labelledby': 'h-top' },
        h('h2', { id: 'h-top', text: t('stats.top') }), top)),
  );
  const rangeLabel = container.querySelector('[data-testid="stats-range-label"]');

  function sync() {
    const r = currentRange();
    fromInput.value = r.from;
    toInput.value = r.to;
    presets.forEach((b, i) => b.setAttribute('aria-pressed', String(range.days === [7, 30, 90][i])));
    rangeLabel.textContent = t('stats.rangeLabel', { from: r.from, to: r.to });
  }

  const total = (key, labelKey, value) =>
    h('div', { class: 'count-card' },
      h('span', { class: 'count-label', text: t(labelKey) }),
      h('span', { class: 'count-value', testid: `stats-total-${key}`, dataset: { value }, text: formatNumber(value, key === 'audio-minutes' ? 1 : 0) }));

  let gen = 0;
  async function load() {
    const my = ++gen;
    const r = currentRange();
    replace(charts, loading());
    try {
      const s = await get('/api/history/stats', { from: r.from, to: r.to, top: 10 });
      if (!scope.alive || my !== gen) return;
      const days = (s.days || []).map((d) => d.day);
      const tot = s.totals || {};
      const minutes = Math.round(((tot.audio_seconds || 0) / 60) * 10) / 10;
      replace(totals,
        total('sessions', 'stats.sessions', tot.sessions || 0),
        total('messages', 'stats.messages', tot.messages || 0),
        total('audio-minutes', 'stats.audioMinutes', minutes));
      destroyCharts();
      const activity = dayChart({
        days,
        testid: 'stats-chart',
        label: t('stats.activityChart'),
        series: [
          { label: t('stats.messages'), data: s.days.map((d) => d.messages), kind: 'bar', color: '--c-messages' },
          { label: t('stats.sessions'), data: s.days.map((d) => d.sessions), kind: 'line', color: '--c-sessions' },
        ],
      });
      const audioChart = dayChart({
        days,
        testid: 'stats-audio-chart',
        label: t('stats.audioChart'),
        series: [
          { label: t('stats.audioMinutes'), data: s.days.map((d) => Math.round((d.audio_seconds / 60) * 100) / 100), kind: 'bar', color: '--c-audio', digits: 2 },
        ],
      });
      chartObjs = [activity.chart, audioChart.chart];
      replace(charts,
        h('section', { class: 'card' }, h('h2', { text: t('stats.activityChart') }), activity.el),
        h('section', { class: 'card' }, h('h2', { text: t('stats.audioChart') }), audioChart.el));
      renderTop(s.top_devices || []);
    } catch (e) {
      if (!scope.alive || my !== gen) return;
      destroyCharts();
      replace(charts, errorBox(e, { retry: load, testid: 'stats-error' }));
    }
  }

  function renderTop(devices) {
    if (!devices.length) {
      replace(top, emptyState(t('stats.noTop'), t('stats.noTopHelp'), 'stats-top-empty'));
      return;
    }
    replace(top, h('div', { class: 'table-wrap' }, h('table', { class: 'table', testid: 'stats-top-table' },
      h('thead', {}, h('tr', {},
        h('th', { scope: 'col', text: t('fleet.col.mac') }),
        h('th', { scope: 'col', class: 'num', text: t('stats.sessions') }),
        h('th', { scope: 'col', class: 'num', text: t('stats.messages') }),
        h('th', { scope: 'col', class: 'num', text: t('stats.audioMinutes') }))),
      h('tbody', {}, devices.map((d) => h('tr', { testid: 'stats-top-row', dataset: { mac: d.mac_address } },
        h('td', { 'data-label': t('fleet.col.mac') }, h('a', { href: `#/device/${d.mac_address}`, class: 'mono', text: d.mac_address })),
        h('td', { class: 'num', 'data-label': t('stats.sessions'), text: formatNumber(d.sessions) }),
        h('td', { class: 'num', 'data-label': t('stats.messages'), text: formatNumber(d.messages) }),
        h('td', { class: 'num', 'data-label': t('stats.audioMinutes'), text: formatNumber((d.audio_seconds || 0) / 60, 1) }))))))); 
  }

  sync();
  load();
}
