// zai-proxy dashboard page: a plain ES module, no build step, no network beyond the dashboard.
//
// Data (served by `zai-proxy dashboard`):
//   GET /api/status?range=R    the status document (rates over the last minute, account, workers)
//   GET /api/series?name=N&variant=V&range=R   {"name", "step", "points": {variant: [[t, v], ...]}}
//   GET /api/events            SSE: `snapshot` (status doc) on connect, `update` every collection
// A `?token=...` in the page's URL goes to every API call (Authorization: Bearer) and to the
// event stream (`?token=`). Every number is in an element with a stable `data-testid` and its raw
// value in `data-value`, so tests (and people with devtools) read exactly what is shown.

/* global uPlot */

const params = new URLSearchParams(location.search);
const TOKEN = params.get("token");
const RANGES = ["15m", "1h", "6h", "24h", "7d", "30d"];
const DEFAULT_RANGE = "1h";
const VARIANT_SHORT = { production: "prod", canary: "canary" };

// Z.AI business codes (extproc/limiter/codes.py), for the error chips' tooltips.
const ZAI_CODES = {
  500: "internal error", 1000: "authentication failed", 1001: "no authentication sent",
  1002: "invalid authentication token", 1003: "authentication token expired",
  1110: "account inactive", 1112: "account locked", 1113: "account in arrears",
  1120: "service error", 1121: "account locked for irregular activity",
  1210: "incorrect parameters", 1211: "model does not exist", 1212: "model not available",
  1213: "parameter missing", 1214: "invalid parameter", 1230: "service error",
  1234: "network error", 1302: "concurrency too high", 1303: "frequency too high",
  1304: "daily limit reached", 1305: "overloaded", 1308: "5-hour window spent",
  1309: "plan expired", 1310: "weekly limit reached", 1311: "model not in plan",
  1312: "model overloaded", 1313: "fair-use throttling", none: "no Z.AI code", other: "other codes",
};

const state = {
  range: RANGES.includes(params.get("range")) ? params.get("range") : DEFAULT_RANGE,
  variant: params.get("variant"),          // a variant name or "both"; settled by the first status
  status: null,
  sort: { key: "requests", dir: -1 },
  charts: new Map(),                       // chart key -> uPlot
  chartVariants: "",                       // the variants the charts were built for
  seriesFetchedAt: 0,
  seriesStep: 60,
  seriesBusy: false,
  rangeBusy: false,
  updatedAt: 0,
};

// ---- helpers ---------------------------------------------------------------------------------

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];

// A panel whose text stays put between updates (the rollout's, for minutes) is rebuilt only when
// its markup changes: rebuilding it on every live update would drop a reader's text selection and
// blank its countdown each few seconds. True when it was rebuilt.
const shownHtml = new WeakMap();
function setHtml(el, html) {
  if (shownHtml.get(el) === html) return false;
  shownHtml.set(el, html);
  el.innerHTML = html;
  return true;
}

