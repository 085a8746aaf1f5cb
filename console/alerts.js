// The alerts strip at the top of every page: what /readyz and /healthz say (polled every
// 10 s; they need no token) and the upstream failures the live feed reports.

import { h, replace } from './dom.js';
import { onLangChange, t, tMaybe } from './i18n.js';
import { live } from './live.js';
import { formatDateTime, formatNumber } from './time.js';

const POLL_MS = 10000;
const MAX_FAILURES = 5;

const strip = document.getElementById('alerts');
let timer = null;
let unsubscribe = [];
let running = false;
/** The latest answers: null until the first poll. */
let ready = null; // {ok, checks: {name: {ok, reason}}} | {unreachable: true}
let health = null; // the /healthz body | {unreachable: true}
let failures = []; // [{id, mac, error, at}]
let nextId = 1;

async function fetchJson(path) {
  try {
    const res = await fetch(path, { cache: 'no-store', credentials: 'omit' });
    let body = null;
    try {
      body = await res.json();
    } catch {
      body = null;
    }
    return { status: res.status, body };
  } catch {
    return { status: 0, body: null };
  }
}

async function poll() {
  const [r, hz] = await Promise.all([fetchJson('/readyz'), fetchJson('/healthz')]);
  if (!running) return;
  if (r.status === 0) ready = { unreachable: true };
  else ready = { ok: r.status === 200, checks: (r.body && r.body.checks) || {} };
  health = hz.status === 200 && hz.body ? hz.body : { unreachable: hz.status === 0 };
  renderStrip();
}

function checkName(name) {
  return tMaybe(`alerts.check.${name}`) || name;
}

function renderStrip() {
  if (!running) return;
  const items = [];
  if (ready && ready.unreachable) {
    items.push(h('li', { class: 'alert alert-bad', testid: 'alert-unreachable' }, t('alerts.unreachable')));
  } else if (ready && !ready.ok) {
    const failing = Object.entries(ready.checks).filter(([, c]) => c && c.ok === false);
    if (failing.length === 0) {
      items.push(h('li', { class: 'alert alert-bad', testid: 'alert-not-ready' }, t('alerts.notReady')));
    }
    for (const [name, c] of failing) {
      items.push(
        h('li', { class: 'alert alert-bad', testid: 'alert-check', dataset: { check: name } },
          h('span', { class: 'alert-main' },
            h('strong', { text: t('alerts.checkFailing', { name: checkName(name) }) }),
            c.reason ? h('span', { class: 'alert-detail', text: ` ${c.reason}` }) : null,
            tMaybe(`alerts.help.${name}`) ? h('span', { class: 'alert-help', text: ` ${tMaybe(`alerts.help.${name}`)}` }) : null)),
      );
    }
  }
  if (health && health.history && Number(health.history.journal_bytes) > 0) {
    items.push(
      h('li', { class: 'alert alert-bad', testid: 'alert-journal' },
        h('span', { class: 'alert-main' },
          h('strong', { text: t('alerts.journal') }),
          h('span', { class: 'alert-detail', text: ` ${t('alerts.journalBytes', { n: formatNumber(health.history.journal_bytes) })}` }))),
    );
  }
  if (health && health.presence && health.presence.healthy === false) {
    items.push(
      h('li', { class: 'alert alert-warn', testid: 'alert-presence' },
        h('span', { class: 'alert-main' },
          h('strong', { text: t('alerts.presence') }),
          h('span', { class: 'alert-detail', text: ` ${t('alerts.presenceBacklog', { n: formatNumber(health.presence.backlog || 0) })}` }))),
    );
  }
  for (const f of failures) {
    items.push(
      h('li', { class: 'alert alert-warn', testid: 'alert-upstream', dataset: { mac: f.mac } },
        h('span', { class: 'alert-main' },
          h('strong', { text: t('alerts.upstream') }), ' ',
          h('a', { href: `#/device/${encodeURIComponent(f.mac)}`, text: f.mac }), ' ',
          h('time', { text: formatDateTime(f.at) }),
          h('span', { class: 'alert-detail', text: ` ${f.error}` })),
        h('button', {
          type: 'button',
          class: 'btn btn-quiet btn-small',
          testid: 'alert-dismiss',
          'aria-label': t('alerts.dismiss'),
          text: '×',
          on: {
            click: () => {
              failures = failures.filter((x) => x.id !== f.id);
              renderStrip();
            },
          },
        })),
    );
  }
  strip.hidden = false;
  strip.dataset.count = String(items.length);
  if (items.length === 0) {
    replace(strip, h('p', { class: 'alerts-ok', testid: 'alerts-ok' },
      ready ? t('alerts.allOk') : t('alerts.checking')));
    strip.classList.remove('has-alerts');
    return;
  }
  strip.classList.add('has-alerts');
  replace(strip, h('ul', { class: 'alert-list', 'aria-label': t('alerts.label') }, items));
}

export function startAlerts() {
  stopAlerts();
  running = true;
  ready = null;
  health = null;
  unsubscribe.push(
    live.on('upstream_failure', (ev) => {
      failures.unshift({
        id: nextId++,
        mac: String(ev.mac_address || ''),
        error: String(ev.error || ''),
        at: Number(ev.at_ms) || Date.now(),
      });
      failures = failures.slice(0, MAX_FAILURES);
      renderStrip();
    }),
    onLangChange(renderStrip),
  );
  renderStrip();
  poll();
  timer = setInterval(poll, POLL_MS);
}

export function stopAlerts() {
  running = false;
  clearInterval(timer);
  timer = null;
  for (const u of unsubscribe.splice(0)) u();
  failures = [];
  strip.hidden = true;
  strip.replaceChildren();
}
