// One device: presence, the live transcript of its current conversation, its MCP tools
// (a form per tool), commands (end the conversation, disconnect), per-day statistics and
// its sessions from history.

import { h, isMac, normalizeMac, replace } from '../dom.js';
import { t, tMaybe } from '../i18n.js';
import { command, describeError, get } from '../api.js';
import { live } from '../live.js';
import { dayChart } from '../charts.js';
import {
  addDays, formatDateTime, formatDuration, formatFull, formatNumber, historyToday, parseHistoryTime,
} from '../time.js';
import {
  AudioLoader, confirmDialog, emptyState, errorBox, loading, messageList, normalState, setBadge, stateBadge,
} from './common.js';
import { pushForm, pushList } from './push.js';

const SESSIONS_PAGE = 20;

export function render(container, params, scope) {
  if (!isMac(params.mac)) {
    document.title = t('title.notFound');
    replace(container, h('section', { class: 'card' },
      h('h1', { text: t('device.badMac') }),
      h('p', { text: t('device.badMacHelp') }),
      h('a', { href: '#/fleet', class: 'btn', text: t('notFound.back') })));
    return;
  }
  const mac = normalizeMac(params.mac);
  document.title = t('title.device', { mac });
  const audio = new AudioLoader();
  scope.add(() => audio.dispose());

  let presence = null; // the presence record, kept up to date from events
  let info = null; // the last device answer (connected_here, tools)
  let liveSession = null;
  let liveEnded = false;
  const endedSessions = new Set();

  // --- layout ------------------------------------------------------------------
  const badge = stateBadge('unknown', 'device-state');
  const commandStatus = h('p', { class: 'command-status', testid: 'device-command-status', role: 'status' });
  const goodbyeBtn = h('button', { type: 'button', class: 'btn', testid: 'device-goodbye', text: t('device.goodbye') });
  const kickBtn = h('button', { type: 'button', class: 'btn btn-danger', testid: 'device-kick', text: t('device.kick') });
  const summary = h('div', { testid: 'device-summary' }, loading());
  const transcriptState = h('span', { class: 'pill', testid: 'live-state', dataset: { state: 'none' } });
  const transcriptSession = h('p', { class: 'help', testid: 'live-session' });
  const transcript = messageList(audio, 'live-transcript');
  const transcriptEmpty = emptyState(t('device.transcriptEmpty'), t('device.transcriptEmptyHelp'), 'live-empty');
  const transcriptBox = h('div', { class: 'transcript-box' }, transcriptEmpty, transcript.el);
  const tools = h('div', { testid: 'device-tools' }, loading());
  const pushes = pushList(scope, mac);
  const statsBox = h('div', { testid: 'device-stats' }, loading());
  const sessionsBody = h('tbody', { testid: 'device-sessions-rows' });
  const sessionsMore = h('button', { type: 'button', class: 'btn', testid: 'sessions-more', text: t('common.more'), hidden: true });
  const sessionsStatus = h('div', { class: 'table-status' });

  replace(
    container,
    h('section', { class: 'view view-device', testid: 'view-device', dataset: { mac } },
      h('p', { class: 'breadcrumb' }, h('a', { href: '#/fleet', text: t('nav.fleet') }), ' / ', h('span', { class: 'mono', text: mac })),
      h('div', { class: 'view-head' },
        h('h1', { class: 'mono', testid: 'device-mac', text: mac }),
        badge,
        h('div', { class: 'actions' },
          h('a', { href: `#/export/${mac}`, class: 'btn', testid: 'device-export', text: t('device.export') }),
          goodbyeBtn, kickBtn)),
      commandStatus,
      h('div', { class: 'device-cols' },
        h('div', { class: 'device-col' },
          h('section', { class: 'card', 'aria-labelledby': 'h-summary' },
            h('h2', { id: 'h-summary', text: t('device.summary') }), summary),
          h('section', { class: 'card', 'aria-labelledby': 'h-live' },
            h('div', { class: 'card-head' }, h('h2', { id: 'h-live', text: t('device.transcript') }), transcriptState),
            transcriptSession, transcriptBox)),
        h('div', { class: 'device-col' },
          h('section', { class: 'card', 'aria-labelledby': 'h-tools' },
            h('h2', { id: 'h-tools', text: t('device.tools') }), tools),
          h('section', { class: 'card', 'aria-labelledby': 'h-push', testid: 'device-push' },
            h('h2', { id: 'h-push', text: t('push.title') }),
            pushForm('device-push-form', () => ({ to: mac }), () => pushes.reload()),
            pushes.el))),
      h('section', { class: 'card', 'aria-labelledby': 'h-stats' },
        h('h2', { id: 'h-stats', text: t('device.stats') }), statsBox),
      h('section', { class: 'card', 'aria-labelledby': 'h-sessions' },
        h('h2', { id: 'h-sessions', text: t('device.sessions') }),
        h('div', { class: 'table-wrap' },
          h('table', { class: 'table sessions-table', testid: 'device-sessions' },
            h('thead', {}, h('tr', {},
              h('th', { scope: 'col', text: t('sessions.col.started') }),
              h('th', { scope: 'col', text: t('sessions.col.duration') }),
              h('th', { scope: 'col', text: t('sessions.col.messages') }),
              h('th', { scope: 'col', text: t('sessions.col.audio') }))),
            sessionsBody)),
        h('div', { class: 'table-foot' }, sessionsStatus, sessionsMore))),
  );

  // --- presence summary --------------------------------------------------------------
  /** Commands that cannot work in the current state are disabled (and say why). */
  function updateButtons() {
    const s = presence ? normalState(presence.state) : 'unknown';
    const busy = goodbyeBtn.dataset.busy === 'true' || kickBtn.dataset.busy === 'true';
    const talking = s === 'in_session' || s === 'in_call';
    goodbyeBtn.disabled = busy || !talking;
    goodbyeBtn.title = !talking ? t('device.goodbyeDisabled') : '';
    kickBtn.disabled = busy || s === 'offline' || s === 'unknown';
    kickBtn.title = s === 'offline' || s === 'unknown' ? t('device.kickDisabled') : '';
  }

  function renderSummary() {
    setBadge(badge, presence ? presence.state : 'unknown');
    updateButtons();
    if (!presence) {
      replace(summary, emptyState(t('device.unknownPresence'), t('device.unknownPresenceHelp'), 'device-unknown'));
      return;
    }
    const p = presence;
    const row = (key, value, opts = {}) =>
      value == null || value === ''
        ? null
        : [h('dt', { text: t(key) }), h('dd', { class: opts.mono ? 'mono' : null, title: opts.title || null, testid: opts.testid || null, text: value })];
    replace(summary, h('dl', { class: 'facts' },
      row('device.f.state', t(`state.${normalState(p.state)}`), { testid: 'summary-state' }),
      row('device.f.node', p.node, { testid: 'summary-node' }),
      row('device.f.here', info && info.connected_here ? t('common.yes') : t('common.no')),
      row('device.f.clientId', p.client_id, { mono: true }),
      row('device.f.group', p.group),
      row('device.f.remote', p.remote, { mono: true }),
      row('device.f.board', p.board),
      row('device.f.firmware', p.firmware),
      normalState(p.state) !== 'offline' && p.connected_at_ms
        ? row('device.f.connectedAt', formatDateTime(p.connected_at_ms), { title: formatFull(p.connected_at_ms) })
        : null,
      normalState(p.state) === 'in_session' && p.session_since_ms
        ? row('device.f.sessionSince', formatDateTime(p.session_since_ms), { title: formatFull(p.session_since_ms) })
        : null,
      normalState(p.state) === 'in_call' && p.call_peer
        ? row('device.f.callPeer', `${p.call_peer} · ${t(p.call_bridged ? 'device.call.bridged' : 'device.call.ringing')}`, { mono: true, testid: 'summary-call' })
        : null,
      row('device.f.lastSeen', p.last_seen_ms ? formatDateTime(p.last_seen_ms) : '', { title: p.last_seen_ms ? formatFull(p.last_seen_ms) : '' })));
  }

  // --- MCP tools -------------------------------------------------------------------
  function renderTools() {
    const list = (info && Array.isArray(info.tools)) ? info.tools : [];
    if (list.length === 0) {
      const help = info && info.connected_here ? t('device.noToolsAnnounced') : t('device.noToolsHere');
      replace(tools, emptyState(t('device.noTools'), help, 'tools-empty'));
      return;
    }
    replace(tools, h('div', { class: 'tool-list', testid: 'tool-list' }, list.map((tool, i) => toolForm(tool, i))));
  }

  function toolForm(tool, index) {
    const schema = (tool && tool.inputSchema) || {};
    const props = (schema && typeof schema.properties === 'object' && schema.properties) || {};
    const required = new Set(Array.isArray(schema.required) ? schema.required : []);
    const fields = Object.entries(props).map(([name, prop]) => argField(index, name, prop || {}, required.has(name)));
    const result = h('pre', { class: 'tool-result', testid: 'tool-result', hidden: true, 'aria-live': 'polite' });
    const submit = h('button', { type: 'submit', class: 'btn btn-primary', testid: 'tool-call', text: t('tools.call') });
    const form = h('form', {
      class: 'tool-form',
      testid: 'tool-form',
      dataset: { tool: tool.name },
      novalidate: true,
      on: {
        submit: async (ev) => {
          ev.preventDefault();
          const args = {};
          const problems = [];
          for (const f of fields) {
            const r = f.read();
            if (r.error) problems.push(r.error);
            else if (r.present) args[f.name] = r.value;
          }
          if (problems.length) {
            showResult(result, false, problems.join('\n'));
            return;
          }
          submit.disabled = true;
          showResult(result, null, t('tools.calling'));
          try {
            const reply = await command(mac, {
              command: 'mcp',
              payload: { method: 'tools/call', params: { name: tool.name, arguments: args } },
            });
            if (!scope.alive) return;
            if (reply && reply.ok) {
              const res = reply.result;
              const isError = !!(res && res.isError);
              showResult(result, !isError, `${isError ? t('tools.toolError') : t('tools.result')}\n${resultText(res)}`, reply.elapsed_ms);
            } else {
              showResult(result, false, commandErrorText(reply), reply && reply.elapsed_ms);
            }
          } catch (e) {
            if (!scope.alive) return;
            const d = describeError(e);
            showResult(result, false, d.detail ? `${d.message}\n${d.detail}` : d.message);
          } finally {
            submit.disabled = false;
          }
        },
      },
    },
    h('h3', { class: 'tool-name mono', text: tool.name }),
    tool.description ? h('p', { class: 'tool-desc', text: tool.description }) : null,
    fields.length ? h('div', { class: 'tool-fields' }, fields.map((f) => f.el)) : h('p', { class: 'help', text: t('tools.noArgs') }),
    h('div', { class: 'tool-actions' }, submit),
    result);
    return form;
  }

  /** One argument's input, from its JSON-schema property. */
  function argField(formIndex, name, prop, isRequired) {
    const id = `tool-${formIndex}-${name.replace(/[^A-Za-z0-9_-]/g, '_')}`;
    const type = Array.isArray(prop.type) ? prop.type.find((x) => x !== 'null') : prop.type;
    const hint = [];
    if (prop.minimum != null) hint.push(t('tools.min', { n: prop.minimum }));
    if (prop.maximum != null) hint.push(t('tools.max', { n: prop.maximum }));
    if (prop.default !== undefined) hint.push(t('tools.default', { v: JSON.stringify(prop.default) }));
    const base = { id, name, testid: 'tool-arg', dataset: { arg: name, type: type || 'json' }, required: isRequired };
    let input;
    let read;
    if (type === 'integer' || type === 'number') {
      input = h('input', {
        ...base,
        type: 'number',
        class: 'input',
        inputmode: type === 'integer' ? 'numeric' : 'decimal',
        step: type === 'integer' ? '1' : 'any',
        min: prop.minimum,
        max: prop.maximum,
        props: { value: prop.default !== undefined ? String(prop.default) : '' },
      });
      read = () => {
        const raw = input.value.trim();
        if (raw === '') return isRequired ? { error: t('tools.required', { name }) } : { present: false };
        const n = Number(raw);
        if (!Number.isFinite(n) || (type === 'integer' && !Number.isInteger(n))) {
          return { error: t(type === 'integer' ? 'tools.notInteger' : 'tools.notNumber', { name }) };
        }
        if (prop.minimum != null && n < prop.minimum) return { error: t('tools.tooSmall', { name, n: prop.minimum }) };
        if (prop.maximum != null && n > prop.maximum) return { error: t('tools.tooLarge', { name, n: prop.maximum }) };
        return { present: true, value: n };
      };
    } else if (type === 'boolean') {
      input = h('input', { ...base, type: 'checkbox', class: 'checkbox', required: false, props: { checked: prop.default === true } });
      read = () => ({ present: true, value: input.checked });
    } else if (type === 'string' && Array.isArray(prop.enum)) {
      input = h('select', { ...base, class: 'input' },
        isRequired ? null : h('option', { value: '', text: t('tools.unset') }),
        prop.enum.map((v) => h('option', { value: String(v), text: String(v) })));
      if (prop.default !== undefined) input.value = String(prop.default);
      read = () => (input.value === '' && !isRequired ? { present: false } : { present: true, value: input.value });
    } else if (type === 'string') {
      input = h('input', { ...base, type: 'text', class: 'input', props: { value: prop.default !== undefined ? String(prop.default) : '' } });
      read = () => {
        if (input.value === '') return isRequired ? { error: t('tools.required', { name }) } : { present: false };
        return { present: true, value: input.value };
      };
    } else {
      input = h('textarea', { ...base, class: 'input mono', rows: 3, placeholder: t('tools.jsonPlaceholder'),
        props: { value: prop.default !== undefined ? JSON.stringify(prop.default) : '' } });
      read = () => {
        if (input.value.trim() === '') return isRequired ? { error: t('tools.required', { name }) } : { present: false };
        try {
          return { present: true, value: JSON.parse(input.value) };
        } catch {
          return { error: t('tools.notJson', { name }) };
        }
      };
    }
    const label = h('label', { for: id, class: 'label' },
      h('span', { class: 'mono', text: name }),
      type ? h('span', { class: 'arg-type', text: ` (${type})` }) : null,
      isRequired ? h('span', { class: 'required', 'aria-hidden': 'true', text: ' *' }) : null,
      isRequired ? h('span', { class: 'visually-hidden', text: ` ${t('tools.requiredMark')}` }) : null);
    const help = [prop.description, hint.join(', ')].filter(Boolean).join(' · ');
    const el = h('div', { class: type === 'boolean' ? 'field field-check' : 'field' },
      type === 'boolean' ? [input, label] : [label, input],
      help ? h('p', { class: 'help', text: help }) : null);
    return { name, el, read };
  }

  function showResult(el, ok, text, elapsedMs) {
    el.hidden = false;
    el.dataset.ok = ok === null ? 'pending' : String(ok);
    el.className = `tool-result ${ok === false ? 'is-error' : ok ? 'is-ok' : ''}`;
    el.textContent = elapsedMs != null ? `${text}\n(${t('tools.elapsed', { ms: elapsedMs })})` : text;
  }

  function resultText(res) {
    if (res && Array.isArray(res.content)) {
      return res.content
        .map((c) => (c && c.type === 'text' && typeof c.text === 'string' ? c.text : JSON.stringify(c, null, 2)))
        .join('\n');
    }
    return JSON.stringify(res, null, 2);
  }

  function commandErrorText(reply) {
    const err = (reply && reply.error) || {};
    const code = String(err.code || 'error');
    const lead = tMaybe(`cmd.err.${code}`) || t('cmd.err.other');
    return `${lead}\n${code}: ${err.message || ''}`;
  }

  // --- commands ----------------------------------------------------------------------
  async function runCommand(button, body, okKey) {
    button.dataset.busy = 'true';
    updateButtons();
    commandStatus.className = 'command-status';
    commandStatus.dataset.ok = 'pending';
    commandStatus.textContent = t('cmd.sending');
    try {
      const reply = await command(mac, body);
      if (!scope.alive) return;
      if (reply && reply.ok) {
        commandStatus.dataset.ok = 'true';
        commandStatus.classList.add('is-ok');
        commandStatus.textContent = t(okKey);
      } else {
        commandStatus.dataset.ok = 'false';
        commandStatus.classList.add('is-error');
        commandStatus.textContent = commandErrorText(reply).replace('\n', ' — ');
      }
    } catch (e) {
      if (!scope.alive) return;
      const d = describeError(e);
      commandStatus.dataset.ok = 'false';
      commandStatus.classList.add('is-error');
      commandStatus.textContent = d.detail ? `${d.message} (${d.detail})` : d.message;
    } finally {
      button.dataset.busy = 'false';
      updateButtons();
    }
  }

  goodbyeBtn.addEventListener('click', async () => {
    const yes = await confirmDialog({ title: t('device.goodbyeTitle'), text: t('device.goodbyeText', { mac }), confirmLabel: t('device.goodbye') });
    if (yes && scope.alive) runCommand(goodbyeBtn, { command: 'goodbye' }, 'device.goodbyeDone');
  });
  kickBtn.addEventListener('click', async () => {
    const yes = await confirmDialog({ title: t('device.kickTitle'), text: t('device.kickText', { mac }), confirmLabel: t('device.kick') });
    if (yes && scope.alive) runCommand(kickBtn, { command: 'kick', reason: 'console' }, 'device.kickDone');
  });

  // --- live transcript ---------------------------------------------------------------
  let pulling = false;
  let pullAgain = false;

  function renderTranscriptHead() {
    const state = !liveSession ? 'none' : liveEnded ? 'ended' : 'live';
    transcriptState.dataset.state = state;
    transcriptState.className = `pill pill-${state}`;
    transcriptState.textContent = t(`device.transcriptState.${state}`);
    transcriptSession.dataset.sessionId = liveSession || '';
    replace(transcriptSession, liveSession
      ? [t('device.session'), ' ', h('a', { href: `#/session/${encodeURIComponent(liveSession)}`, class: 'mono', text: liveSession })]
      : []);
    transcriptEmpty.hidden = transcript.count() > 0;
    if (liveSession && transcript.count() === 0) {
      transcriptEmpty.querySelector('.empty-title').textContent = t('device.transcriptWaiting');
      transcriptEmpty.querySelector('.empty-text').textContent = '';
    } else {
      transcriptEmpty.querySelector('.empty-title').textContent = t('device.transcriptEmpty');
      transcriptEmpty.querySelector('.empty-text').textContent = t('device.transcriptEmptyHelp');
    }
  }

  /** Fetches the live session's messages after the last one shown. */
  async function pull() {
    if (!liveSession) return;
    if (pulling) {
      pullAgain = true;
      return;
    }
    pulling = true;
    try {
      do {
        pullAgain = false;
        const sid = liveSession;
        let after = transcript.lastId();
        for (let page = 0; page < 20; page++) {
          const res = await get(`/api/history/sessions/${encodeURIComponent(sid)}/messages`, { after_id: after, limit: 500 });
          if (!scope.alive || sid !== liveSession) break;
          const nearBottom = transcriptBox.scrollHeight - transcriptBox.scrollTop - transcriptBox.clientHeight < 80;
          if (transcript.add(res.messages || []) && nearBottom) transcriptBox.scrollTop = transcriptBox.scrollHeight;
          renderTranscriptHead();
          if (!res.next) break;
          after = res.next;
        }
      } while (pullAgain && scope.alive);
    } catch (e) {
      if (scope.alive) console.warn('transcript fetch failed', describeError(e).message);
    } finally {
      pulling = false;
    }
  }

  function follow(sessionId) {
    if (!sessionId) return;
    if (sessionId === liveSession) {
      if (liveEnded) {
        liveEnded = false;
        renderTranscriptHead();
      }
      return;
    }
    liveSession = sessionId;
    liveEnded = false;
    transcript.clear();
    renderTranscriptHead();
    pull();
  }

  // --- statistics ----------------------------------------------------------------------
  async function loadStats() {
    const to = historyToday();
    const from = addDays(to, -29);
    try {
      const s = await get(`/api/history/devices/${encodeURIComponent(mac)}/stats`, { from, to });
      if (!scope.alive) return;
      const days = (s.days || []).map((d) => d.day);
      const { el, chart } = dayChart({
        days,
        testid: 'device-stats-chart',
        label: t('device.statsLabel'),
        series: [
          { label: t('stats.messages'), data: (s.days || []).map((d) => d.messages), kind: 'bar', color: '--c-messages' },
          { label: t('stats.sessions'), data: (s.days || []).map((d) => d.sessions), kind: 'line', color: '--c-sessions' },
        ],
      });
      scope.add(() => chart && chart.destroy());
      const tot = s.totals || {};
      replace(statsBox,
        h('p', { class: 'help', testid: 'device-stats-totals', text: t('device.statsTotals', {
          sessions: formatNumber(tot.sessions || 0),
          messages: formatNumber(tot.messages || 0),
          minutes: formatNumber((tot.audio_seconds || 0) / 60, 1),
        }) }),
        el);
    } catch (e) {
      if (scope.alive) replace(statsBox, errorBox(e, { retry: loadStats, testid: 'device-stats-error' }));
    }
  }

  // --- sessions --------------------------------------------------------------------------
  let sessionsNext = null;
  let sessionsGen = 0;

  function sessionRow(s) {
    const start = parseHistoryTime(s.started_at);
    const end = parseHistoryTime(s.ended_at);
    const duration = start && end ? end - start : NaN;
    return h('tr', { testid: 'session-row', dataset: { sessionId: s.session_id } },
      h('td', { 'data-label': t('sessions.col.started') },
        h('a', { href: `#/session/${encodeURIComponent(s.session_id)}`, testid: 'session-link', dataset: { sessionId: s.session_id },
          title: formatFull(s.started_at), text: formatDateTime(s.started_at) })),
      h('td', { 'data-label': t('sessions.col.duration'), text: formatDuration(duration) }),
      h('td', { 'data-label': t('sessions.col.messages') },
        formatNumber(s.messages), ' ',
        h('span', { class: 'muted', text: t('sessions.breakdown', { user: s.user, assistant: s.assistant, tool: s.tool }) })),
      h('td', { 'data-label': t('sessions.col.audio'), text: formatNumber(s.has_audio) }));
  }

  async function loadSessions(append) {
    const gen = ++sessionsGen;
    sessionsMore.disabled = true;
    try {
      const res = await get(`/api/history/devices/${encodeURIComponent(mac)}/sessions`, {
        limit: SESSIONS_PAGE,
        before: append ? sessionsNext : '',
      });
      if (!scope.alive || gen !== sessionsGen) return;
      if (!append) sessionsBody.replaceChildren();
      replace(sessionsStatus);
      for (const s of res.sessions || []) sessionsBody.appendChild(sessionRow(s));
      sessionsNext = res.next || null;
      sessionsMore.hidden = !sessionsNext;
      if (!sessionsBody.children.length) {
        replace(sessionsStatus, emptyState(t('device.noSessions'), t('device.noSessionsHelp'), 'sessions-empty'));
      }
    } catch (e) {
      if (!scope.alive || gen !== sessionsGen) return;
      replace(sessionsStatus, errorBox(e, { retry: () => loadSessions(append), testid: 'sessions-error' }));
    } finally {
      sessionsMore.disabled = false;
    }
  }
  sessionsMore.addEventListener('click', () => loadSessions(true));
  const refreshSessions = scope.debounce(() => loadSessions(false), 1000);
  const refreshStats = scope.debounce(loadStats, 3000);

  // --- device info -------------------------------------------------------------------------
  let toolsKey = null;
  let toolRetries = 0;
  async function loadInfo() {
    try {
      info = await get(`/api/console/devices/${encodeURIComponent(mac)}`);
      if (!scope.alive) return;
      presence = info.presence || null;
      renderSummary();
      // Re-rendered only when the tools changed, so a result on screen stays.
      const key = JSON.stringify(info.tools || []);
      if (key !== toolsKey) {
        toolsKey = key;
        renderTools();
      }
      // A device that just connected announces its tools a moment later.
      if (info.connected_here && !(info.tools || []).length && toolRetries < 3) {
        toolRetries++;
        scope.timeout(loadInfo, 2000);
      }
      const sid = info.session_id || (presence && normalState(presence.state) === 'in_session' ? presence.session_id : null);
      if (sid) follow(sid);
      else renderTranscriptHead();
    } catch (e) {
      if (!scope.alive) return;
      replace(summary, errorBox(e, { retry: loadInfo, testid: 'device-error' }));
      replace(tools);
      toolsKey = null;
    }
  }
  const refreshInfo = scope.debounce(loadInfo, 500);

  scope.add(live.on('presence', (ev) => {
    if (!ev || ev.mac_address !== mac) return;
    if (!presence) presence = { mac_address: mac };
    presence.state = normalState(ev.state);
    if (ev.at_ms) presence.last_seen_ms = ev.at_ms;
    if (ev.remote) presence.remote = ev.remote;
    if (ev.client_id) presence.client_id = ev.client_id;
    if (ev.state === 'in_call') {
      // The conversation goes on as a device call: same session, no transcript.
      presence.session_id = ev.session_id;
      presence.call_peer = ev.call_peer;
      presence.call_bridged = ev.call_bridged;
    } else if (ev.state === 'in_session') {
      presence.session_id = ev.session_id;
      presence.session_since_ms = ev.at_ms;
      delete presence.call_peer;
      follow(ev.session_id);
    } else {
      delete presence.call_peer;
      if (ev.session_id) endedSessions.add(ev.session_id);
      delete presence.session_id;
      if (liveSession && (ev.state === 'session_ended' || ev.state === 'offline')) {
        liveEnded = true;
        renderTranscriptHead();
        pull();
        refreshSessions();
        refreshStats();
      }
    }
    if (ev.state === 'online' || ev.state === 'offline') {
      if (ev.state === 'online') {
        presence.connected_at_ms = ev.at_ms;
        toolRetries = 0;
      }
      // Tools come and go with the connection; the node may have changed.
      refreshInfo();
    }
    if (info && presence.state === 'offline') info.connected_here = false;
    renderSummary(info);
  }));
  scope.add(live.on('chat_update', (ev) => {
    if (!ev || ev.mac_address !== mac) return;
    // A late record of a conversation that already ended does not take the view back.
    if (ev.session_id && ev.session_id !== liveSession) {
      if (!endedSessions.has(ev.session_id)) follow(ev.session_id);
    } else pull();
    refreshSessions();
  }));
  scope.add(live.on('reconnected', () => {
    loadInfo();
    pull();
    refreshSessions();
  }));

  renderTranscriptHead();
  updateButtons();
  loadInfo();
  loadSessions(false);
  loadStats();
}