function esc(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function apiUrl(path, query = {}) {
  const url = new URL(path, document.baseURI);
  for (const [k, v] of Object.entries(query)) url.searchParams.set(k, v);
  return url;
}

async function api(path, query) {
  const headers = TOKEN ? { Authorization: `Bearer ${TOKEN}` } : {};
  const resp = await fetch(apiUrl(path, query), { headers, cache: "no-store" });
  if (!resp.ok) throw new Error(`${path}: HTTP ${resp.status}`);
  return resp.json();
}

const num = (x) => (typeof x === "number" && Number.isFinite(x) ? x : null);

function sig(x, digits = 3) {
  if (x === 0) return "0";
  const abs = Math.abs(x);
  if (abs >= 1000) return Math.round(x).toLocaleString("en-US");
  if (abs >= 100) return x.toFixed(0);
  if (abs < 0.001) return x.toExponential(1);
  return String(Number(x.toPrecision(digits)));
}

const fmt = {
  rate: (x) => (num(x) === null ? "–" : sig(x)),
  int: (x) => (num(x) === null ? "–" : Math.round(x).toLocaleString("en-US")),
  compact(x) {
    if (num(x) === null) return "–";
    const abs = Math.abs(x);
    if (abs >= 1e9) return `${sig(x / 1e9)}G`;
    if (abs >= 1e6) return `${sig(x / 1e6)}M`;
    if (abs >= 1e4) return `${sig(x / 1e3)}k`;
    return sig(x);
  },
  secs(x) {
    if (num(x) === null) return "–";
    if (x === 0) return "0";
    if (x < 1) return `${Math.round(x * 1000)} ms`;
    if (x < 60) return `${sig(x)} s`;
    return duration(x);
  },
  usd(x) {
    if (num(x) === null) return "–";
    if (x === 0) return "$0";
    if (Math.abs(x) < 0.01) return `$${x.toFixed(4)}`;
    if (Math.abs(x) < 100) return `$${x.toFixed(2)}`;
    return `$${Math.round(x).toLocaleString("en-US")}`;
  },
  pct(x) {
    if (num(x) === null) return "–";
    const p = x * 100;
    return `${p === 0 ? "0" : p < 10 ? p.toFixed(1) : p.toFixed(0)}%`;
  },
};

function duration(seconds) {
  let s = Math.max(0, Math.round(seconds));
  const d = Math.floor(s / 86400); s -= d * 86400;
  const h = Math.floor(s / 3600); s -= h * 3600;
  const m = Math.floor(s / 60); s -= m * 60;
  const pad = (n) => String(n).padStart(2, "0");
  if (d) return `${d}d ${h}h ${pad(m)}m`;
  if (h) return `${h}h ${pad(m)}m ${pad(s)}s`;
  if (m) return `${m}m ${pad(s)}s`;
  return `${s}s`;
}

function ago(epoch) {
  if (num(epoch) === null) return "never";
  const s = Date.now() / 1000 - epoch;
  if (s < 5) return "just now";
  return `${duration(s)} ago`;
}

function clock(epoch) {
  const d = new Date(epoch * 1000);
  const sameDay = d.toDateString() === new Date().toDateString();
  const time = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  return sameDay ? time : `${d.toLocaleDateString([], { weekday: "short", day: "numeric", month: "short" })} ${time}`;
}

const sum = (obj) => Object.values(obj || {}).reduce((a, b) => a + (num(b) ?? 0), 0);

// ---- which variants are shown ---------------------------------------------------------------

function variantsKnown() {
  return state.status?.variants?.length ? state.status.variants : ["production"];
}

function shownVariants() {
  const known = variantsKnown();
  if (state.variant === "both") return known;
  return known.includes(state.variant) ? [state.variant] : [known[0]];
}

function settleVariant() {
  const known = variantsKnown();
  const ok = state.variant === "both" ? known.length > 1 : known.includes(state.variant);
  if (!ok) state.variant = known.length > 1 ? "both" : known[0];
}

function syncUrl() {
  const q = new URLSearchParams(location.search);
  q.set("range", state.range);
  q.set("variant", state.variant);
  history.replaceState(null, "", `${location.pathname}?${q}`);
}

// ---- controls --------------------------------------------------------------------------------

function renderControls() {
  const known = variantsKnown();
  const options = known.length > 1 ? [...known, "both"] : known;
  const toggle = $('[data-testid="variant-toggle"]');
  const key = options.join(",");
  if (toggle.dataset.options !== key) {
    toggle.dataset.options = key;
    toggle.innerHTML = options.map((v) => `<button type="button" data-variant="${esc(v)}"
      data-testid="variant-${esc(v)}">${esc(v === "both" ? "side by side" : v)}</button>`).join("");
  }
  for (const b of $$("button", toggle)) b.setAttribute("aria-pressed", String(b.dataset.variant === state.variant));
  const picker = $('[data-testid="range-picker"]');
  if (!picker.children.length) {
    picker.innerHTML = RANGES.map((r) => `<button type="button" data-range="${r}" data-testid="range-${r}">${r}</button>`).join("");
  }
  for (const b of $$("button", picker)) b.setAttribute("aria-pressed", String(b.dataset.range === state.range));
}

function wireControls() {
  $('[data-testid="variant-toggle"]').addEventListener("click", (e) => {
    const b = e.target.closest("button[data-variant]");
    if (!b || b.dataset.variant === state.variant) return;
    state.variant = b.dataset.variant;
    syncUrl();
    renderAll();
    refreshSeries(true);
  });
  $('[data-testid="range-picker"]').addEventListener("click", (e) => {
    const b = e.target.closest("button[data-range]");
    if (!b || b.dataset.range === state.range) return;
    state.range = b.dataset.range;
    syncUrl();
    renderControls();
    refreshRangeStatus();
    refreshSeries(true);
  });
  $('[data-testid="theme-toggle"]').addEventListener("click", () => {
    const html = document.documentElement;
    html.dataset.theme = html.dataset.theme === "dark" ? "light" : "dark";
    try { localStorage.setItem("zai-proxy-theme", html.dataset.theme); } catch { /* private mode */ }
    rebuildCharts(true);
  });
  $("table.workers thead").addEventListener("click", (e) => {
    const th = e.target.closest("th[data-key]");
    if (!th) return;
    const key = th.dataset.key;
    state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : (th.classList.contains("txt") ? 1 : -1) };
    renderWorkers();
  });
}

// ---- stat tiles ------------------------------------------------------------------------------

// The canary is judged worse than production on these (higher is worse), with a tolerance.
// Ratios and latencies only: rates depend on each variant's share of the traffic.
const WORSE = {
  "error-ratio": (c, p) => c > p + 0.005,
  "latency-p50": (c, p) => c > p * 1.1 + 0.01,
  "latency-p95": (c, p) => c > p * 1.1 + 0.01,
  "latency-p99": (c, p) => c > p * 1.1 + 0.01,
  "ttft-p50": (c, p) => c > p * 1.1 + 0.01,
  "ttft-p95": (c, p) => c > p * 1.1 + 0.01,
};

function vdata(variant) {
  return state.status?.variants_data?.[variant] || {};
}

function errorRatio(v) {
  const rps = v.rps || {};
  const total = sum(rps);
  return total > 0 ? (num(rps["5xx"]) ?? 0) / total : null;
}

// stat key -> [value of a variant's data, formatter]
const STATS = {
  "rps-total": [(v) => (v.rps ? sum(v.rps) : null), fmt.rate],
  "rps-2xx": [(v) => v.rps?.["2xx"], fmt.rate],
  "rps-4xx": [(v) => v.rps?.["4xx"], fmt.rate],
  "rps-5xx": [(v) => v.rps?.["5xx"], fmt.rate],
  "error-ratio": [errorRatio, fmt.pct],
  "latency-p50": [(v) => v.latency?.p50, fmt.secs],
  "latency-p95": [(v) => v.latency?.p95, fmt.secs],
  "latency-p99": [(v) => v.latency?.p99, fmt.secs],
  "ttft-p50": [(v) => v.ttft?.p50, fmt.secs],
  "ttft-p95": [(v) => v.ttft?.p95, fmt.secs],
  "tokens-input": [(v) => v.tokens_per_s?.input, fmt.compact],
  "tokens-output": [(v) => v.tokens_per_s?.output, fmt.compact],
  "tokens-cache_read": [(v) => v.tokens_per_s?.cache_read, fmt.compact],
  "tokens-cache_write": [(v) => v.tokens_per_s?.cache_write, fmt.compact],
  "cost-hour": [(v) => v.cost_usd?.hour, fmt.usd],
  "cost-block_5h": [(v) => v.cost_usd?.block_5h, fmt.usd],
  "cost-today": [(v) => v.cost_usd?.today, fmt.usd],
  "in-flight": [(v) => v.limiter?.in_flight, fmt.int],
  limit: [(v) => v.limiter?.limit, fmt.int],
  ceiling: [(v) => v.limiter?.ceiling, (x) => (num(x) === null ? "none" : sig(x))],
  queued: [(v) => v.limiter?.queued, fmt.int],
  "queue-wait-p95": [(v) => v.limiter?.queue_wait_p95, fmt.secs],
};

