// The gateway's HTTP API: every call carries `Authorization: Bearer <token>` (never the
// token in a URL); failures become ApiError with what the user should do about them.

import { t } from './i18n.js';

const TOKEN_KEY = 'xz-console-token';

export function getToken() {
  try {
    return sessionStorage.getItem(TOKEN_KEY) || '';
  } catch {
    return '';
  }
}

export function setToken(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
}

export function clearToken() {
  try {
    sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    /* storage unavailable: nothing kept */
  }
}

/** Called with the error when a signed-in call is refused (401): the app signs out. */
let onUnauthorized = () => {};
export function setUnauthorizedHandler(fn) {
  onUnauthorized = fn;
}

export class ApiError extends Error {
  /**
   * kind: 'network' | 'http'; status: the HTTP status (0 for network); body: the parsed
   * JSON body when there was one; detail: the server's own words (error / error.message);
   * code: a command reply's error code.
   */
  constructor({ kind, status = 0, body = null, detail = '', code = '', path = '' }) {
    super(detail || `${kind} ${status}`);
    this.kind = kind;
    this.status = status;
    this.body = body;
    this.detail = detail;
    this.code = code;
    this.path = path;
  }
}

function withQuery(path, query) {
  if (!query) return path;
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) {
    if (v === undefined || v === null || v === '') continue;
    params.set(k, String(v));
  }
  const qs = params.toString();
  return qs ? `${path}${path.includes('?') ? '&' : '?'}${qs}` : path;
}

async function readBody(res) {
  const type = res.headers.get('content-type') || '';
  if (!type.includes('json')) {
    // Drain the body so the connection can be reused; its text is not shown.
    await res.text().catch(() => '');
    return null;
  }
  try {
    return await res.json();
  } catch {
    return null;
  }
}

/**
 * One request. Options: method, query (object), json (body, sent as JSON), token (to
 * use instead of the stored one: sign-in), as: 'json' (default) | 'blob', noAuthHandler
 * (do not sign out on 401), okStatuses (statuses to return instead of throwing).
 */
export async function request(path, opts = {}) {
  const token = opts.token ?? getToken();
  const headers = { Accept: opts.as === 'blob' ? '*/*' : 'application/json' };
  if (token) headers.Authorization = `Bearer ${token}`;
  let body;
  if (opts.json !== undefined) {
    headers['Content-Type'] = 'application/json';
    body = JSON.stringify(opts.json);
  }
  const url = withQuery(path, opts.query);
  let res;
  try {
    res = await fetch(url, {
      method: opts.method || 'GET',
      headers,
      body,
      cache: 'no-store',
      credentials: 'omit',
      signal: opts.signal,
    });
  } catch (e) {
    if (e && e.name === 'AbortError') throw e;
    throw new ApiError({ kind: 'network', detail: String(e && e.message ? e.message : e), path });
  }
  if (res.ok) {
    if (opts.as === 'blob') return res.blob();
    if (res.status === 204) return null;
    return readBody(res);
  }
  const parsed = await readBody(res);
  if (opts.okStatuses && opts.okStatuses.includes(res.status) && parsed) return parsed;
  let detail = '';
  let code = '';
  if (parsed && typeof parsed.error === 'string') detail = parsed.error;
  else if (parsed && parsed.error && typeof parsed.error === 'object') {
    code = String(parsed.error.code || '');
    detail = String(parsed.error.message || '');
  }
  const err = new ApiError({ kind: 'http', status: res.status, body: parsed, detail, code, path });
  if (res.status === 401 && !opts.noAuthHandler) onUnauthorized(err);
  throw err;
}

export const get = (path, query, opts = {}) => request(path, { ...opts, query });
export const post = (path, json, opts = {}) => request(path, { ...opts, method: 'POST', json });

/**
 * Sends an admin command; resolves with the reply (`ok` true or false) whatever the HTTP
 * status, as long as the gateway answered with a reply. Other failures throw.
 */
export function command(mac, body) {
  return request(`/api/console/devices/${encodeURIComponent(mac)}/commands`, {
    method: 'POST',
    json: body,
    okStatuses: [400, 404, 409, 502, 503, 504],
  });
}

/** Checks a token with a cheap authenticated call. Throws ApiError when it is refused. */
export function verifyToken(token) {
  return request('/api/console/fleet', { query: { limit: 1 }, token, noAuthHandler: true });
}

/**
 * What to tell the user about a failure: a sentence in their language saying what
 * happened and what to do, plus the server's own words when it gave any.
 */
export function describeError(err) {
  if (!(err instanceof ApiError)) {
    return { message: t('err.unexpected'), detail: String(err && err.message ? err.message : err) };
  }
  const detail = err.code ? `${err.code}: ${err.detail}` : err.detail;
  if (err.kind === 'network') return { message: t('err.network'), detail: '' };
  switch (err.status) {
    case 400:
      return { message: t('err.badRequest'), detail };
    case 401:
      return { message: t('err.unauthorized'), detail: '' };
    case 404:
      // A route that does not exist answers 404 without a JSON body: the console API is
      // off. Our own 404s (no such audio, device offline) carry a JSON error.
      if (!err.body) return { message: t('err.apiOff'), detail: '' };
      return { message: t('err.notFound'), detail };
    case 409:
      return { message: t('err.conflict'), detail };
    case 502:
    case 504:
      return { message: t('err.device'), detail };
    case 503:
      return { message: t('err.unavailable'), detail };
    default:
      return { message: t('err.status', { status: err.status }), detail };
  }
}
