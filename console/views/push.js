// Pushes from the console: a form that queues one (notify, wake, custom, alert, reboot) for
// a device, a group or the whole fleet, and the list of recent pushes with their states,
// kept current from /ws/admin's push events. Both call the same push API as scripts
// (POST/GET /api/console/push, README "Push").

import { h, replace } from '../dom.js';
import { t } from '../i18n.js';
import { get, request } from '../api.js';
import { live } from '../live.js';
import { formatDateTime } from '../time.js';

const KINDS = ['alert', 'notify', 'wake', 'custom', 'reboot'];
// The fields each kind's form shows: [name, input type].
const FIELDS = {
  alert: [['status', 'text'], ['message', 'text'], ['emotion', 'text']],
  notify: [['audio_url', 'url'], ['subtitles', 'textarea']],
  wake: [['reason', 'textarea']],
  custom: [['payload', 'textarea']],
  reboot: [],
};
const LIST_SIZE = 20;

/** The request a form's values describe; throws a message for the user when one is wrong. */
export function pushRequest(kind, values, target, ttlSecs) {
  const body = { kind, ...target };
  for (const [name] of FIELDS[kind]) {
    const v = (values[name] || '').trim();
    if (!v) continue;
    if (name === 'payload') {
      try {
        body.payload = JSON.parse(v);
      } catch {
        throw new Error(t('push.badPayload'));
      }
    } else if (name === 'subtitles') {
      // One per line: "<start ms> <text>".
      body.subtitles = v.split('\n').filter((l) => l.trim()).map((line) => {
        const m = /^\s*(\d+)\s+(.+)$/.exec(line);
        if (!m) throw new Error(t('push.badSubtitle', { line }));
        return { start_ms: Number(m[1]), text: m[2] };
      });
    } else body[name] = v;
  }
  if (ttlSecs) body.ttl_secs = ttlSecs;
  return body;
}

/**
 * The push form. `target()` gives the request's target (`{to}`, `{group}` or
 * `{fleet: true}`), or throws a message; `onQueued(answer)` runs after a push is queued.
 */
export function pushForm(testid, target, onQueued) {
  const kind = h('select', { class: 'input', testid: 'push-kind', 'aria-label': t('push.kind') },
    ...KINDS.map((k) => h('option', { value: k, text: t(`push.kind.${k}`) })));
  const fields = h('div', { class: 'push-fields' });
  const ttl = h('input', { type: 'number', min: '1', class: 'input', testid: 'push-ttl', placeholder: t('push.ttlDefault') });
  const status = h('p', { class: 'command-status', role: 'status', testid: 'push-status' });
  const submit = h('button', { type: 'submit', class: 'btn btn-primary', testid: 'push-submit', text: t('push.submit') });
  const inputs = {};
  const renderFields = () => {
    for (const k of Object.keys(inputs)) delete inputs[k];
    replace(fields, ...FIELDS[kind.value].map(([name, type]) => {
      const input = type === 'textarea'
        ? h('textarea', { rows: '2', class: 'input', testid: 'push-field', dataset: { field: name } })
        : h('input', { type, class: 'input', testid: 'push-field', dataset: { field: name } });
      inputs[name] = input;
      return h('label', { class: 'field' }, h('span', { class: 'label', text: t(`push.field.${name}`) }), input);
    }), h('p', { class: 'help', text: t(`push.help.${kind.value}`) }));
  };
  kind.addEventListener('change', renderFields);
  renderFields();
  const form = h('form', { class: 'push-form', testid },
    h('label', { class: 'field' }, h('span', { class: 'label', text: t('push.kind') }), kind),
    fields,
    h('label', { class: 'field' }, h('span', { class: 'label', text: t('push.ttl') }), ttl),
    h('div', { class: 'actions' }, submit),
    status);
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const values = Object.fromEntries(Object.entries(inputs).map(([k, el]) => [k, el.value]));
    let body;
    try {
      body = pushRequest(kind.value, values, target(), Number(ttl.value) || 0);
    } catch (err) {
      status.dataset.ok = 'false';
      status.textContent = err.message;
      return;
    }
    submit.disabled = true;
    status.dataset.ok = 'pending';
    status.textContent = t('push.sending');
    try {
      const answer = await request('/api/console/push', {
        method: 'POST', json: body, okStatuses: [400, 404, 409, 503],
      });
      if (answer && answer.batch_id) {
        status.dataset.ok = 'true';
        status.textContent = t('push.queued', { n: answer.devices });
        onQueued(answer);
      } else {
        status.dataset.ok = 'false';
        status.textContent = `${t('push.refused')} ${answer ? `${answer.error}: ${answer.message}` : ''}`;
      }
    } catch (err) {
      status.dataset.ok = 'false';
      status.textContent = `${t('push.refused')} ${err.message || err}`;
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}

/**
 * Recent pushes (of one device when `mac` is set), newest first, their states updated
 * live. Returns `{ el, reload }`; the caller disposes the live subscription with `scope`.
 */
export function pushList(scope, mac) {
  const body = h('tbody', { testid: 'push-rows' });
  const empty = h('p', { class: 'help', testid: 'push-empty', text: t('push.none') });
  const rows = new Map(); // id -> the row's state cell
  const row = (p) => {
    const state = h('td', { class: 'col-state' }, h('span', {
      class: 'pill', testid: 'push-state', dataset: { state: p.state }, text: t(`push.state.${p.state}`),
    }));
    rows.set(p.id, state);
    const tr = h('tr', { testid: 'push-row', dataset: { id: p.id, mac: p.mac_address } },
      h('td', { class: 'mono', text: formatDateTime(p.created_ms) }),
      mac ? null : h('td', { class: 'mono', text: p.mac_address }),
      h('td', { text: t(`push.kind.${p.kind}`) }),
      state,
      h('td', { class: 'help', text: p.error || '' }));
    return tr;
  };
  const setState = (id, state, error) => {
    const cell = rows.get(id);
    if (!cell) return false;
    const pill = cell.firstChild;
    pill.dataset.state = state;
    pill.textContent = t(`push.state.${state}`);
    if (error) cell.nextSibling.textContent = error;
    return true;
  };
  const reload = async () => {
    const query = { limit: LIST_SIZE };
    if (mac) query.mac = mac;
    try {
      const page = await get('/api/console/push', query);
      rows.clear();
      replace(body, ...page.pushes.map(row));
      empty.hidden = page.pushes.length > 0;
    } catch {
      // The form's own status says what went wrong with a push; the list just waits.
    }
  };
  scope.add(live.on('push', (ev) => {
    if (!ev || (mac && ev.mac_address !== mac)) return;
    if (!setState(ev.id, ev.state, ev.error)) reload();
  }));
  const table = h('table', { class: 'table push-table' },
    h('thead', {}, h('tr', {},
      h('th', { text: t('push.col.queued') }),
      mac ? null : h('th', { text: t('push.col.device') }),
      h('th', { text: t('push.kind') }),
      h('th', { text: t('push.col.state') }),
      h('th', { text: t('push.col.error') }))),
    body);
  reload();
  return { el: h('div', { class: 'table-wrap' }, empty, table), reload };
}
