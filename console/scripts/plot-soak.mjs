// Renders a soak's time series (soak.csv from `xiaozhi-gateway soak`) to a PNG: the
// gateway's RSS (MB) and live tokio tasks over time, with the fault windows shaded.
// It reuses the console's vendored Chart.js and draws in Chromium through
// playwright-core, so the docs' plot needs nothing the console does not already use.
//
//   node console/scripts/plot-soak.mjs soak-report/soak.csv docs/soak-1h.png ["title"]
//
// Environment: CHROMIUM (default /usr/bin/chromium).

import { readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const [csvPath, pngPath, title = 'xiaozhi-gateway soak'] = process.argv.slice(2);
if (!csvPath || !pngPath) {
  console.error('usage: node plot-soak.mjs SOAK.csv OUT.png [TITLE]');
  process.exit(2);
}
const here = dirname(fileURLToPath(import.meta.url));
const chartJs = join(here, '..', 'vendor', 'chart.js', 'chart.umd.min.js');

const [header, ...lines] = readFileSync(csvPath, 'utf8').trim().split('\n');
const cols = header.split(',');
const rows = lines.map((l) => Object.fromEntries(l.split(',').map((v, i) => [cols[i], v])));
if (rows.length === 0) {
  console.error(`${csvPath} has no samples`);
  process.exit(1);
}
const minutes = (r) => Number(r.t_secs) / 60;
const points = (key, scale = 1) => rows.map((r) => ({ x: minutes(r), y: Number(r[key]) / scale }));

// Contiguous runs of the same non-empty fault label, and the drain phase.
const windows = [];
for (let i = 0; i < rows.length; i++) {
  const f = rows[i].fault;
  if (!f) continue;
  const last = windows[windows.length - 1];
  if (last && last.label === f && last.endIndex === i - 1) {
    last.end = minutes(rows[i]);
    last.endIndex = i;
  } else {
    windows.push({ label: f, start: minutes(rows[i]), end: minutes(rows[i]), endIndex: i });
  }
}
const step = rows.length > 1 ? minutes(rows[1]) - minutes(rows[0]) : 0;
for (const w of windows) w.end += step;
const drainAt = rows.find((r) => r.phase === 'drain');

const spec = {
  title,
  windows,
  drainAt: drainAt ? minutes(drainAt) : null,
  lastX: minutes(rows[rows.length - 1]),
  rss: points('rss_kb', 1024),
  tasks: points('tasks_alive'),
  sessions: points('sessions_live'),
};

const { chromium } = await import('playwright-core');
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 600 }, deviceScaleFactor: 1 });
  await page.setContent('<html><body style="margin:0;background:#fff"><canvas id="c" width="1200" height="600"></canvas></body></html>');
  await page.addScriptTag({ path: resolve(chartJs) });
  await page.evaluate((spec) => {
    const colors = { db: 'rgba(220,60,60,0.15)', redis: 'rgba(230,150,30,0.18)', upstream: 'rgba(60,120,220,0.15)', restart: 'rgba(140,60,200,0.25)' };
    const shade = {
      id: 'faults',
      beforeDatasetsDraw(chart) {
        const { ctx, chartArea: a, scales: { x } } = chart;
        ctx.save();
        for (const w of spec.windows) {
          const x0 = x.getPixelForValue(w.start);
          const x1 = Math.max(x.getPixelForValue(w.end), x0 + 3);
          ctx.fillStyle = colors[w.label.split('+')[0]] || 'rgba(120,120,120,0.15)';
          ctx.fillRect(x0, a.top, x1 - x0, a.bottom - a.top);
          ctx.fillStyle = '#444';
          ctx.font = '12px sans-serif';
          ctx.fillText(`${w.label} cut`.replace('restart cut', 'upstream restart'), x0 + 3, a.top + 14);
        }
        if (spec.drainAt !== null) {
          const xd = x.getPixelForValue(spec.drainAt);
          ctx.strokeStyle = '#888';
          ctx.setLineDash([4, 4]);
          ctx.beginPath();
          ctx.moveTo(xd, a.top);
          ctx.lineTo(xd, a.bottom);
          ctx.stroke();
          ctx.fillStyle = '#444';
          ctx.fillText('fleet stopped', xd + 3, a.bottom - 6);
        }
        ctx.restore();
      },
    };
    new window.Chart(document.getElementById('c'), {
      type: 'line',
      data: {
        datasets: [
          { label: 'gateway RSS (MB)', data: spec.rss, borderColor: '#c0392b', yAxisID: 'mb', pointRadius: 0, borderWidth: 2 },
          { label: 'tokio tasks alive', data: spec.tasks, borderColor: '#2471a3', yAxisID: 'n', pointRadius: 0, borderWidth: 2 },
          { label: 'conversations live', data: spec.sessions, borderColor: '#7f8c8d', yAxisID: 'n', pointRadius: 0, borderWidth: 1, borderDash: [3, 3] },
        ],
      },
      options: {
        animation: false,
        responsive: false,
        parsing: false,
        plugins: { title: { display: true, text: spec.title, font: { size: 16 } }, legend: { position: 'bottom' } },
        scales: {
          x: { type: 'linear', min: 0, max: spec.lastX, title: { display: true, text: 'minutes' } },
          mb: { type: 'linear', position: 'left', beginAtZero: true, title: { display: true, text: 'RSS (MB)' } },
          n: { type: 'linear', position: 'right', beginAtZero: true, grid: { drawOnChartArea: false }, title: { display: true, text: 'tasks / conversations' } },
        },
      },
      plugins: [shade],
    });
  }, spec);
  await page.locator('#c').screenshot({ path: pngPath });
  console.log(`wrote ${pngPath} (${rows.length} samples, ${windows.length} fault window(s))`);
} finally {
  await browser.close();
}