function renderStats() {
  const shown = shownVariants();
  const both = shown.length > 1;
  document.body.dataset.both = both ? "1" : "";
  // Side by side, each row of numbers is one variant: its name stands once, left of the tiles.
  for (const stats of $$(".stats")) {
    let keys = $(".stat.keys", stats);
    if (!both) { keys?.remove(); continue; }
    if (!keys) {
      keys = document.createElement("div");
      keys.className = "stat keys";
      stats.prepend(keys);
    }
    keys.innerHTML = `<div class="label">&nbsp;</div>` + shown.map((v) =>
      `<div class="val"><span class="tag v-${esc(v)}">${esc(VARIANT_SHORT[v] || v)}</span></div>`).join("");
  }
  for (const tile of $$("[data-stat]")) {
    const key = tile.dataset.stat;
    const vals = $(".vals", tile);
    const [get, format] = STATS[key];
    const values = Object.fromEntries(shown.map((v) => [v, num(get(vdata(v)))]));
    const judge = WORSE[key];
    vals.innerHTML = shown.map((variant) => {
      const value = values[variant];
      let cls = "";
      if (both && judge && variant !== "production" && value !== null && values.production !== null
          && judge(value, values.production)) cls = "worse";
      return valHtml(variant, both, `${key}-${variant}`, value, format(value), cls);
    }).join("");
  }
}

function valHtml(variant, both, testid, value, text, cls = "", extra = "") {
  return `<div class="val ${cls}" data-variant="${esc(variant)}"><span class="num"
    data-testid="${esc(testid)}" data-value="${value ?? ""}" ${extra}>${esc(text)}</span></div>`;
}

// ---- lists: models, rejections, errors, limiter bars ------------------------------------------

function renderModels() {
  const shown = shownVariants();
  const rows = [];
  for (const variant of shown) {
    for (const [model, rate] of Object.entries(vdata(variant).tokens_by_model || {})) {
      rows.push({ variant, model, rate: num(rate) ?? 0 });
    }
  }
  rows.sort((a, b) => b.rate - a.rate || a.model.localeCompare(b.model));
  const max = Math.max(0, ...rows.map((r) => r.rate));
  const box = $('[data-testid="models"]');
  if (!rows.length) { box.innerHTML = '<p class="empty">no tokens in the last minute</p>'; return; }
  box.innerHTML = `<h3>by model <span class="sub">tokens/s</span></h3>` + rows.map((r) => `
    <div class="model-row" data-testid="model-row" data-model="${esc(r.model)}" data-variant="${esc(r.variant)}">
      <span class="model-name">${esc(r.model)}${shown.length > 1 ? ` <span class="tag v-${esc(r.variant)}">${esc(VARIANT_SHORT[r.variant] || r.variant)}</span>` : ""}</span>
      <span class="model-bar"><span style="width:${max > 0 ? (100 * r.rate) / max : 0}%"></span></span>
      <span class="model-val" data-value="${r.rate}">${fmt.compact(r.rate)}</span>
    </div>`).join("");
}

function renderChips(testid, field, itemId, label, hint = () => "") {
  const shown = shownVariants();
  const items = [];
  for (const variant of shown) {
    for (const [key, rate] of Object.entries(vdata(variant).limiter?.[field] ?? vdata(variant)[field] ?? {})) {
      if (num(rate) > 0) items.push({ variant, key, rate });  // a reason listed at 0 is noise
    }
  }
  items.sort((a, b) => b.rate - a.rate || a.key.localeCompare(b.key));
  const ul = $(`[data-testid="${testid}"]`);
  ul.innerHTML = items.length ? items.map((it) => `
    <li class="chip hot" data-testid="${itemId}" data-key="${esc(it.key)}"
        data-variant="${esc(it.variant)}" data-value="${it.rate}" title="${esc(label(it.key))}">
      <span class="chip-key">${esc(it.key)}</span>${hint(it.key) ? `<span class="chip-hint">${esc(hint(it.key))}</span>` : ""}${shown.length > 1 ? `<span class="tag v-${esc(it.variant)}">${esc(VARIANT_SHORT[it.variant] || it.variant)}</span>` : ""}
      <span class="chip-val">${fmt.rate(it.rate)}</span></li>`).join("")
    : '<li class="empty">none in the last minute</li>';
}

