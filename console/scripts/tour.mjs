// A timed tour of the console against a running gateway: how long each view takes to
// show its data, and (optionally) a screenshot of each view for the docs.
//
//   CONSOLE_URL=http://127.0.0.1:8007/console/ CONSOLE_TOKEN=... node console/scripts/tour.mjs
//
// Environment: CONSOLE_URL, CONSOLE_TOKEN (history.api_token), RUNS (default 5),
// SHOTS (a directory: save fleet.png, device.png, session.png, stats.png, export.png,
// fleet-phone.png there; default: none), LANG_ZH=1 (phone screenshot in Chinese),
// DEVICE (a MAC: open this device's view instead of the first row's),
// CHROMIUM (default /usr/bin/chromium).
//
// Each run uses a fresh browser context (empty cache) and measures, from the moment the
// page is asked for:
//   fleet    sign-in submitted -> device rows and fleet counts shown
//   reload   page reloaded with the token in sessionStorage -> rows and counts shown
//   device   row clicked -> the device's sessions and per-day chart shown
//   stats    statistics opened -> totals and chart shown
// Prints one line per run and the median of each.

import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

const env = process.env;
const URL_ = env.CONSOLE_URL;
const TOKEN = env.CONSOLE_TOKEN;
if (!URL_ || !TOKEN) {
  console.error('set CONSOLE_URL and CONSOLE_TOKEN');
  process.exit(2);
}
const RUNS = Number(env.RUNS || 5);
const SHOTS = env.SHOTS || '';
const WAIT = 60000;
const { chromium } = await import('playwright-core');
const tid = (id) => `[data-testid="${id}"]`;

const browser = await chromium.launch({
  executablePath: env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox'],
});

async function fleetShown(page) {
  await page.waitForSelector(tid('device-row'), { timeout: WAIT });
  await page.waitForFunction(
    (sel) => /\d/.test(document.querySelector(sel)?.textContent || ''),
    tid('fleet-count-online'),
    { timeout: WAIT },
  );
}

const results = { fleet: [], reload: [], device: [], stats: [] };
for (let run = 0; run < RUNS; run++) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  await page.goto(URL_);
  await page.waitForSelector(tid('signin-form'), { timeout: WAIT });
  await page.fill(tid('signin-token'), TOKEN);
  let t = performance.now();
  await page.click(tid('signin-submit'));
  await fleetShown(page);
  results.fleet.push(performance.now() - t);
  if (SHOTS && run === 0) {
    mkdirSync(SHOTS, { recursive: true });
    await page.waitForTimeout(500);
    await page.screenshot({ path: join(SHOTS, 'fleet.png') });
  }

  t = performance.now();
  await page.reload();
  await fleetShown(page);
  results.reload.push(performance.now() - t);

  // The first device with history (sorted by MAC, the first row may have none).
  t = performance.now();
  if (env.DEVICE) await page.goto(`${URL_}#/device/${env.DEVICE}`);
  else await page.locator(tid('device-link')).first().click();
  await page.waitForSelector(tid('view-device'), { timeout: WAIT });
  await page.waitForSelector(`${tid('device-stats-chart')}, ${tid('device-stats')} canvas`, { timeout: WAIT });
  await page.waitForSelector(`${tid('session-row')}, ${tid('device-sessions')} .empty`, { timeout: WAIT });
  results.device.push(performance.now() - t);
  if (SHOTS && run === 0) {
    await page.waitForTimeout(800);
    await page.screenshot({ path: join(SHOTS, 'device.png') });
    const session = page.locator(tid('session-link')).first();
    if (await session.count()) {
      await session.click();
      await page.waitForSelector(`${tid('session-messages')} ${tid('transcript-message')}`, { timeout: WAIT });
      await page.waitForTimeout(800);
      await page.screenshot({ path: join(SHOTS, 'session.png') });
    }
  }

  t = performance.now();
  await page.click(tid('nav-stats'));
  await page.waitForSelector(`${tid('stats-total-sessions')}[data-value]`, { timeout: WAIT });
  await page.waitForSelector(`${tid('stats-chart')}`, { timeout: WAIT });
  results.stats.push(performance.now() - t);
  if (SHOTS && run === 0) {
    await page.waitForTimeout(800);
    await page.screenshot({ path: join(SHOTS, 'stats.png') });
    await page.click(tid('nav-export'));
    await page.waitForSelector(tid('export-form'), { timeout: WAIT });
    await page.screenshot({ path: join(SHOTS, 'export.png') });
    // Phone width, optionally in Chinese.
    await page.click(tid('nav-fleet')).catch(() => page.goto(`${URL_}#/fleet`));
    await fleetShown(page);
    if (env.LANG_ZH) await page.click(tid('lang-toggle'));
    await page.setViewportSize({ width: 375, height: 800 });
    await page.waitForTimeout(800);
    await page.screenshot({ path: join(SHOTS, 'fleet-phone.png') });
  }
  await context.close();
  const last = (k) => results[k][results[k].length - 1].toFixed(0).padStart(6);
  console.log(`run ${run + 1}: fleet ${last('fleet')} ms, reload ${last('reload')} ms, device ${last('device')} ms, stats ${last('stats')} ms`);
}
await browser.close();

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
};
console.log(
  `median of ${RUNS}: ` +
    Object.entries(results)
      .map(([k, xs]) => `${k} ${median(xs).toFixed(0)} ms`)
      .join(', '),
);
