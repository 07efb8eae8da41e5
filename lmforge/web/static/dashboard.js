// The run dashboard: polls the JSON API (every `refresh_s` seconds: `lmforge dashboard --refresh`), appends the
// new metrics.jsonl records of the runs compared and redraws their curves.
import { request, setApiKey } from "./api.js";
import { drawChart } from "./chart.js";

const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];
const $ = (id) => document.getElementById(id);
const state = { runs: [], compared: [], focused: null, metrics: new Map(), started: false, refreshMs: 2000,
  needsKey: false };

async function json(path) {
  return (await request(path)).json();
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function fmt(value, digits) {
  if (typeof value === "string") return value; // "NaN", "Infinity": a diverged run
  return typeof value === "number" ? value.toFixed(digits) : "–";
}

function colorOf(name) {
  return COLORS[state.compared.indexOf(name) % COLORS.length];
}

// The selection lives in the URL (#compare=a&compare=b&run=a), so a reload or a shared link shows the same runs.
function readHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  state.compared = params.getAll("compare").filter(Boolean);
  state.focused = params.get("run") || state.compared[0] || null;
}

function writeHash() {
  const params = new URLSearchParams(state.compared.map((name) => ["compare", name]));
  if (state.focused) params.set("run", state.focused);
  history.replaceState(null, "", `#${params}`);
}

async function pollMetrics(name) {
  const seen = state.metrics.get(name) || { offset: 0, records: [] };
  const chunk = await json(`/api/metrics?name=${encodeURIComponent(name)}&offset=${seen.offset}`);
  if (chunk.reset) seen.records = [];
  for (const record of chunk.records) seen.records.push(record); // in place: a long run's list is not copied
  seen.offset = chunk.offset;
  state.metrics.set(name, seen);
  return chunk.reset || chunk.records.length > 0;
}

function renderTable() {
  const rows = state.runs.map((run) => {
    const tr = document.createElement("tr");
    tr.dataset.run = run.name;
    if (run.name === state.focused) tr.className = "focused";
    const compare = document.createElement("input");
    compare.type = "checkbox";
    compare.checked = state.compared.includes(run.name);
    compare.setAttribute("aria-label", `Compare ${run.name}`);
    compare.addEventListener("change", () => toggle(run.name, compare.checked));
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    if (compare.checked) swatch.style.background = colorOf(run.name);
    const open = document.createElement("button");
    open.type = "button";
    open.className = "secondary";
    open.textContent = run.name;
    open.addEventListener("click", () => focus(run.name));
    const cells = [
      [compare, " ", swatch], [open], [[run.recipe, run.method].filter(Boolean).join(" / ") || "–"],
      [run.model || "–"], [run.status], [run.step ?? "–"], [fmt(run.loss, 4)], [fmt(run.val_loss, 4)],
      [fmt(run.tokens_per_s, 0)],
    ];
    cells.forEach((content, i) => {
      const td = document.createElement("td");
      td.append(...content);
      if (i === 4) td.className = `status-${run.status}`;
      if (i >= 5) td.className = "num";
      tr.append(td);
    });
    return tr;
  });
  // The rows are rebuilt at each poll: keyboard focus moves to the same control of the new row.
  const active = document.activeElement;
  const focusedRun = active?.closest?.("tr")?.dataset.run;
  const focusedKind = active?.tagName;
  $("runs").replaceChildren(...rows);
  if (focusedRun !== undefined) {
    $("runs").querySelector(`tr[data-run="${CSS.escape(focusedRun)}"] ${focusedKind}`)?.focus();
  }
  $("no-runs").hidden = state.runs.length > 0;
}

function series(key, dashed) {
  return state.compared.map((name) => {
    const records = state.metrics.get(name)?.records || [];
    const points = records.filter((r) => typeof r[key] === "number").map((r) => [r.step, r[key]]);
    return { name: `${name} ${key}`, color: colorOf(name), points, dashed };
  });
}

const CHARTED = new Set(["step", "loss", "val_loss", "lr", "tokens_per_s"]); // the fixed charts' fields