function renderLimiterBars() {
  const box = $('[data-testid="limiter-bars"]');
  box.innerHTML = shownVariants().map((variant) => {
    const lim = vdata(variant).limiter || {};
    const inFlight = num(lim.in_flight) ?? 0;
    const limit = num(lim.limit);
    const ceiling = num(lim.ceiling);
    const top = Math.max(1, limit ?? 0, ceiling ?? 0, inFlight);
    const pct = (x) => `${Math.min(100, (100 * x) / top)}%`;
    const full = limit !== null && inFlight >= limit;
    const closed = !!lim.gate_closed;
    const until = num(lim.gate_reopens_at);
    const gate = `<span class="gate ${closed ? "closed" : ""}" title="A quota error closes the gate until the reset"
      data-testid="gate-${esc(variant)}" data-value="${closed ? 1 : 0}" ${closed && until ? `data-until="${until}"` : ""}>
      ${closed ? (until ? `gate closed, ${duration(until - Date.now() / 1000)}` : "gate closed") : "gate open"}</span>`;
    return `<div class="lbar" data-variant="${esc(variant)}">
      <span class="tag v-${esc(variant)}">${esc(VARIANT_SHORT[variant] || variant)}</span>
      <span class="track" title="in flight ${inFlight} of limit ${limit ?? "–"}${ceiling !== null ? `, ceiling ${sig(ceiling)}` : ""}">
        <span class="fill ${full ? "full" : ""}" style="width:${pct(inFlight)}"></span>
        ${limit !== null ? `<span class="mark limit" style="left:${pct(limit)}" title="limit ${limit}"></span>` : ""}
        ${ceiling !== null ? `<span class="mark ceiling" style="left:${pct(ceiling)}" title="ceiling ${sig(ceiling)}"></span>` : ""}
      </span>
      <span class="lbar-text">${inFlight} / ${limit ?? "–"}${ceiling !== null ? ` <span class="muted">(ceiling ${sig(ceiling)})</span>` : ""}</span>
      ${gate}
    </div>`;
  }).join("");
}

// ---- quota -----------------------------------------------------------------------------------

function renderQuota() {
  const account = state.status?.account || {};
  const level = $('[data-testid="quota-level"]');
  level.textContent = account.level ? `plan ${account.level}` : "plan unknown";
  level.dataset.value = account.level || "";
  for (const name of ["5h", "weekly"]) {
    const w = account.windows?.[name] || {};
    const box = $(`.window[data-window="${name}"]`);
    const used = num(w.used_ratio);
    const usedEl = $(`[data-testid="quota-${name}-used"]`);
    usedEl.textContent = used === null ? "no report" : `${fmt.pct(used)} used`;
    usedEl.dataset.value = used ?? "";
    const fill = $(".fill", box);
    fill.style.width = `${Math.min(100, (used ?? 0) * 100)}%`;
    fill.className = `fill ${used >= 0.9 ? "bad" : used >= 0.7 ? "warn" : ""}`;
    const reset = $(`[data-testid="quota-${name}-reset"]`);
    reset.dataset.value = num(w.reset_at) ?? "";
    const out = $(`[data-testid="quota-${name}-runs-out"]`);
    const runsOut = num(w.runs_out_at);
    out.dataset.value = runsOut ?? "";
    out.className = `runs-out ${runsOut ? "bad" : ""}`;
    out.textContent = runsOut ? `runs out at ${clock(runsOut)} at this pace`
      : used === null ? "" : "lasts to the reset at this pace";
  }
  tickCountdowns();
}

function tickCountdowns() {
  const now = Date.now() / 1000;
  for (const el of $$(".countdown")) {
    const at = num(parseFloat(el.dataset.value));
    el.textContent = at === null ? "–" : at <= now ? "now" : duration(at - now);
    el.title = at === null ? "" : `at ${clock(at)}`;
  }
  for (const el of $$(".ro-countdown")) {
    const at = num(parseFloat(el.dataset.value));
    const late = at === null ? 0 : now - at;
    el.textContent = at === null ? "–" : late < 0 ? `in ${duration(-late)}` : late < OVERDUE_AFTER ? "due now"
      : `overdue by ${duration(late)}`;
    el.classList.toggle("overdue", late >= OVERDUE_AFTER);
    el.title = at === null ? "" : late >= OVERDUE_AFTER
      ? `was due at ${clock(at)}: is \`zai-proxy canary rollout\` still running?` : `at ${clock(at)}`;
  }
  for (const el of $$("[data-until]")) {
    el.textContent = `gate closed, ${duration(parseFloat(el.dataset.until) - now)}`;
  }
  if (state.updatedAt) {
    const el = $('[data-testid="updated-at"]');
    el.textContent = `updated ${ago(state.updatedAt)}`;
    el.dataset.value = state.updatedAt;
  }
  for (const td of $$("td[data-col='last_seen']")) {
    td.textContent = ago(num(parseFloat(td.dataset.value)));
  }
}

// ---- workers ---------------------------------------------------------------------------------

function workerRows() {
  const shown = new Set(shownVariants());
  return (state.status?.workers || []).filter((w) => shown.has(w.variant)).map((w) => {
    const t = w.tokens || {};
    const tokens = ["input", "output", "cache_read", "cache_write"].reduce((a, k) => a + (num(t[k]) ?? 0), 0);
    return {
      worker: w.worker, variant: w.variant, requests: num(w.requests) ?? 0, tokens,
      input: num(t.input) ?? 0, output: num(t.output) ?? 0,
      cache_read: num(t.cache_read) ?? 0, cache_write: num(t.cache_write) ?? 0,
      cost_usd: num(w.cost_usd) ?? 0, cache_hit_ratio: num(w.cache_hit_ratio),
      queued_now: num(w.queued_now) ?? 0, last_seen: num(w.last_seen),
    };
  });
}

