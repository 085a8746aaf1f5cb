// Times. Presence and the live feed give unix milliseconds; chat history gives strings
// "YYYY-MM-DD HH:MM:SS.mmm" written in history.utc_offset_minutes (480 unless the
// gateway says otherwise, see app.js). Everything is shown in the browser's time zone.

import { locale, t } from './i18n.js';

let historyOffsetMinutes = 480;

export function setHistoryOffset(minutes) {
  if (Number.isFinite(minutes)) historyOffsetMinutes = minutes;
}

export function getHistoryOffset() {
  return historyOffsetMinutes;
}

const HISTORY_TIME = /^(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?/;

/** A history time string as a Date (null when it does not parse). */
export function parseHistoryTime(s) {
  const m = HISTORY_TIME.exec(String(s || ''));
  if (!m) return null;
  const ms = m[7] ? Number(m[7].slice(0, 3).padEnd(3, '0')) : 0;
  const utc = Date.UTC(+m[1], +m[2] - 1, +m[3], +m[4], +m[5], +m[6], ms);
  return new Date(utc - historyOffsetMinutes * 60000);
}

/** The history zone's own reading of "now" as a Date whose UTC fields are that zone's. */
function historyNow() {
  return new Date(Date.now() + historyOffsetMinutes * 60000);
}

/** Today in the history zone, YYYY-MM-DD (the zone stats and exports count days in). */
export function historyToday() {
  return historyNow().toISOString().slice(0, 10);
}

/** YYYY-MM-DD of `days` days before `day` (YYYY-MM-DD). */
export function addDays(day, days) {
  const [y, m, d] = day.split('-').map(Number);
  return new Date(Date.UTC(y, m - 1, d + days)).toISOString().slice(0, 10);
}

/** The unix ms of the browser's local midnight today ("seen today"). */
export function localMidnightMs() {
  const d = new Date();
  d.setHours(0, 0, 0, 0);
  return d.getTime();
}

const formatters = new Map();
function fmt(key, options) {
  const k = `${locale()}|${key}`;
  if (!formatters.has(k)) formatters.set(k, new Intl.DateTimeFormat(locale(), options));
  return formatters.get(k);
}

function asDate(v) {
  if (v == null || v === '') return null;
  if (v instanceof Date) return v;
  if (typeof v === 'number') return new Date(v);
  return parseHistoryTime(v);
}

/** Date and time, e.g. "Nov 26, 2025, 2:59:11 PM". */
export function formatDateTime(v) {
  const d = asDate(v);
  if (!d || Number.isNaN(d.getTime())) return t('common.unknown');
  const today = new Date();
  const sameDay =
    d.getFullYear() === today.getFullYear() &&
    d.getMonth() === today.getMonth() &&
    d.getDate() === today.getDate();
  if (sameDay) return fmt('time', { timeStyle: 'medium' }).format(d);
  return fmt('datetime', { dateStyle: 'medium', timeStyle: 'medium' }).format(d);
}

/** Always the full date and time (tooltips, the session header). */
export function formatFull(v) {
  const d = asDate(v);
  if (!d || Number.isNaN(d.getTime())) return t('common.unknown');
  return fmt('full', { dateStyle: 'medium', timeStyle: 'medium' }).format(d);
}

/** Time of day only (chat bubbles). */
export function formatTime(v) {
  const d = asDate(v);
  if (!d || Number.isNaN(d.getTime())) return '';
  return fmt('time', { timeStyle: 'medium' }).format(d);
}

/** A YYYY-MM-DD day as a short label (chart axes), the day itself, no zone shift. */
export function formatDay(day) {
  const [y, m, d] = String(day).split('-').map(Number);
  if (!y || !m || !d) return String(day);
  return fmt('day', { month: 'numeric', day: 'numeric', timeZone: 'UTC' }).format(
    new Date(Date.UTC(y, m - 1, d)),
  );
}

/** A duration in ms, e.g. "1 min 5 s" / "1分5秒". */
export function formatDuration(ms) {
  if (!Number.isFinite(ms) || ms < 0) return t('common.unknown');
  const total = Math.round(ms / 1000);
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  if (h) return t('duration.hms', { h, m, s });
  if (m) return t('duration.ms', { m, s });
  return t('duration.s', { s });
}

/** A number in the user's locale. */
export function formatNumber(n, digits = 0) {
  if (!Number.isFinite(Number(n))) return '0';
  return new Intl.NumberFormat(locale(), {
    maximumFractionDigits: digits,
    minimumFractionDigits: 0,
  }).format(Number(n));
}
