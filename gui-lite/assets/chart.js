// Small SVG charts built with createElementNS (no library, no markup strings): a line chart of
// loss curves and a horizontal bar chart. Each chart is drawn at the SVG's own width in CSS
// pixels so that its text stays readable on a phone, and is redrawn when that width changes.
// Colours come from the stylesheet through the series-N classes.

// The SVG namespace is an identifier, not an address that is ever loaded.
export const SVG_NS = 'http://www.w3.org/2000/svg';
export const PALETTE_SIZE = 8;

export function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined) node.setAttribute(name, String(value));
  }
  node.append(...children.map((c) => (c instanceof Node ? c : String(c))));
  return node;
}

const drawn = new WeakMap(); // svg element -> function that draws it at a width
const resizes = new ResizeObserver((entries) => {
  for (const entry of entries) {
    const draw = drawn.get(entry.target);
    const width = Math.round(entry.contentRect.width);
    if (draw && width > 0 && width !== draw.width) draw(width);
  }
});

function mount(element, draw) {
  const redraw = (width) => {
    redraw.width = width;
    draw(width);
  };
  drawn.set(element, redraw);
  resizes.observe(element);
  redraw(Math.round(element.getBoundingClientRect().width) || 600);
}

// About `count` round numbers spanning [lo, hi]: 0, 0.5, 1, ...
export function niceTicks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
  return ticks;
}

const tickText = (t) => (Math.abs(t) >= 1000 || (Math.abs(t) < 0.01 && t !== 0) ? t.toExponential(1) : String(Number(t.toPrecision(4))));

// Lines over a shared x axis.
// series: [{ label, points: [[x, y], ...], colour: 0..7 or 'strong', markers?: bool }]
// options: { xLabel, yLabel, empty: text shown when there are no points, xIntegers?: bool }
export function lineChart(element, series, options) {
  mount(element, (width) => drawLines(element, width, series, options));
}

function drawLines(element, width, series, { xLabel, yLabel, empty, xIntegers }) {
  const height = width < 480 ? 220 : 280;
  const m = { top: 12, right: 14, bottom: 44, left: 54 };
  element.setAttribute('viewBox', `0 0 ${width} ${height}`);
  element.setAttribute('height', String(height));
  const points = series.flatMap((s) => s.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  if (points.length === 0) {
    element.replaceChildren(svg('text', { x: width / 2, y: height / 2, class: 'chart-empty', 'text-anchor': 'middle' }, empty));
    return;
  }
  let [x0, x1] = [Math.min(...points.map((p) => p[0])), Math.max(...points.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...points.map((p) => p[1])), Math.max(...points.map((p) => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  const pad = (y1 - y0) * 0.08 || Math.abs(y0) * 0.1 || 1;
  y0 -= pad;
  y1 += pad;
  const sx = (x) => m.left + ((x - x0) / (x1 - x0)) * (width - m.left - m.right);
  const sy = (y) => height - m.bottom - ((y - y0) / (y1 - y0)) * (height - m.top - m.bottom);

  const grid = svg('g', { class: 'chart-grid' });
  const labels = svg('g', { class: 'chart-labels' });
  for (const t of niceTicks(y0, y1, height < 250 ? 4 : 5)) {
    grid.append(svg('line', { x1: m.left, x2: width - m.right, y1: sy(t), y2: sy(t) }));
    labels.append(svg('text', { x: m.left - 6, y: sy(t), 'text-anchor': 'end', 'dominant-baseline': 'middle' }, tickText(t)));
  }
  let xTicks = niceTicks(x0, x1, Math.max(2, Math.floor(width / 90)));
  if (xIntegers) xTicks = [...new Set(xTicks.map(Math.round))].filter((t) => t >= x0 && t <= x1);
  for (const t of xTicks) {
    grid.append(svg('line', { x1: sx(t), x2: sx(t), y1: m.top, y2: height - m.bottom }));
    labels.append(svg('text', { x: sx(t), y: height - m.bottom + 16, 'text-anchor': 'middle' }, tickText(t)));
  }
  labels.append(svg('text', { x: (m.left + width - m.right) / 2, y: height - 6, 'text-anchor': 'middle', class: 'chart-axis-label' }, xLabel));
  labels.append(
    svg('text', { x: 12, y: (m.top + height - m.bottom) / 2, 'text-anchor': 'middle', class: 'chart-axis-label', transform: `rotate(-90 12 ${(m.top + height - m.bottom) / 2})` }, yLabel),
  );

  const lines = svg('g', {});
  for (const s of series) {
    const pts = s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
    if (pts.length === 0) continue;
    const cls = `series-${s.colour}`;
    lines.append(svg('polyline', { class: `chart-line ${cls}`, points: pts.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(' ') }));
    if (s.markers || pts.length === 1) {
      for (const [x, y] of pts) {
        lines.append(svg('circle', { class: `chart-dot ${cls}`, cx: sx(x), cy: sy(y), r: 4 }, svg('title', {}, `${s.label}: ${tickText(y)} at ${xLabel.toLowerCase()} ${tickText(x)}`)));
      }
    }
  }
  const frame = svg('rect', { class: 'chart-frame', x: m.left, y: m.top, width: width - m.left - m.right, height: height - m.top - m.bottom });
  element.replaceChildren(grid, frame, lines, labels);
}

// Horizontal bars, one row each: bars: [{ label, value, text, title }]. Negative values draw
// nothing (the number still shows).
export function barChart(element, bars, { empty }) {
  mount(element, (width) => drawBars(element, width, bars, empty));
}

function drawBars(element, width, bars, empty) {
  const row = 30;
  const labelWidth = Math.min(150, Math.round(width * 0.34));
  const valueWidth = Math.min(120, Math.round(width * 0.26));
  const height = Math.max(60, bars.length * row + 12);
  element.setAttribute('viewBox', `0 0 ${width} ${height}`);
  element.setAttribute('height', String(height));
  if (bars.length === 0) {
    element.replaceChildren(svg('text', { x: width / 2, y: height / 2, class: 'chart-empty', 'text-anchor': 'middle' }, empty));
    return;
  }
  const max = Math.max(...bars.map((b) => b.value), 0) || 1;
  const span = width - labelWidth - valueWidth - 12;
  const rows = bars.map((b, i) => {
    const y = 6 + i * row;
    const w = Math.max(0, (b.value / max) * span);
    return svg(
      'g',
      { class: 'chart-bar-row' },
      svg('title', {}, b.title ?? `${b.label}: ${b.text}`),
      svg('text', { x: labelWidth - 8, y: y + row / 2, 'text-anchor': 'end', 'dominant-baseline': 'middle', class: 'chart-labels' }, b.label),
      svg('rect', { x: labelWidth, y: y + 5, width: w.toFixed(1), height: row - 10, rx: 3, class: `chart-bar series-${i % PALETTE_SIZE}` }),
      svg('text', { x: labelWidth + w + 6, y: y + row / 2, 'dominant-baseline': 'middle', class: 'chart-labels' }, b.text),
    );
  });
  element.replaceChildren(...rows);
}