function renderWorkers() {
  const rows = workerRows();
  const { key, dir } = state.sort;
  rows.sort((a, b) => {
    const x = a[key], y = b[key];
    if (x === y) return a.worker.localeCompare(b.worker);
    if (x === null) return 1;
    if (y === null) return -1;
    return (typeof x === "string" ? x.localeCompare(y) : x - y) * dir;
  });
  for (const th of $$("table.workers th")) {
    th.setAttribute("aria-sort", th.dataset.key === key ? (dir > 0 ? "ascending" : "descending") : "none");
  }
  const cell = (col, value, text, cls = "") => `<td data-col="${col}" data-value="${value ?? ""}" class="${cls}">${esc(text)}</td>`;
  const tbody = $("table.workers tbody");
  tbody.innerHTML = rows.length ? rows.map((r) => `
    <tr data-testid="worker-row" data-worker="${esc(r.worker)}" data-variant="${esc(r.variant)}">
      <td data-col="worker" class="txt">${esc(r.worker)}</td>
      <td data-col="variant" class="txt"><span class="tag v-${esc(r.variant)}">${esc(r.variant)}</span></td>
      ${cell("requests", r.requests, fmt.int(r.requests))}
      ${cell("tokens", r.tokens, fmt.int(r.tokens), "strong")}
      ${cell("input", r.input, fmt.int(r.input))}
      ${cell("output", r.output, fmt.int(r.output))}
      ${cell("cache_read", r.cache_read, fmt.int(r.cache_read))}
      ${cell("cache_write", r.cache_write, fmt.int(r.cache_write))}
      ${cell("cost_usd", r.cost_usd, fmt.usd(r.cost_usd))}
      ${cell("cache_hit_ratio", r.cache_hit_ratio, fmt.pct(r.cache_hit_ratio))}
      ${cell("queued_now", r.queued_now, fmt.int(r.queued_now), r.queued_now > 0 ? "warn" : "")}
      ${cell("last_seen", r.last_seen, ago(r.last_seen))}
    </tr>`).join("")
    : `<tr class="empty"><td colspan="12">no worker has sent a request in the selected range</td></tr>`;
  const total = (k) => rows.reduce((a, r) => a + r[k], 0);
  const inputs = total("input") + total("cache_read") + total("cache_write");
  const hit = inputs > 0 ? total("cache_read") / inputs : null;
  $("table.workers tfoot").innerHTML = rows.length > 1 ? `
    <tr data-testid="workers-total">
      <td class="txt">all ${rows.length} rows</td><td></td>
      ${cell("requests", total("requests"), fmt.int(total("requests")))}
      ${cell("tokens", total("tokens"), fmt.int(total("tokens")), "strong")}
      ${cell("input", total("input"), fmt.int(total("input")))}
      ${cell("output", total("output"), fmt.int(total("output")))}
      ${cell("cache_read", total("cache_read"), fmt.int(total("cache_read")))}
      ${cell("cache_write", total("cache_write"), fmt.int(total("cache_write")))}
      ${cell("cost_usd", total("cost_usd"), fmt.usd(total("cost_usd")))}
      ${cell("cache_hit_ratio", hit, fmt.pct(hit))}
      ${cell("queued_now", total("queued_now"), fmt.int(total("queued_now")))}
      <td></td>
    </tr>` : "";
  $('[data-testid="workers-sub"]').textContent = `totals over the last ${state.range}; click a column to sort`;
}

// ---- header: liveness, weights, canary verdict ----------------------------------------------

function setLive(s) {
  const el = $('[data-testid="live"]');
  el.dataset.state = s;
  $(".live-text", el).textContent = s;
}

function renderHeader() {
  const st = state.status || {};
  const source = $('[data-testid="source"]');
  source.textContent = st.source ? `from ${st.source}` : "";
  source.dataset.value = st.source || "";
  const w = $('[data-testid="weights"]');
  if (st.weights && Object.keys(st.weights).length) {
    w.innerHTML = "weights " + Object.entries(st.weights).map(([v, pct]) =>
      `<span class="tag v-${esc(v)}" data-testid="weight-${esc(v)}" data-value="${num(pct) ?? ""}">${esc(v)} ${esc(pct)}%</span>`).join(" ");
  } else {
    w.textContent = variantsKnown().length > 1 ? "weights unknown" : "";
  }
  renderVerdict();
  renderRollout();
}

function renderVerdict() {
  const el = $('[data-testid="canary-verdict"]');
  const known = variantsKnown();
  if (!known.includes("canary") || !known.includes("production")) { el.hidden = true; return; }
  el.hidden = false;
  const p = vdata("production"), c = vdata("canary");
  const cTotal = sum(c.rps);
  if (!(cTotal > 0)) {
    el.dataset.state = "idle";
    el.innerHTML = "<b>Canary</b> has no traffic in the last minute.";
    return;
  }
  const checks = [
    ["error ratio", errorRatio(c), errorRatio(p), fmt.pct, WORSE["error-ratio"]],
    ["p95 latency", num(c.latency?.p95), num(p.latency?.p95), fmt.secs, WORSE["latency-p95"]],
    ["TTFT p95", num(c.ttft?.p95), num(p.ttft?.p95), fmt.secs, WORSE["ttft-p95"]],
  ];
  const worse = [];
  const parts = [];
  for (const [name, cv, pv, f, judge] of checks) {
    if (cv === null) continue;
    const bad = pv !== null && judge(cv, pv);
    if (bad) worse.push(name);
    parts.push(`<span class="cmp ${bad ? "worse" : ""}" data-testid="verdict-${name.replace(/\W+/g, "-")}">${name}
      <b>${f(cv)}</b> <span class="muted">vs ${f(pv)}</span></span>`);
  }
  el.dataset.state = worse.length ? "worse" : "ok";
  el.innerHTML = `<b>${worse.length ? `Canary is worse than production (${esc(worse.join(", "))})` : "Canary is no worse than production"}</b>
    <span class="muted">last minute, canary vs production:</span> ${parts.join("")}`;
}

// ---- canary rollout (`zai-proxy canary rollout`'s state file, as the status document's `rollout`)

const PHASE_TEXT = { running: "running", complete: "complete", rolled_back: "rolled back",
  stalled: "stalled", aborted: "aborted" };
const CHECK_MARK = { pass: "✓", fail: "✗", inconclusive: "?", skip: "–" };
const OVERDUE_AFTER = 60;  // seconds past the decision time before it reads "overdue"

