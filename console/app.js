// Boot, sign-in state, the header (navigation, live status, language) and the hash
// router: #/fleet, #/device/<mac>, #/session/<id>, #/stats, #/export.

import { applyStatic, getLang, onLangChange, setLang, t } from './i18n.js';
import { clearToken, get, getToken, setUnauthorizedHandler, ApiError } from './api.js';
import { live } from './live.js';
import { startAlerts, stopAlerts } from './alerts.js';
import { Scope, h, replace } from './dom.js';
import { getHistoryOffset, setHistoryOffset } from './time.js';
import * as signin from './views/signin.js';
import * as fleet from './views/fleet.js';
import * as device from './views/device.js';
import * as session from './views/session.js';
import * as stats from './views/stats.js';
import * as exporter from './views/export.js';

const main = document.getElementById('main');
const topbar = document.getElementById('topbar');
const wsStatus = document.getElementById('ws-status');
const langToggle = document.getElementById('lang-toggle');
const signOutButton = document.getElementById('sign-out');
const navToggle = document.getElementById('nav-toggle');

let scope = null;
let signedIn = false;

/** The route of the current hash: {view, params, nav}. */
function parseRoute() {
  const path = decodeURI(location.hash.replace(/^#/, '')) || '/fleet';
  const parts = path.split('/').filter(Boolean);
  const [name, ...rest] = parts;
  const arg = rest.length ? decodeURIComponent(rest.join('/')) : '';
  switch (name || 'fleet') {
    case 'fleet':
      return { view: fleet, params: {}, nav: 'fleet' };
    case 'device':
      return arg ? { view: device, params: { mac: arg }, nav: 'fleet' } : null;
    case 'session':
      return arg ? { view: session, params: { id: arg }, nav: 'fleet' } : null;
    case 'stats':
      return { view: stats, params: {}, nav: 'stats' };
    case 'export':
      return { view: exporter, params: { mac: arg }, nav: 'export' };
    default:
      return null;
  }
}

function notFound(container) {
  document.title = t('title.notFound');
  replace(
    container,
    h('section', { class: 'card empty', testid: 'not-found' },
      h('h1', { text: t('notFound.title') }),
      h('p', { text: t('notFound.text') }),
      h('a', { href: '#/fleet', class: 'btn', text: t('notFound.back') })),
  );
}

function render({ focus = false } = {}) {
  if (scope) scope.dispose();
  scope = new Scope();
  topbar.dataset.navOpen = 'false';
  navToggle.setAttribute('aria-expanded', 'false');
  if (!signedIn) {
    signin.render(main, {}, scope, { onSignedIn: startSignedIn });
    return;
  }
  const route = parseRoute();
  for (const a of document.querySelectorAll('#nav a')) {
    if (route && a.dataset.route === route.nav) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  main.replaceChildren();
  if (!route) notFound(main);
  else route.view.render(main, route.params, scope);
  if (focus) main.focus({ preventScroll: true });
}

function renderWsStatus(status) {
  wsStatus.dataset.state = status.state;
  let text;
  switch (status.state) {
    case 'live':
      text = t('ws.live');
      break;
    case 'connecting':
      text = t('ws.connecting');
      break;
    case 'reconnecting':
      text = status.tooSlow
        ? t('ws.tooSlow', { n: status.inSeconds })
        : t('ws.reconnecting', { n: status.inSeconds });
      break;
    default:
      text = t('ws.off');
  }
  wsStatus.textContent = text;
  wsStatus.title = status.tooSlow ? t('ws.tooSlowHelp') : '';
}

function renderLangToggle() {
  const lang = getLang();
  langToggle.textContent = lang === 'zh-CN' ? 'English' : '中文';
  langToggle.setAttribute('lang', lang === 'zh-CN' ? 'en' : 'zh-CN');
  langToggle.setAttribute('aria-label', t('lang.switch'));
}

/**
 * The zone history times are written in (history.utc_offset_minutes): read from the
 * gateway when it says so, else worked out from a connected device's `connected_at`
 * (that zone) and `connected_at_ms` (unix), else the documented default, 480.
 */
async function detectHistoryOffset() {
  const cached = Number(sessionStorage.getItem('xz-console-offset'));
  if (sessionStorage.getItem('xz-console-offset') !== null && Number.isFinite(cached)) {
    setHistoryOffset(cached);
  }
  const before = getHistoryOffset();
  try {
    let found = null;
    for (const state of ['online', 'in_session']) {
      const page = await get('/api/console/fleet', { state, limit: 1 });
      for (const key of ['history_utc_offset_minutes', 'utc_offset_minutes']) {
        if (page && Number.isFinite(page[key])) found = page[key];
      }
      if (found !== null) break;
      const dev = page && page.devices && page.devices[0];
      if (!dev) continue;
      const view = await get(`/api/v2/chat-history/${encodeURIComponent(dev.mac_address)}`);
      const liveInfo = view && view.live;
      const m = liveInfo && /^(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2})\.(\d{3})$/.exec(liveInfo.connected_at || '');
      if (m && Number.isFinite(liveInfo.connected_at_ms)) {
        const asUtc = Date.UTC(+m[1], +m[2] - 1, +m[3], +m[4], +m[5], +m[6], +m[7]);
        found = Math.round((asUtc - liveInfo.connected_at_ms) / 60000);
        break;
      }
    }
    if (found !== null && Math.abs(found) <= 14 * 60) {
      setHistoryOffset(found);
      sessionStorage.setItem('xz-console-offset', String(found));
    }
  } catch (e) {
    if (!(e instanceof ApiError)) console.warn('time zone detection failed', e);
  }
  if (getHistoryOffset() !== before && signedIn) render();
}

function startSignedIn() {
  signedIn = true;
  topbar.hidden = false;
  live.start(getToken());
  startAlerts();
  detectHistoryOffset();
  if (!location.hash || location.hash === '#' || location.hash === '#/') {
    history.replaceState(null, '', '#/fleet');
  }
  render({ focus: true });
}

function signOut(messageKey) {
  signedIn = false;
  clearToken();
  live.stop();
  stopAlerts();
  topbar.hidden = true;
  if (scope) scope.dispose();
  scope = new Scope();
  signin.render(main, {}, scope, { onSignedIn: startSignedIn, messageKey });
}

function boot() {
  applyStatic(document);
  renderLangToggle();
  renderWsStatus(live.status);
  live.on('status', renderWsStatus);
  live.on('refused', () => {
    // The feed was refused before it opened: if the token is no longer accepted, the
    // 401 of this call signs out; otherwise the feed keeps retrying.
    get('/api/console/fleet', { limit: 1 }).catch(() => {});
  });
  setUnauthorizedHandler(() => {
    if (signedIn) signOut('signin.expired');
  });
  langToggle.addEventListener('click', () => {
    setLang(getLang() === 'zh-CN' ? 'en' : 'zh-CN');
  });
  onLangChange(() => {
    applyStatic(document);
    renderLangToggle();
    renderWsStatus(live.status);
    render();
  });
  signOutButton.addEventListener('click', () => signOut('signin.signedOut'));
  navToggle.addEventListener('click', () => {
    const open = topbar.dataset.navOpen !== 'true';
    topbar.dataset.navOpen = String(open);
    navToggle.setAttribute('aria-expanded', String(open));
  });
  window.addEventListener('hashchange', () => render({ focus: true }));
  if (getToken()) startSignedIn();
  else render();
}

boot();
