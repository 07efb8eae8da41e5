// Line charts as SVG, drawn with the DOM (no library): one chart, several series, linear axes with round ticks.
const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 560;
const HEIGHT = 250;
const PAD = { left: 58, right: 12, top: 10, bottom: 30 };
const MAX_DRAWN = 1500; // points per line: a long run's curve is thinned to about this many (its last one kept)

function el(name, attrs, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// About `count` round values covering [lo, hi] (1, 2 or 5 times a power of ten apart).
function ticks(lo, hi, count) {
  if (lo === hi) return [lo];
  const raw = (hi - lo) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

function label(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(1);
  return String(Number(v.toPrecision(4)));
}

function thin(points) {
  if (points.length <= MAX_DRAWN) return points;
  const stride = Math.ceil(points.length / MAX_DRAWN);
  const kept = points.filter((_, i) => i % stride === 0);
  if (kept.at(-1) !== points.at(-1)) kept.push(points.at(-1));
  return kept;
}

// series: [{name, color, points: [[x, y], ...], dashed}]; draws into `svg` (replacing what was there).
export function drawChart(svg, series, xLabel) {
  svg.setAttribute("viewBox", `0 0 ${WIDTH} ${HEIGHT}`);
  svg.replaceChildren();
  const all = series.flatMap((s) => s.points);
  if (all.length === 0) {
    svg.append(el("text", { x: WIDTH / 2, y: HEIGHT / 2, "text-anchor": "middle", class: "tick" }, "no data yet"));
    return;
  }
  const xs = all.map((p) => p[0]);
  const ys = all.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) x1 = x0 + 1;
  if (y0 === y1) [y0, y1] = [y0 - Math.abs(y0 || 1) * 0.05, y1 + Math.abs(y1 || 1) * 0.05];
  const w = WIDTH - PAD.left - PAD.right;
  const h = HEIGHT - PAD.top - PAD.bottom;
  const px = (x) => PAD.left + ((x - x0) / (x1 - x0)) * w;
  const py = (y) => PAD.top + (1 - (y - y0) / (y1 - y0)) * h;
  for (const t of ticks(y0, y1, 5)) {
    svg.append(el("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: py(t), y2: py(t), class: "axis" }));
    svg.append(el("text", { x: PAD.left - 6, y: py(t) + 4, "text-anchor": "end", class: "tick" }, label(t)));
  }
  for (const t of ticks(x0, x1, 6)) {
    svg.append(el("text", { x: px(t), y: HEIGHT - PAD.bottom + 16, "text-anchor": "middle", class: "tick" },
      label(t)));
  }
  svg.append(el("text", { x: PAD.left + w / 2, y: HEIGHT - 2, "text-anchor": "middle", class: "tick" }, xLabel));
  for (const s of series) {
    if (s.points.length === 0) continue;
    const d = thin(s.points).map(([x, y], i) => `${i ? "L" : "M"}${px(x).toFixed(1)},${py(y).toFixed(1)}`).join("");
    const path = el("path", { d, stroke: s.color, class: `series${s.dashed ? " val" : ""}`,
      "data-series": s.name, "data-points": s.points.length });
    path.append(el("title", {}, s.name));
    svg.append(path);
    if (s.points.length === 1 || s.dashed) {
      for (const [x, y] of s.points) svg.append(el("circle", { cx: px(x), cy: py(y), r: 3, fill: s.color }));
    }
  }
}