function shortDuration(seconds) {
  if (seconds >= 3600 && seconds % 3600 === 0) return `${seconds / 3600}h`;
  if (seconds >= 60 && seconds % 60 === 0) return `${seconds / 60}m`;
  return duration(seconds);
}

const pctText = (x) => (num(x) === null ? "–" : `${x}%`);

function decisionText(d) {
  const from = pctText(d.from), to = pctText(d.to);
  switch (d.action) {
    case "step": return `step ${from} → ${to}`;
    case "rollback": return `rollback ${from} → ${to}`;
    case "hold": return `hold at ${from}`;
    case "stall": return `stall at ${from}`;
    case "complete": return `complete at ${from}`;
    default: return `${d.action || "?"} ${from} → ${to}`;
  }
}

function renderRollout() {
  const el = $('[data-testid="rollout"]');
  const r = state.status?.rollout;
  if (!r) {
    el.dataset.phase = "none";
    el.hidden = !variantsKnown().includes("canary");
    setHtml(el, `<span class="ro-title">Rollout</span>
      <span class="muted" data-testid="rollout-none">no rollout <span class="sub">(no state file from <code>zai-proxy canary rollout</code>)</span></span>`);
    return;
  }
  el.hidden = false;
  el.dataset.phase = r.phase;
  const steps = Array.isArray(r.steps) ? r.steps : [];
  const weight = num(r.weight);
  const running = r.phase === "running";
  const track = steps.map((s) => {
    const where = weight !== null && s < weight ? "done" : s === weight ? "current" : "next";
    return `<span class="ro-step" data-weight="${s}" data-state="${where}">${s}%</span>`;
  }).join('<span class="ro-arrow">›</span>');
  let next;
  if (r.pending) {
    next = `<span class="ro-next" data-testid="rollout-pending">changing the split
      ${esc(pctText(r.pending.from))} → <b>${esc(pctText(r.pending.to))}</b>…</span>`;
  } else if (running) {
    const at = num(r.next_decision_at);
    next = `<span class="ro-next">next decision${num(r.next_weight) !== null
      ? ` <span class="muted">(→ <b data-testid="rollout-next-weight" data-value="${r.next_weight}">${r.next_weight}%</b> on a pass)</span>` : ""}
      <b class="ro-countdown" data-testid="rollout-next-decision" data-value="${at ?? ""}">–</b></span>`;
  } else {
    const at = num(r.updated_at);
    next = `<span class="ro-next muted" data-testid="rollout-finished" data-value="${at ?? ""}">finished${at ? ` ${esc(clock(at))}` : ""}</span>`;
  }
  const who = [r.id, r.release ? `release ${r.release}` : null].filter(Boolean).join(" · ");
  const started = [num(r.started_at) ? `started ${clock(r.started_at)}` : "started", r.started_by ? `by ${r.started_by}` : null,
    num(r.updated_at) ? `; state file updated ${clock(r.updated_at)}` : null].filter(Boolean).join(" ");
  const head = `<div class="ro-row ro-head">
      <span class="ro-title">Rollout</span>
      <span class="phase" data-testid="rollout-phase" data-value="${esc(r.phase)}">${esc(PHASE_TEXT[r.phase] || r.phase)}</span>
      <span class="ro-where"><span data-testid="rollout-step" data-value="${num(r.step) ?? ""}" data-steps="${steps.length}">step <b>${num(r.step) ?? "–"}</b> of <b>${steps.length || "–"}</b></span>,
        canary at <b class="ro-weight" data-testid="rollout-weight" data-value="${weight ?? ""}">${esc(pctText(weight))}</b></span>
      <span class="ro-steps" data-testid="rollout-steps">${track}</span>
      ${next}
      <span class="ro-id muted" data-testid="rollout-id" data-value="${esc(r.id || "")}" title="${esc(started)}">${esc(who)}</span>
    </div>`;
  // Why a finished rollout stopped (an abort's reason is its own; otherwise the last decision's).
  const lastReason = r.last_decision?.reason || "";
  const why = !running && r.phase !== "complete" && r.reason && r.reason !== lastReason
    ? `<div class="ro-row ro-why" data-testid="rollout-reason-phase">${esc(r.reason)}</div>` : "";
  let verdict = "";
  const v = r.last_verdict;
  if (v) {
    const checks = Object.entries(v.checks || {}).map(([check, cv]) => `<span class="ro-check" data-testid="rollout-check"
      data-check="${esc(check)}" data-value="${esc(cv)}" title="${esc(check)}: ${esc(cv)}">${esc(CHECK_MARK[cv] || "·")} ${esc(check)}</span>`).join("");
    const bad = v.verdict === "fail" || v.verdict === "inconclusive";
    const reasons = (v.reasons || []).map((text) => `<li data-testid="rollout-reason" data-verdict="${esc(v.verdict)}">${esc(text)}</li>`).join("");
    const when = [num(v.at) ? clock(v.at) : null, num(v.window_seconds) ? `over ${shortDuration(v.window_seconds)}` : null].filter(Boolean).join(", ");
    const inconclusive = v.verdict === "inconclusive" && num(r.inconclusive_in_a_row) && num(r.max_inconclusive)
      ? ` <span class="muted">(${r.inconclusive_in_a_row} of ${r.max_inconclusive} in a row)</span>` : "";
    verdict = `<div class="ro-row ro-verdict">
        <span class="ro-label">last verdict</span>
        <span class="vbadge" data-testid="rollout-verdict" data-value="${esc(v.verdict || "")}">${esc(v.verdict || "?")}</span>${inconclusive}
        ${when ? `<span class="muted" data-testid="rollout-verdict-at" data-value="${num(v.at) ?? ""}">${esc(when)}</span>` : ""}
        <span class="ro-checks">${checks}</span>
      </div>
      ${reasons ? `<ul class="ro-reasons ${bad ? "bad" : ""}" data-verdict="${esc(v.verdict || "")}">${reasons}</ul>` : ""}`;
  } else {
    verdict = `<div class="ro-row ro-verdict"><span class="ro-label">last verdict</span>
      <span class="muted" data-testid="rollout-verdict" data-value="">none yet</span></div>`;
  }
  const d = r.last_decision;
  // A decision's reason ends with its analysis' reasons, listed above already: not twice.
  let said = d?.reason || "";
  const tail = v && d && d.verdict === v.verdict && (v.reasons || []).length ? `: ${v.reasons.join("; ")}` : null;
  if (tail && said.endsWith(tail) && said.length > tail.length) said = `${said.slice(0, -tail.length)} (reasons above)`;
  const decision = d ? `<div class="ro-row ro-decision">
      <span class="ro-label">last decision</span>
      <b data-testid="rollout-decision" data-value="${esc(d.action || "")}" data-action="${esc(d.action || "")}">${esc(decisionText(d))}</b>
      <span data-testid="rollout-decision-reason" data-value="${esc(d.reason || "")}" title="${esc(d.reason || "")}">${esc(said)}</span>
      ${num(d.at) ? `<span class="muted">${esc(clock(d.at))}</span>` : ""}
    </div>` : "";
  // A rebuilt countdown shows its time at once, not "–" until the next tick.
  if (setHtml(el, head + why + verdict + decision)) tickCountdowns();
}

