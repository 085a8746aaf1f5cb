// Checks console/i18n.js: English and Chinese have the same keys, and every key the
// code names ('area.name' string literals, data-i18n attributes) exists.
// Run: node console/tests/i18n-check.mjs
import { readFileSync, readdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const src = readFileSync(join(root, 'i18n.js'), 'utf8');
function block(name) {
  const start = src.indexOf(`const ${name} = {`);
  const end = src.indexOf('\n};', start);
  return new Set([...src.slice(start, end).matchAll(/^\s+'([^']+)':/gm)].map((m) => m[1]));
}
const en = block('en');
const zh = block('zh');
const problems = [];
for (const k of en) if (!zh.has(k)) problems.push(`zh-CN lacks ${k}`);
for (const k of zh) if (!en.has(k)) problems.push(`en lacks ${k}`);
const prefixes = new Set([...en].map((k) => k.split('.')[0]));
const files = ['app.js', 'alerts.js', 'api.js', 'charts.js', 'time.js', 'dom.js', 'live.js',
  ...readdirSync(join(root, 'views')).map((f) => `views/${f}`)];
for (const f of files) {
  const text = readFileSync(join(root, f), 'utf8');
  for (const m of text.matchAll(/['`]([a-zA-Z]+(?:\.[A-Za-z_]+)+)['`]/g)) {
    const key = m[1];
    if (!prefixes.has(key.split('.')[0]) || /\.(js|json|png)$/.test(key)) continue;
    if (!en.has(key)) problems.push(`${f}: no string for ${key}`);
  }
}
const html = readFileSync(join(root, 'index.html'), 'utf8');
for (const m of html.matchAll(/data-i18n(?:-aria)?="([^"]+)"/g)) if (!en.has(m[1])) problems.push(`index.html: no string for ${m[1]}`);
// Keys built at run time.
const dynamic = [
  ...['online', 'in_session', 'in_call', 'offline', 'unknown'].map((s) => `state.${s}`),
  ...['user', 'assistant', 'tool', 'other'].map((s) => `msg.role.${s}`),
  ...['none', 'live', 'ended'].map((s) => `device.transcriptState.${s}`),
  ...['device_offline', 'device_timeout', 'device_error', 'no_conversation', 'busy', 'presence_unavailable',
    'invalid_command', 'malformed_json', 'unknown_command', 'wrong_topic', 'other'].map((c) => `cmd.err.${c}`),
  ...['database', 'presence', 'upstream'].flatMap((c) => [`alerts.check.${c}`, `alerts.help.${c}`]),
];
for (const k of dynamic) if (!en.has(k)) problems.push(`no string for ${k}`);
if (problems.length) {
  console.log(problems.join('\n'));
  process.exit(1);
}
console.log(`i18n OK: ${en.size} strings in each language`);
