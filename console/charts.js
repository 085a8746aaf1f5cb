// Charts, drawn by the vendored Chart.js (vendor/chart.js/chart.umd.min.js, loaded by
// index.html as a classic script: it defines window.Chart).

import { h } from './dom.js';
import { t } from './i18n.js';
import { formatDay, formatNumber } from './time.js';

function cssVar(name, fallback) {
  const v = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  return v || fallback;
}

/**
 * A chart of per-day series in a sized box. `series`: [{label, data, kind: 'bar' |
 * 'line', color: CSS variable name, axis: 'y' | 'y2', digits}]. Returns {el, chart}; the
 * caller destroys the chart with its scope.
 */
export function dayChart({ days, series, testid, label }) {
  const canvas = h('canvas', { testid, role: 'img', 'aria-label': label });
  const box = h('div', { class: 'chart-box' }, canvas);
  const Chart = window.Chart;
  if (typeof Chart !== 'function') {
    return { el: h('p', { class: 'form-error', testid: `${testid}-missing`, text: t('chart.missing') }), chart: null };
  }
  const text = cssVar('--text-muted', '#555');
  const grid = cssVar('--border', '#ddd');
  const hasY2 = series.some((s) => s.axis === 'y2');
  const chart = new Chart(canvas, {
    data: {
      labels: days.map((d) => formatDay(d)),
      datasets: series.map((s) => {
        const color = cssVar(s.color, '#1f6feb');
        return {
          type: s.kind || 'bar',
          label: s.label,
          data: s.data,
          yAxisID: s.axis || 'y',
          backgroundColor: s.kind === 'line' ? color : `${color}cc`,
          borderColor: color,
          borderWidth: s.kind === 'line' ? 2 : 0,
          pointRadius: s.kind === 'line' ? 2 : 0,
          tension: 0.25,
          order: s.kind === 'line' ? 0 : 1,
        };
      }),
    },
    options: {
      animation: false,
      responsive: true,
      maintainAspectRatio: false,
      interaction: { mode: 'index', intersect: false },
      plugins: {
        legend: { labels: { color: text, boxWidth: 12 } },
        tooltip: {
          callbacks: {
            title: (items) => (items.length ? days[items[0].dataIndex] : ''),
            label: (item) => {
              const s = series[item.datasetIndex];
              return `${s.label}: ${formatNumber(item.parsed.y, s.digits || 0)}`;
            },
          },
        },
      },
      scales: {
        x: { ticks: { color: text, maxRotation: 0, autoSkip: true }, grid: { display: false } },
        y: {
          beginAtZero: true,
          ticks: { color: text, precision: 0 },
          grid: { color: grid },
        },
        ...(hasY2
          ? { y2: { position: 'right', beginAtZero: true, ticks: { color: text }, grid: { display: false } } }
          : {}),
      },
    },
  });
  return { el: box, chart };
}