// ---- charts ------------------------------------------------------------------------------------

const C = { green: "#3fb950", amber: "#d29922", red: "#f85149", blue: "#58a6ff", purple: "#a371f7",
  pink: "#f778ba", teal: "#39c5cf", orange: "#ff9b50", gray: "#9da7b3" };

const CHARTS = {
  requests: { unit: fmt.rate, series: [["rps.2xx", "2xx", C.green], ["rps.4xx", "4xx", C.amber], ["rps.5xx", "5xx", C.red]] },
  latency: { unit: fmt.secs, series: [["latency.p50", "p50", C.blue], ["latency.p95", "p95", C.purple],
    ["latency.p99", "p99", C.pink], ["ttft.p50", "TTFT p50", C.teal], ["ttft.p95", "TTFT p95", C.orange]] },
  tokens: { unit: fmt.compact, series: [["tokens.input", "input", C.blue], ["tokens.output", "output", C.green],
    ["tokens.cache_read", "cache read", C.purple], ["tokens.cache_write", "cache write", C.amber]] },
  cost: { unit: fmt.usd, series: [["cost", "USD per hour", C.green]] },
  limiter: { unit: fmt.rate, series: [["in_flight", "in flight", C.blue], ["limit", "limit", C.gray],
    ["queued", "queued", C.amber], ["rejections", "rejections/s", C.red], ["errors", "upstream errors/s", C.pink]] },
  // The account's quota is one for both variants: one line per window.
  quota: { unit: fmt.pct, max: 1, account: true,
    series: [["quota.5h", "5-hour window used", C.purple], ["quota.weekly", "weekly window used", C.teal]] },
};

function cssVar(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

function chartSeries(def, variants) {
  if (def.account) variants = variants.slice(0, 1);
  const both = variants.length > 1;
  const out = [];
  for (const variant of variants) {
    for (const [name, label, color] of def.series) {
      out.push({ name, variant, label: both ? `${label} · ${VARIANT_SHORT[variant] || variant}` : label,
        stroke: color, dash: both && variant !== variants[0] ? [6, 4] : undefined });
    }
  }
  return out;
}

function buildChart(key, el, variants, data) {
  const def = CHARTS[key];
  const axis = cssVar("--muted");
  const grid = cssVar("--grid");
  const series = chartSeries(def, variants);
  const opts = {
    width: Math.max(200, el.clientWidth),
    height: 170,
    pxAlign: 0,
    cursor: { points: { size: 6 } },
    legend: { live: true },
    scales: { x: { time: true }, y: { range: (u, lo, hi) => [0, def.max ? Math.max(def.max, hi || 0) : hi > 0 ? hi * 1.15 : 1] } },
    axes: [
      { stroke: axis, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1 }, font: "11px system-ui, sans-serif" },
      { stroke: axis, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1 }, size: 58,
        font: "11px system-ui, sans-serif", values: (u, ticks) => ticks.map((t) => def.unit(t)) },
    ],
    series: [{ value: (u, t) => (t == null ? "–" : clock(t)) }, ...series.map((s) => ({
      label: s.label, stroke: s.stroke, width: 1.6, dash: s.dash, points: { show: false },
      value: (u, v) => (v == null ? "–" : def.unit(v)),
    }))],
  };
  el.innerHTML = "";
  const chart = new uPlot(opts, data || emptyData(series.length), el);
  chart._series = series;
  return chart;
}

function emptyData(n) {
  return [[], ...Array.from({ length: n }, () => [])];
}

function rebuildCharts(keepData = false) {
  const variants = shownVariants();
  keepData = keepData && state.chartVariants === variants.join(",");
  state.chartVariants = variants.join(",");
  for (const el of $$("[data-chart]")) {
    const key = el.dataset.chart;
    const old = state.charts.get(key);
    const data = keepData && old ? old.data : null;
    old?.destroy();
    state.charts.set(key, buildChart(key, el, variants, data));
  }
}

function ensureCharts() {
  if (state.chartVariants !== shownVariants().join(",")) rebuildCharts();
}

