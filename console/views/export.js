// Export: chat history as CSV or JSON Lines, for a device and/or a date range. The
// page asks for a single-use download link (with the token in a header), then lets the
// browser download it natively, streamed to disk.

import { h, isMac, normalizeMac, replace } from '../dom.js';
import { t } from '../i18n.js';
import { describeError, post } from '../api.js';
import { addDays, historyToday } from '../time.js';

const last = { format: 'csv', mac: '', from: '', to: '' };

export function render(container, params, scope) {
  document.title = t('title.export');
  if (params.mac && isMac(params.mac)) last.mac = normalizeMac(params.mac);

  const radio = (value, labelKey) => {
    const id = `export-format-${value}`;
    return h('div', { class: 'field-check' },
      h('input', { type: 'radio', name: 'format', id, value, testid: id, props: { checked: last.format === value } }),
      h('label', { for: id, text: t(labelKey) }));
  };
  const macInput = h('input', {
    id: 'export-mac', type: 'text', class: 'input mono', testid: 'export-mac', autocomplete: 'off', spellcheck: 'false',
    placeholder: 'aa:bb:cc:dd:ee:ff', props: { value: last.mac }, 'aria-describedby': 'export-mac-help',
  });
  const fromInput = h('input', { id: 'export-from', type: 'date', class: 'input', testid: 'export-from', props: { value: last.from } });
  const toInput = h('input', { id: 'export-to', type: 'date', class: 'input', testid: 'export-to', props: { value: last.to } });
  const submit = h('button', { type: 'submit', class: 'btn btn-primary', testid: 'export-submit', text: t('export.download') });
  const status = h('p', { class: 'export-status', testid: 'export-status', role: 'status' });
  // The hidden link the browser follows to download the file.
  const link = h('a', { class: 'visually-hidden', testid: 'export-link', download: '', tabindex: '-1', 'aria-hidden': 'true' });

  const setStatus = (kind, text) => {
    status.dataset.state = kind;
    status.className = `export-status ${kind === 'error' ? 'is-error' : kind === 'ok' ? 'is-ok' : ''}`;
    status.textContent = text;
  };

  const quick = (days) =>
    h('button', {
      type: 'button',
      class: 'btn btn-small',
      text: t('stats.lastDays', { n: days }),
      on: {
        click: () => {
          const to = historyToday();
          toInput.value = to;
          fromInput.value = addDays(to, -(days - 1));
        },
      },
    });

  const form = h('form', {
    class: 'export-form card',
    testid: 'export-form',
    novalidate: true,
    on: {
      submit: async (ev) => {
        ev.preventDefault();
        const format = form.querySelector('input[name="format"]:checked')?.value || 'csv';
        const macRaw = macInput.value.trim();
        const from = fromInput.value;
        const to = toInput.value;
        if (macRaw && !isMac(macRaw)) {
          setStatus('error', t('export.badMac'));
          macInput.setAttribute('aria-invalid', 'true');
          macInput.focus();
          return;
        }
        macInput.removeAttribute('aria-invalid');
        if (from && to && from > to) {
          setStatus('error', t('stats.fromAfterTo'));
          return;
        }
        const mac = macRaw ? normalizeMac(macRaw) : '';
        Object.assign(last, { format, mac, from, to });
        submit.disabled = true;
        setStatus('pending', t('export.preparing'));
        try {
          const query = new URLSearchParams({ format });
          if (mac) query.set('mac', mac);
          if (from) query.set('from', from);
          if (to) query.set('to', to);
          const res = await post(`/api/console/export-link?${query}`, undefined);
          if (!scope.alive) return;
          if (!res || typeof res.url !== 'string' || !res.url.startsWith('/')) {
            throw new Error('the gateway answered without a download link');
          }
          link.href = res.url;
          link.click();
          setStatus('ok', t('export.started', { format: format === 'csv' ? 'CSV' : 'JSON Lines' }));
        } catch (e) {
          if (!scope.alive) return;
          const d = describeError(e);
          setStatus('error', d.detail ? `${d.message} (${d.detail})` : d.message);
        } finally {
          submit.disabled = false;
        }
      },
    },
  },
  h('fieldset', { class: 'fieldset' },
    h('legend', { text: t('export.format') }),
    h('div', { class: 'radio-row' }, radio('csv', 'export.csv'), radio('jsonl', 'export.jsonl'))),
  h('div', { class: 'field' },
    h('label', { for: 'export-mac', class: 'label', text: t('export.mac') }),
    macInput,
    h('p', { id: 'export-mac-help', class: 'help', text: t('export.macHelp') })),
  h('div', { class: 'field-row' },
    h('div', { class: 'field' }, h('label', { for: 'export-from', class: 'label', text: t('stats.from') }), fromInput),
    h('div', { class: 'field' }, h('label', { for: 'export-to', class: 'label', text: t('stats.to') }), toInput),
    h('div', { class: 'field quick-range' }, quick(7), quick(30))),
  h('p', { class: 'help', text: t('export.rangeHelp') }),
  h('div', { class: 'form-actions' }, submit),
  status,
  link);

  replace(
    container,
    h('section', { class: 'view view-export', testid: 'view-export' },
      h('div', { class: 'view-head' }, h('h1', { text: t('export.title') })),
      h('p', { class: 'lead', text: t('export.lead') }),
      form),
  );
}
