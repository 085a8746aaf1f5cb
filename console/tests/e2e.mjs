// End-to-end test of the web console in Chromium, against a running gateway.
//
//   node console/tests/e2e.mjs
//
// Environment: CONSOLE_URL (e.g. http://127.0.0.1:8007/console), CONSOLE_TOKEN (the
// gateway's history.api_token), DEVICE_MAC (colon form, a connected device),
// EXPECTED_AUDIO_SECONDS (duration of the first user utterance of the conversation
// started at STEP talk), SCREENSHOT_DIR (default ./console-e2e-screenshots), CHROMIUM
// (default /usr/bin/chromium), E2E_GO_TIMEOUT_MS (how long to wait for GO, default 60000).
//
// Protocol with the program that runs it (one line each):
//   stdout  `STEP <name>`      the test waits for the driver to act, then read `GO`
//   stdin   `GO`               the driver has done its part (`ABORT` fails the test)
//   stdout  `METRIC <name> <value>`
//   stdout  `E2E OK` (exit 0) or `E2E FAIL <reason>` (exit 1)
// Steps that wait: `talk` (answer GO, then speak a conversation turn on DEVICE_MAC) and
// `wait_session_end` (end that conversation). Progress goes to stderr, lines starting '#'.

import { readFileSync, mkdirSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { createInterface } from 'node:readline';

const WAIT = 15000; // the longest any single UI wait may take
const env = process.env;

function required(name) {
  const v = env[name];
  if (!v) {
    console.log(`E2E FAIL missing environment variable ${name}`);
    process.exit(1);
  }
  return v;
}

const CONSOLE_URL = required('CONSOLE_URL');
const TOKEN = required('CONSOLE_TOKEN');
const MAC = required('DEVICE_MAC').toLowerCase();
// Two devices the driver has put in a call with each other (device-to-device calling).
const CALL_MACS = (env.CALL_MACS || '').toLowerCase().split(',').filter(Boolean);
const EXPECTED_AUDIO = Number(required('EXPECTED_AUDIO_SECONDS'));
const SHOTS = resolve(env.SCREENSHOT_DIR || 'console-e2e-screenshots');
const CHROMIUM = env.CHROMIUM || '/usr/bin/chromium';
const GO_TIMEOUT = Number(env.E2E_GO_TIMEOUT_MS || 60000);
const CSV_HEADER = ['id', 'mac_address', 'agent_id', 'session_id', 'chat_type', 'content', 'audio_id', 'created_at'];

let chromium;
try {
  ({ chromium } = await import('playwright-core'));
} catch {
  console.log('E2E FAIL playwright-core is not installed: run `npm ci` in console/');
  process.exit(1);
}
if (!Number.isFinite(EXPECTED_AUDIO)) {
  console.log('E2E FAIL EXPECTED_AUDIO_SECONDS is not a number');
  process.exit(1);
}
mkdirSync(SHOTS, { recursive: true });

const log = (...args) => console.error('#', ...args);

class Fail extends Error {}
function check(cond, reason) {
  if (!cond) throw new Fail(reason);
}

// --- stdin: the driver's GO lines ------------------------------------------------------

const lines = [];
let lineWaiter = null;
let stdinClosed = false;
const rl = createInterface({ input: process.stdin });
rl.on('line', (line) => {
  lines.push(line.trim());
  if (lineWaiter) lineWaiter();
});
rl.on('close', () => {
  stdinClosed = true;
  if (lineWaiter) lineWaiter();
});

/** Prints `STEP name`, then waits for `GO`. Returns the time GO arrived. */
async function step(name) {
  console.log(`STEP ${name}`);
  const deadline = Date.now() + GO_TIMEOUT;
  for (;;) {
    while (lines.length) {
      const line = lines.shift();
      if (line === 'GO') return Date.now();
      if (line === 'ABORT') throw new Fail(`the driver aborted at step ${name}`);
      if (line) log(`ignored input line: ${line}`);
    }
    check(!stdinClosed, `stdin closed while waiting for GO at step ${name}`);
    const left = deadline - Date.now();
    check(left > 0, `no GO within ${GO_TIMEOUT} ms at step ${name}`);
    await new Promise((res) => {
      const timer = setTimeout(res, left);
      lineWaiter = () => {
        clearTimeout(timer);
        lineWaiter = null;
        res();
      };
    });
  }
}

// --- helpers -------------------------------------------------------------------------------

/** RFC 4180 CSV (quoted fields may hold commas, quotes and line breaks). */
function parseCsv(text) {
  const rows = [];
  let row = [];
  let field = '';
  let quoted = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quoted) {
      if (c === '"') {
        if (text[i + 1] === '"') {
          field += '"';
          i++;
        } else quoted = false;
      } else field += c;
    } else if (c === '"') quoted = true;
    else if (c === ',') {
      row.push(field);
      field = '';
    } else if (c === '\r' && text[i + 1] === '\n') {
      /* the \n ends the row */
    } else if (c === '\n') {
      row.push(field);
      rows.push(row);
      row = [];
      field = '';
    } else field += c;
  }
  if (field !== '' || row.length) {
    row.push(field);
    rows.push(row);
  }
  return rows;
}