// Every other numeric field of the compared runs' records (grad_norm, val_ppl, a grpo run's rewards, DPO's margins).
function renderMetricChoice() {
  const keys = new Set();
  for (const name of state.compared) {
    for (const r of state.metrics.get(name)?.records || []) {
      for (const [k, v] of Object.entries(r)) if (!CHARTED.has(k) && typeof v === "number") keys.add(k);
    }
  }
  const select = $("metric");
  const names = [...keys].sort();
  if (names.join() !== [...select.options].map((o) => o.value).join()) {
    const chosen = select.value || (keys.has("grad_norm") ? "grad_norm" : names[0]);
    select.replaceChildren(...names.map((k) => new Option(k, k, false, k === chosen)));
  }
  return select.value;
}

function renderCharts() {
  drawChart($("chart-loss"), [...series("loss", false), ...series("val_loss", true)], "step");
  drawChart($("chart-lr"), series("lr", false), "step");
  drawChart($("chart-speed"), series("tokens_per_s", false), "step");
  const metric = renderMetricChoice();
  drawChart($("chart-metric"), metric ? series(metric, false) : [], "step");
  $("legend-loss").replaceChildren(...state.compared.map((name) => {
    const item = document.createElement("span");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = colorOf(name);
    item.append(swatch, ` ${name}`);
    return item;
  }));
}

async function renderDetails() {
  if (!state.focused) {
    $("details").hidden = true;
    return;
  }
  const run = await json(`/api/run?name=${encodeURIComponent(state.focused)}`);
  const s = run.summary;
  $("details").hidden = false;
  $("detail-title").textContent = s.name;
  $("detail-status").textContent = s.status;
  $("detail-loss-label").textContent = s.status === "finished" ? "Final loss" : "Last loss";
  $("detail-loss").textContent = fmt(s.loss, 4);
  $("detail-loss").dataset.value = s.loss === null ? "" : String(s.loss);
  $("detail-best").textContent = fmt(s.best_val_loss, 4);
  $("detail-path").textContent = s.path;
  $("config").textContent = run.config || "(no config.yaml)";
  $("checkpoints").replaceChildren(...(run.checkpoints.length ? run.checkpoints : [null]).map((c) => {
    const li = document.createElement("li");
    li.textContent = c ? `${c.name} — written ${new Date(c.written * 1000).toLocaleString()}` : "none yet";
    return li;
  }));
}

// One refresh at a time: two overlapping polls would read the same metrics offset and append its records twice.
let pending = Promise.resolve();
function refresh() {
  pending = pending.then(refreshNow);
  return pending;
}

async function refreshNow() {
  try {
    const listing = await json("/api/runs");
    $("key-form").hidden = true;
    state.runs = listing.runs;
    state.refreshMs = listing.refresh_s * 1000;
    $("root").textContent = listing.root;
    const names = new Set(state.runs.map((r) => r.name));
    if (!state.started && state.compared.length === 0 && state.runs.length) {
      const latest = state.runs.reduce((a, b) => ((b.updated || 0) > (a.updated || 0) ? b : a));
      state.compared = [latest.name];
      state.focused = latest.name;
      writeHash();
    }
    state.started = true;
    state.compared = state.compared.filter((n) => names.has(n));
    if (!names.has(state.focused)) state.focused = state.compared[0] || null;
    const changed = await Promise.all(state.compared.map(pollMetrics));
    renderTable();
    if (changed.some(Boolean) || $("chart-loss").childElementCount === 0) renderCharts();
    await renderDetails();
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    showError("");
  } catch (e) {
    showError(e.message);
    if (e.status === 401) {
      // under `lmforge serve --runs --api-key`: the playground's key (same tab, same storage); polls wait for it
      state.needsKey = true;
      if ($("key-form").hidden) {
        $("key-form").hidden = false;
        $("api-key").focus();
      }
    }
  }
}

function toggle(name, on) {
  state.compared = on ? [...state.compared, name] : state.compared.filter((n) => n !== name);
  if (on && !state.focused) state.focused = name;
  writeHash();
  renderTable();
  renderCharts();
  refresh();
}

function focus(name) {
  state.focused = name;
  if (!state.compared.includes(name)) state.compared.push(name);
  writeHash();
  refresh();
}

async function loop() {
  await refresh();
  if (!state.needsKey) setTimeout(loop, state.refreshMs);
}

$("metric").addEventListener("change", renderCharts);
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  setApiKey($("api-key").value.trim());
  $("api-key").value = "";
  state.needsKey = false;
  loop();
});
readHash();
loop();