// Align several [[t...], [v...]] tables on one time axis (null where a table has no point).
function join(tables) {
  const times = [...new Set(tables.flatMap((t) => t[0]))].sort((a, b) => a - b);
  const index = new Map(times.map((t, i) => [t, i]));
  const cols = tables.map(([xs, ys]) => {
    const col = new Array(times.length).fill(null);
    xs.forEach((x, i) => { col[index.get(x)] = num(ys[i]); });
    return col;
  });
  return [times, ...cols];
}

async function refreshSeries(force = false) {
  if (state.seriesBusy) { if (force) state.seriesAgain = true; return; }
  const every = Math.min(60, Math.max(5, state.seriesStep)) * 1000;
  if (!force && Date.now() - state.seriesFetchedAt < every - 500) return;
  state.seriesBusy = true;
  ensureCharts();
  const variants = shownVariants();
  const variantParam = variants.length > 1 ? "both" : variants[0];
  const range = state.range;
  try {
    const names = [...new Set(Object.values(CHARTS).flatMap((d) => d.series.map((s) => s[0])))];
    const docs = await Promise.all(names.map((name) => api("api/series", { name, variant: variantParam, range })));
    const byName = Object.fromEntries(names.map((n, i) => [n, docs[i]]));
    state.seriesStep = Math.max(...docs.map((d) => num(d.step) ?? 0), 5);
    state.seriesFetchedAt = Date.now();
    if (range !== state.range || state.chartVariants !== variants.join(",")) return;  // changed meanwhile
    for (const [key, chart] of state.charts) {
      const tables = chart._series.map((s) => {
        const pts = byName[s.name]?.points?.[s.variant] || [];
        return [pts.map((p) => p[0]), pts.map((p) => p[1])];
      });
      chart.setData(join(tables));
      chart.root.closest("[data-chart]").dataset.points = String(chart.data[0].length);
    }
    clearError("series");
  } catch (err) {
    showError("series", `Could not load the charts: ${err.message}`);
  } finally {
    state.seriesBusy = false;
    if (state.seriesAgain) { state.seriesAgain = false; refreshSeries(true); }
  }
}

function resizeCharts() {
  for (const [, chart] of state.charts) {
    const el = chart.root.parentElement;
    if (el && Math.abs(el.clientWidth - chart.width) > 2) chart.setSize({ width: Math.max(200, el.clientWidth), height: 170 });
  }
}

// ---- errors ------------------------------------------------------------------------------------

const errors = new Map();
function showError(key, text) {
  errors.set(key, text);
  console.warn(text);
  drawErrors();
}
function clearError(key) {
  if (errors.delete(key)) drawErrors();
}
function drawErrors() {
  const el = $('[data-testid="error-banner"]');
  el.hidden = errors.size === 0;
  el.textContent = [...errors.values()].join(" · ");
}

// ---- status: from the event stream, or fetched for a range ------------------------------------

function renderAll() {
  settleVariant();
  renderControls();
  renderHeader();
  renderStats();
  renderModels();
  renderChips("rejections", "rejections_per_s", "rejection", (k) => `rejected: ${k}`);
  renderChips("upstream-errors", "upstream_errors_per_s", "upstream-error", (k) => ZAI_CODES[k] || `code ${k}`,
    (k) => ZAI_CODES[k] || "");
  renderLimiterBars();
  renderQuota();
  renderWorkers();
  ensureCharts();
  tickCountdowns();
}

function applyStatus(doc) {
  state.status = doc;
  state.updatedAt = num(doc.time) ?? Date.now() / 1000;
  const first = !document.body.dataset.ready;
  renderAll();
  if (first) {
    syncUrl();
    document.body.dataset.ready = "1";
  }
}

// The stream's documents cover the server's default range; another range's worker totals come
// from /api/status?range=.
function streamCoversRange(doc) {
  return (doc.range ?? DEFAULT_RANGE) === state.range;
}

async function refreshRangeStatus() {
  if (state.rangeBusy) { state.rangeAgain = true; return; }
  state.rangeBusy = true;
  try {
    const range = state.range;
    const doc = await api("api/status", { range });
    if (range === state.range) applyStatus(doc);
    clearError("status");
  } catch (err) {
    showError("status", `Could not load the status: ${err.message}`);
  } finally {
    state.rangeBusy = false;
    if (state.rangeAgain) { state.rangeAgain = false; refreshRangeStatus(); }
  }
}

function onEvent(doc) {
  setLive("live");
  if (streamCoversRange(doc)) applyStatus(doc);
  else refreshRangeStatus();
  refreshSeries();
}

function connect() {
  const es = new EventSource(apiUrl("api/events", TOKEN ? { token: TOKEN } : {}));
  const handle = (e) => {
    try {
      onEvent(JSON.parse(e.data));
      clearError("stream");
    } catch (err) {
      showError("stream", `Bad update from the dashboard: ${err.message}`);
    }
  };
  es.addEventListener("snapshot", handle);
  es.addEventListener("update", handle);
  es.onopen = () => setLive("live");
  es.onerror = () => {
    if (es.readyState === EventSource.CLOSED) {
      // A refused connection (e.g. 401) is not retried by the browser: retry ourselves.
      setLive("offline");
      es.close();
      setTimeout(connect, 5000);
    } else {
      setLive("reconnecting");
    }
  };
}

// ---- start ---------------------------------------------------------------------------------------

function start() {
  try {
    const theme = localStorage.getItem("zai-proxy-theme");
    if (theme === "light" || theme === "dark") document.documentElement.dataset.theme = theme;
  } catch { /* private mode */ }
  renderControls();
  wireControls();
  new ResizeObserver(() => resizeCharts()).observe($("main"));
  setInterval(tickCountdowns, 1000);
  // The first picture comes from a plain fetch, so the page fills even before the stream opens.
  refreshRangeStatus().then(() => refreshSeries(true));
  connect();
}

start();