const errors = [];
let expect401 = false;
let page;
let browser;

async function shot(name) {
  const path = join(SHOTS, name);
  await page.screenshot({ path });
  log(`screenshot ${path}`);
}

/** The current view at phone width (375 px): no horizontal page scroll; a screenshot. */
async function phoneWidth(name) {
  await page.setViewportSize({ width: 375, height: 800 });
  await page.waitForTimeout(300);
  await shot(`${name}-phone.png`);
  const scrollWidth = await page.evaluate(() => document.documentElement.scrollWidth);
  check(scrollWidth <= 376, `${name}: horizontal page scroll at 375 px (scrollWidth ${scrollWidth})`);
  await page.setViewportSize({ width: 1280, height: 800 });
  await page.waitForTimeout(200);
}

const tid = (id) => `[data-testid="${id}"]`;

/** Awaits `promise` (a Playwright wait); a timeout fails the test saying `what` was expected. */
async function must(promise, what) {
  try {
    return await promise;
  } catch (e) {
    if (e instanceof Fail) throw e;
    const detail = e && e.message ? e.message.split('\n')[0] : String(e);
    throw new Fail(`${what} (${detail})`);
  }
}

async function main() {
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
  const context = await browser.newContext({
    viewport: { width: 1280, height: 800 },
    locale: 'en-US',
    acceptDownloads: true,
  });
  page = await context.newPage();
  page.setDefaultTimeout(WAIT);
  page.on('console', (msg) => {
    if (msg.type() !== 'error') return;
    const text = msg.text();
    const url = (msg.location() && msg.location().url) || '';
    if (expect401 && text.includes('status of 401')) return; // the wrong token, on purpose
    if (/\/readyz$/.test(url) && text.includes('status of 503')) {
      log(`warning: /readyz answered 503 (the alerts strip shows why): ${text}`);
      return;
    }
    errors.push(`console: ${text}${url ? ` (${url})` : ''}`);
  });
  page.on('pageerror', (err) => errors.push(`pageerror: ${err.message}`));
  page.on('request', (req) => {
    if (req.url().includes(TOKEN)) errors.push(`the token appeared in a URL: ${req.url()}`);
  });

  // 1. Sign-in: a wrong token is refused with a message; the right one opens the fleet.
  expect401 = true;
  await must(page.goto(CONSOLE_URL), `cannot open ${CONSOLE_URL}`);
  await must(page.waitForSelector(tid('signin-form')), 'no sign-in form');
  await page.fill(tid('signin-token'), `wrong-${TOKEN.slice(0, 3)}-not-the-token`);
  await page.click(tid('signin-submit'));
  const signinError = page.locator(tid('signin-error'));
  await must(signinError.waitFor({ state: 'visible' }), 'no message for a wrong token');
  const errorText = (await signinError.textContent()).trim();
  const errorReason = await signinError.getAttribute('data-reason');
  check(errorReason === 'unauthorized', `a wrong token was not refused as such: [${errorReason}] ${errorText}`);
  check(errorText.length > 10, 'the wrong-token message is empty');
  check(await page.locator(tid('view-fleet')).count() === 0, 'a wrong token opened the fleet view');
  log(`wrong token refused: "${errorText}"`);
  await page.fill(tid('signin-token'), TOKEN);
  await page.click(tid('signin-submit'));
  await must(page.waitForSelector(tid('view-fleet')), 'the right token did not open the fleet view');
  expect401 = false;
  check(!page.url().includes(TOKEN), 'the token is in the page URL');
  const stored = await page.evaluate(() => sessionStorage.getItem('xz-console-token'));
  check(stored === TOKEN, 'the token is not kept in sessionStorage');
  await must(page.waitForSelector(`${tid('ws-status')}[data-state="live"]`), 'the live feed (/ws/admin) did not connect');
  log('signed in; live feed connected');

  // 2. The device's row shows it online; screenshots at desktop and phone width.
  const row = page.locator(`${tid('device-row')}[data-mac="${MAC}"]`);
  await must(page.waitForFunction(
    (mac) => {
      const r = document.querySelector(`[data-testid="device-row"][data-mac="${mac}"]`);
      const s = r && r.querySelector('[data-testid="row-state"]');
      return s && (s.dataset.state === 'online' || s.dataset.state === 'in_session');
    },
    MAC,
    { timeout: 10000 },
  ), `the row of ${MAC} did not show it online within 10 s`);
  const online = Number((await page.textContent(tid('fleet-count-online'))).replace(/[^\d]/g, ''));
  check(online >= 1, `the online count is ${online}`);
  log(`row ${MAC} online; online count ${online}`);
  // Devices in a call with each other show as such, and are counted.
  for (const mac of CALL_MACS) {
    await must(page.waitForSelector(`${tid('device-row')}[data-mac="${mac}"] ${tid('row-state')}[data-state="in_call"]`),
      `the row of ${mac} does not show it in a call`);
  }
  if (CALL_MACS.length) {
    const inCall = Number((await page.textContent(tid('fleet-count-in-call'))).replace(/[^\d]/g, ''));
    check(inCall === CALL_MACS.length, `the in-call count is ${inCall}, want ${CALL_MACS.length}`);
    log(`${CALL_MACS.join(', ')} in a call; in-call count ${inCall}`);
  }
  await shot('fleet.png');
  await page.setViewportSize({ width: 375, height: 800 });
  await page.waitForTimeout(300);
  await shot('fleet-phone.png');
  const scrollWidth = await page.evaluate(() => document.documentElement.scrollWidth);
  check(scrollWidth <= 376, `horizontal page scroll at 375 px: scrollWidth ${scrollWidth}`);
  check(!(await page.locator('#nav').isVisible()), 'the navigation is not collapsed at 375 px');
  await page.setViewportSize({ width: 1280, height: 800 });
  await page.waitForTimeout(200);

  // 3. Device view: the tools, a call of set_volume(42).
  await row.locator('td.col-node').click();
  await must(page.waitForSelector(`${tid('view-device')}[data-mac="${MAC}"]`), 'clicking the row did not open the device view');
  const volumeForm = page.locator(`${tid('tool-form')}[data-tool="self.audio_speaker.set_volume"]`);
  await must(volumeForm.waitFor(), 'the device view lists no self.audio_speaker.set_volume tool');
  await must(page.waitForSelector(`${tid('device-state')}:not([data-state="unknown"])`), 'the device view shows no presence state');
  await shot('device.png');
  await phoneWidth('device');
  await volumeForm.locator(`${tid('tool-arg')}[data-arg="volume"]`).fill('42');
  await volumeForm.locator(tid('tool-call')).click();
  const result = volumeForm.locator(tid('tool-result'));
  await must(page.waitForFunction(
    () => {
      const el = document.querySelector('[data-testid="tool-form"][data-tool="self.audio_speaker.set_volume"] [data-testid="tool-result"]');
      return el && (el.dataset.ok === 'true' || el.dataset.ok === 'false');
    },
  ), 'set_volume showed no result');
  const resultText = (await result.textContent()).trim();
  check((await result.getAttribute('data-ok')) === 'true', `set_volume failed: ${resultText}`);
  log(`set_volume(42): ${resultText.replace(/\s+/g, ' ')}`);

  // 4. Live transcript: a new user and assistant message within 5 s of GO, no reload.
  await page.evaluate(() => {
    window.__e2eNoReload = true;
  });
  const maxIdBefore = await page.evaluate(() =>
    Math.max(0, ...[...document.querySelectorAll('[data-testid="live-transcript"] [data-testid="transcript-message"]')].map((e) => Number(e.dataset.id))));
  // The driver answers GO at once, then the device speaks a turn: the new messages must
  // appear without a reload. Their wall-clock arrival is reported so the driver can
  // compare it with when the device got `stt` (user) and `tts stop` (assistant).
  const go = await step('talk');
  const seen = async (role) =>
    page
      .waitForFunction(
        ({ before, role }) => {
          const item = [...document.querySelectorAll('[data-testid="live-transcript"] [data-testid="transcript-message"]')]
            .find((e) => Number(e.dataset.id) > before && e.dataset.role === role);
          return item ? { session: item.dataset.sessionId, text: item.textContent } : null;
        },
        { before: maxIdBefore, role },
        { timeout: 5000, polling: 20 },
      )
      .then(async (h) => ({ at: Date.now(), ...(await h.jsonValue()) }))
      .catch(() => null);
  const user = await seen('user');
  check(user, 'the live transcript did not show the new user message within 5 s of GO');
  const assistant = await seen('assistant');
  check(assistant, 'the live transcript did not show the new assistant message within 5 s of GO');
  const sessionId = user.session;
  check(await page.evaluate(() => window.__e2eNoReload === true), 'the page reloaded');
  console.log(`METRIC user_seen_unix_ms ${user.at}`);
  console.log(`METRIC assistant_seen_unix_ms ${assistant.at}`);
  log(`live transcript ${user.at - go} / ${assistant.at - go} ms after GO in session ${sessionId}: ${user.text.trim().slice(0, 60)} / ${assistant.text.trim().slice(0, 60)}`);
  check(sessionId, 'the transcript messages carry no session id');

  // 5. The finished conversation: messages, audio with the expected duration.
  await step('wait_session_end');
  const link = page.locator(`${tid('session-link')}[data-session-id="${sessionId}"]`);
  await must(link.waitFor(), `the sessions list does not show session ${sessionId}`);
  await link.click();
  await must(page.waitForSelector(`${tid('view-session')}[data-session-id="${sessionId}"]`), 'the conversation view did not open');
  await must(page.waitForSelector(`${tid('session-messages')} ${tid('transcript-message')}`), 'the conversation shows no messages');
  const audioCount = await page.locator(`${tid('session-messages')} ${tid('message-audio')}`).count();
  check(audioCount >= 1, 'the conversation shows no audio player');
  const firstUserAudio = page.locator(`${tid('session-messages')} [data-role="user"] ${tid('message-audio')}`).first();
  check(await firstUserAudio.count() === 1, 'the first user message has no audio player');
  await firstUserAudio.scrollIntoViewIfNeeded();
  const handle = await firstUserAudio.elementHandle();
  await must(page.waitForFunction((el) => el.dataset.loaded === 'true' || el.dataset.loaded === 'error', handle), 'the audio was never fetched');
  check((await firstUserAudio.getAttribute('data-loaded')) === 'true', 'the audio did not load');
  await must(page.waitForFunction((el) => el.readyState >= 1 && Number.isFinite(el.duration), handle), 'the audio has no duration');
  const duration = await page.evaluate((el) => el.duration, handle);
  log(`audio duration ${duration.toFixed(3)} s, expected ${EXPECTED_AUDIO} s; ${audioCount} players`);
  // The WAV holds exactly the frames the device spoke (one 60 ms frame more or less fails).
  check(Math.abs(duration - EXPECTED_AUDIO) <= 0.03, `audio duration ${duration} s, expected ${EXPECTED_AUDIO} ± 0.03 s`);
  await page.evaluate(() => window.scrollTo(0, 0));
  await shot('session.png');
  await phoneWidth('session');

  // 6. Statistics: the chart and at least one session.
  await page.click(tid('nav-stats'));
  await must(page.waitForSelector(tid('view-stats')), 'the statistics view did not open');
  await must(page.waitForSelector(`canvas${tid('stats-chart')}`), 'the statistics view has no chart');
  await must(page.waitForFunction(() => {
    const el = document.querySelector('[data-testid="stats-total-sessions"]');
    return el && Number(el.dataset.value) >= 1;
  }), 'the statistics do not count a session');
  const canvasBox = await page.locator(`canvas${tid('stats-chart')}`).boundingBox();
  check(canvasBox && canvasBox.width > 100 && canvasBox.height > 100, 'the chart canvas has no size');
  await shot('stats.png');
  await phoneWidth('stats');

  // 7. Export: CSV and JSON Lines for the device, downloaded by the browser.
  await page.click(tid('nav-export'));
  await must(page.waitForSelector(tid('export-form')), 'the export view did not open');
  await page.fill(tid('export-mac'), MAC);
  await page.fill(tid('export-from'), '');
  await page.fill(tid('export-to'), '');
  await page.check(tid('export-format-csv'));
  let [download] = await must(Promise.all([page.waitForEvent('download'), page.click(tid('export-submit'))]), 'the CSV export did not download');
  const csv = readFileSync(await download.path(), 'utf8');
  const csvRows = parseCsv(csv).filter((r) => r.length > 1 || r[0] !== '');
  check(csvRows.length > 0 && csvRows[0].join(',') === CSV_HEADER.join(','), `CSV header is ${JSON.stringify(csvRows[0])}`);
  const csvData = csvRows.slice(1);
  check(csvData.length >= 2, `CSV has ${csvData.length} data rows`);
  check(csvData.every((r) => r[1] === MAC), 'a CSV row is not of the device');
  log(`CSV ${download.suggestedFilename()}: ${csvData.length} rows`);
  await must(page.waitForSelector(`${tid('export-status')}[data-state="ok"]`), 'the export view did not confirm the download');
  await page.check(tid('export-format-jsonl'));
  [download] = await must(Promise.all([page.waitForEvent('download'), page.click(tid('export-submit'))]), 'the JSON Lines export did not download');
  const jsonl = readFileSync(await download.path(), 'utf8').split('\n').filter((l) => l.trim() !== '');
  check(jsonl.length >= 2, `JSON Lines has ${jsonl.length} lines`);
  for (const [i, l] of jsonl.entries()) {
    let obj;
    try {
      obj = JSON.parse(l);
    } catch {
      throw new Fail(`JSON Lines line ${i + 1} is not JSON`);
    }
    check(obj.mac_address === MAC, `JSON Lines line ${i + 1} is not of the device`);
  }
  log(`JSON Lines ${download.suggestedFilename()}: ${jsonl.length} lines`);
  await shot('export.png');
  await phoneWidth('export');

  // 8. Chinese.
  await page.click(tid('nav-fleet'));
  await must(page.waitForSelector(tid('view-fleet')), 'the fleet view did not open');
  const navBefore = (await page.textContent(tid('nav-fleet'))).trim();
  const headBefore = (await page.textContent(`${tid('view-fleet')} h1`)).trim();
  await page.click(tid('lang-toggle'));
  await must(page.waitForFunction(() => document.documentElement.lang === 'zh-CN'), '<html lang> did not become zh-CN');
  await must(page.waitForFunction((before) => document.querySelector('[data-testid="nav-fleet"]').textContent.trim() !== before, navBefore), 'the navigation labels did not change language');
  const navAfter = (await page.textContent(tid('nav-fleet'))).trim();
  const headAfter = (await page.textContent(`${tid('view-fleet')} h1`)).trim();
  check(navAfter === '设备总览' && headAfter !== headBefore, `the labels did not change to Chinese: ${navAfter} / ${headAfter}`);
  await must(page.waitForSelector(`${tid('device-row')}[data-mac="${MAC}"]`), 'the fleet view in Chinese does not list the device');
  await shot('fleet-zh.png');
  log(`language: ${navBefore} -> ${navAfter}`);

  // 9. Disconnect through the confirmation dialog; the state turns offline live.
  await page.locator(`${tid('device-row')}[data-mac="${MAC}"] td.col-node`).click();
  await must(page.waitForSelector(`${tid('view-device')}[data-mac="${MAC}"]`), 'the device view did not open again');
  await must(page.waitForSelector(`${tid('device-state')}:not([data-state="unknown"]):not([data-state="offline"])`), 'the device is not connected before the disconnect');

  // 9a. Push an alert from the device view: it shows as sent, live; the driver checks that
  // the device read it.
  const pushForm = page.locator(tid('device-push-form'));
  await must(pushForm.waitFor(), 'the device view has no push form');
  await pushForm.locator(tid('push-kind')).selectOption('alert');
  await pushForm.locator(`${tid('push-field')}[data-field="status"]`).fill('E2E');
  await pushForm.locator(`${tid('push-field')}[data-field="message"]`).fill('console push');
  await pushForm.locator(tid('push-submit')).click();
  await page.waitForSelector(`${tid('device-push')} ${tid('push-row')} ${tid('push-state')}[data-state="sent"]`, { timeout: 10000 }).catch(() => {
    throw new Fail('the pushed alert did not show as sent within 10 s');
  });
  await shot('device-push.png');
  await step('pushed');
  // The fleet view's queue lists it too, with its state; then back to the device.
  await page.evaluate(() => {
    location.hash = '#/fleet';
  });
  await must(page.waitForSelector(`${tid('fleet-push')} ${tid('push-row')}[data-mac="${MAC}"] ${tid('push-state')}[data-state="sent"]`), 'the fleet view\'s push queue does not list the sent alert');
  await must(page.waitForSelector(`${tid('fleet-push-form')} ${tid('push-kind')}`), 'the fleet view has no push form');
  await shot('fleet-push.png');
  await page.evaluate((mac) => {
    location.hash = `#/device/${mac}`;
  }, MAC);
  await must(page.waitForSelector(`${tid('view-device')}[data-mac="${MAC}"] ${tid('device-state')}:not([data-state="unknown"]):not([data-state="offline"])`), 'the device view did not open again after the fleet view');
  await page.evaluate(() => {
    window.__e2eNoReload = true;
  });
  await page.click(tid('device-kick'));
  await must(page.waitForSelector(`${tid('confirm-dialog')}[open]`), 'Disconnect opened no confirmation dialog');
  const kickedAt = Date.now();
  await page.click(tid('confirm-ok'));
  await page.waitForSelector(`${tid('device-state')}[data-state="offline"]`, { timeout: 5000 }).catch(() => {
    throw new Fail('the device did not turn offline within 5 s of the disconnect');
  });
  check(await page.evaluate(() => window.__e2eNoReload === true), 'the page reloaded');
  log(`offline ${Date.now() - kickedAt} ms after confirming`);
  const status = page.locator(tid('device-command-status'));
  await must(page.waitForFunction(() => document.querySelector('[data-testid="device-command-status"]').dataset.ok !== 'pending'), 'the disconnect got no reply');
  check((await status.getAttribute('data-ok')) === 'true', `kick reply: ${await status.textContent()}`);

  // 10. No errors in the browser console at any point.
  await page.waitForTimeout(300);
  check(errors.length === 0, `browser errors: ${errors.join(' | ')}`);
}

const overall = setTimeout(() => {
  console.log('E2E FAIL the whole run took longer than 10 minutes');
  process.exit(1);
}, 10 * 60 * 1000);

try {
  await main();
  console.log('E2E OK');
  await browser.close();
  clearTimeout(overall);
  rl.close();
  process.exit(0);
} catch (e) {
  const reason = e instanceof Fail ? e.message : `${e && e.name ? e.name : 'Error'}: ${e && e.message ? e.message.split('\n')[0] : e}`;
  if (page) {
    await page.screenshot({ path: join(SHOTS, 'failure.png'), fullPage: true }).catch(() => {});
  }
  if (errors.length) log(`browser errors so far: ${errors.join(' | ')}`);
  console.log(`E2E FAIL ${reason.replace(/\s+/g, ' ')}`);
  if (browser) await browser.close().catch(() => {});
  process.exit(1);
}
