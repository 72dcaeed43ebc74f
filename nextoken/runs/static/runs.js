// The run page: loss curve (train, val, log(vocab)), samples per evaluation, attention maps.
// Data: /api/runs/{id} (the run folder's JSON files) and /api/runs/{id}/attention (the checkpoint).
import { ApiError, apiJSON, el, facts, fmt, fmtInt, fmtParams, setupKeyBox } from "/ui/common.js";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const REFRESH_MS = 5000;
const state = { runs: [], id: null, data: null, timer: null, attn: null, pick: null };
let keyBox = null;

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function niceTicks(lo, hi, count = 5) {
  const span = hi - lo || 1;
  const raw = span / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => span / s <= count) || 10 * mag;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) out.push(Number(v.toFixed(10)));
  return out;
}

export function lossChart(d) {
  const W = 820;
  const H = 330;
  const m = { l: 52, r: 18, t: 14, b: 38 };
  const train = d.train_points.filter((p) => p[1] !== null);
  const vals = d.evals.filter((e) => e.val_loss !== null);
  const losses = [...train.map((p) => p[1]), ...vals.map((e) => e.val_loss), ...d.evals.map((e) => e.train_loss)]
    .filter((v) => v !== null);
  const steps = [...train.map((p) => p[0]), ...d.evals.map((e) => e.step), 1];
  const maxStep = Math.max(...steps);
  let hi = Math.max(...losses, d.log_vocab || 0);
  let lo = Math.min(...losses, d.log_vocab || Infinity);
  if (!Number.isFinite(hi) || !Number.isFinite(lo)) { hi = 1; lo = 0; }
  lo = Math.max(0, lo - (hi - lo) * 0.08);
  hi += (hi - lo) * 0.06;
  const x = (s) => m.l + (s / maxStep) * (W - m.l - m.r);
  const y = (v) => m.t + (1 - (v - lo) / (hi - lo || 1)) * (H - m.t - m.b);
  const first = vals[0];
  const last = vals[vals.length - 1];
  const label = vals.length ? `Loss curve: validation loss ${fmt(first.val_loss, 2)} at step ${first.step} to ` +
    `${fmt(last.val_loss, 2)} at step ${last.step}; log(vocab) = ${fmt(d.log_vocab, 2)}` : "Loss curve (no evaluations yet)";
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": label });
  for (const v of niceTicks(lo, hi)) {
    root.append(svg("line", { class: "grid", x1: m.l, x2: W - m.r, y1: y(v), y2: y(v) }));
    root.append(svg("text", { x: m.l - 6, y: y(v) + 4, "text-anchor": "end" }, String(v)));
  }
  for (const s of niceTicks(0, maxStep, 6)) {
    root.append(svg("line", { class: "axis", x1: x(s), x2: x(s), y1: H - m.b, y2: H - m.b + 4 }));
    root.append(svg("text", { x: x(s), y: H - m.b + 16, "text-anchor": "middle" }, fmtInt(s)));
  }
  root.append(svg("line", { class: "axis", x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b }));
  root.append(svg("line", { class: "axis", x1: m.l, x2: m.l, y1: m.t, y2: H - m.b }));
  root.append(svg("text", { x: (W + m.l) / 2, y: H - 4, "text-anchor": "middle" }, "step"));
  root.append(svg("text", { x: 12, y: (H - m.b + m.t) / 2, transform: `rotate(-90 12 ${(H - m.b + m.t) / 2})`,
    "text-anchor": "middle" }, "loss (nats)"));
  if (d.log_vocab) {
    root.append(svg("line", { class: "logv", x1: m.l, x2: W - m.r, y1: y(d.log_vocab), y2: y(d.log_vocab),
      "data-value": d.log_vocab }));
    root.append(svg("text", { class: "logv-label", x: W - m.r - 4, y: y(d.log_vocab) - 5, "text-anchor": "end" },
      `log(vocab) = log(${fmtInt(d.vocab_size)}) = ${fmt(d.log_vocab, 2)}: a uniform guess`));
  }
  if (train.length) {
    root.append(svg("polyline", { class: "train", points: train.map((p) => `${x(p[0])},${y(p[1])}`).join(" "),
      "data-points": train.length }));
    if (train.length < 3) { // too few for a visible line: mark each point
      for (const p of train) root.append(svg("circle", { class: "eval-train", cx: x(p[0]), cy: y(p[1]), r: 2.5 }));
    }
  }
  for (const e of d.evals.filter((v) => v.train_loss !== null)) { // train loss measured at each evaluation
    const dot = svg("circle", { class: "eval-train", cx: x(e.step), cy: y(e.train_loss), r: 2.5 });
    dot.append(svg("title", {}, `step ${e.step}: train ${fmt(e.train_loss, 4)} (evaluation)`));
    root.append(dot);
  }
  if (vals.length) {
    root.append(svg("polyline", { class: "val", points: vals.map((e) => `${x(e.step)},${y(e.val_loss)}`).join(" "),
      "data-points": vals.length }));
    for (const e of vals) {
      const dot = svg("circle", { class: "val-dot", cx: x(e.step), cy: y(e.val_loss), r: 3.5 });
      dot.append(svg("title", {}, `step ${e.step}: val ${fmt(e.val_loss, 4)}, train ${fmt(e.train_loss, 4)}`));
      root.append(dot);
    }
  }
  return root;
}

function renderRun(d) {
  const s = d.summary || {};
  $("run-title").textContent = d.name;
  $("run-state").textContent = d.finished ? "finished" : "training… (refreshing every 5 s)";
  const lastEval = d.evals[d.evals.length - 1];
  facts($("run-facts"), [
    ["folder", d.path, "path"],
    ["model", d.model.n_layer ? `${d.model.n_layer} layers · ${d.model.n_head} heads · ${d.model.n_embd} wide · ` +
      `context ${d.model.block_size}` : "—", "shape"],
    ["parameters", fmtParams(s.params), "parameters"],
    ["vocabulary", `${fmtInt(d.vocab_size)}${d.tokenizer?.kind ? ` (${d.tokenizer.kind})` : ""}; log(vocab) = ` +
      `${fmt(d.log_vocab, 3)}`, "vocab"],
    ["steps", s.steps !== undefined ? fmtInt(s.steps) : lastEval ? `${fmtInt(lastEval.step)} so far` : "—", "steps"],
    ["tokens seen", fmtInt(s.tokens_seen ?? lastEval?.tokens_seen), "tokens"],
    ["best val loss", s.best_val_loss !== undefined && s.best_val_loss !== null
      ? `${fmt(s.best_val_loss)} at step ${s.best_val_step} (perplexity ${fmt(Math.exp(s.best_val_loss), 2)})`
      : lastEval ? `${fmt(lastEval.val_loss)} (latest)` : "—", "best"],
    ["train time", s.train_time_s !== undefined ? `${fmt(s.train_time_s, 1)} s` : "—", "time"],
  ]);
  const box = $("chart-box");
  box.replaceChildren();
  if (!d.has_metrics) {
    box.append(el("p", { class: "note", text: "This folder has no metrics.jsonl (a published model version keeps only " +
      "its checkpoint and summary), so there is no curve to draw." }));
  } else {
    box.append(lossChart(d));
  }
  const list = $("samples");
  list.replaceChildren();
  const valAt = new Map(d.evals.map((e) => [e.step, e.val_loss]));
  for (const group of d.samples) {
    const v = valAt.get(group.step);
    list.append(el("li", { dataset: { step: String(group.step) } },
      el("h3", { text: `step ${fmtInt(group.step)}${v !== undefined && v !== null ? ` · val loss ${fmt(v, 3)}` : ""}` }),
      ...group.texts.map((t) => el("pre", { class: "sample", text: t }))));
  }
  if (!d.samples.length) list.append(el("li", { class: "hint", text: "No samples logged yet." }));
  renderAttentionForm(d);
}

function renderAttentionForm(d) {
  const sel = $("attn-ckpt");
  const keep = sel.value;
  sel.replaceChildren(el("option", { value: "best", text: "best (lowest val loss)" }),
    el("option", { value: "latest", text: "latest" }),
    ...d.checkpoints.map((c) => el("option", { value: String(c.step),
      text: `step ${c.step}${c.val_loss !== null ? ` (val ${fmt(c.val_loss, 3)})` : ""}` })));
  if ([...sel.options].some((o) => o.value === keep)) sel.value = keep;
  const note = $("attn-note");
  const go = $("attn-go");
  if (!d.attention.available) {
    note.hidden = false;
    note.textContent = "Attention maps are computed from the checkpoint with PyTorch and the training code, which " +
      `this install lacks: ${d.attention.needs}. The loss curve and samples above need nothing extra.`;
    go.disabled = true;
  } else if (!d.checkpoints.length) {
    note.hidden = false;
    note.textContent = "No checkpoint in this run yet: attention maps appear after the first evaluation.";
    go.disabled = true;
  } else {
    note.hidden = true;
    go.disabled = false;
  }
}

// --- attention maps -------------------------------------------------------------------------
function paintMap(canvas, map, cell) {
  const T = map.length;
  canvas.width = T * cell;
  canvas.height = T * cell;
  const ctx = canvas.getContext("2d");
  for (let q = 0; q < T; q++) {
    for (let k = 0; k < T; k++) {
      if (k > q) {
        ctx.fillStyle = "#f1f2f4"; // the causal mask: a token never sees later ones
      } else {
        const w = map[q][k];
        const a = Math.max(0, Math.min(1, w));
        const c = (base) => Math.round(255 - (255 - base) * a);
        ctx.fillStyle = `rgb(${c(35)}, ${c(87)}, ${c(214)})`;
      }
      ctx.fillRect(k * cell, q * cell, cell, cell);
    }
  }
}

function showBig(layer, head) {
  const r = state.attn;
  const map = r.maps[layer][head];
  const T = map.length;
  const cell = Math.max(12, Math.min(30, Math.floor(560 / T)));
  const pad = 74;
  const canvas = el("canvas", { role: "img", dataset: { layer: String(r.layers[layer]), head: String(head) },
    "aria-label": `attention of layer ${r.layers[layer]}, head ${head}: ${T} tokens` });
  canvas.width = pad + T * cell;
  canvas.height = pad + T * cell;
  const inner = document.createElement("canvas");
  paintMap(inner, map, cell);
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(inner, pad, pad);
  ctx.fillStyle = "#1d2330";
  ctx.font = "11px ui-monospace, monospace";
  ctx.textBaseline = "middle";
  ctx.textAlign = "right";
  r.labels.forEach((lab, i) => ctx.fillText(lab.slice(0, 9), pad - 4, pad + i * cell + cell / 2));
  ctx.textAlign = "left";
  r.labels.forEach((lab, i) => {
    ctx.save();
    ctx.translate(pad + i * cell + cell / 2, pad - 4);
    ctx.rotate(-Math.PI / 2);
    ctx.fillText(lab.slice(0, 9), 0, 0);
    ctx.restore();
  });
  const box = $("attn-big");
  box.replaceChildren(el("h3", { text: `layer ${r.layers[layer]}, head ${head}` }), canvas);
  for (const b of document.querySelectorAll(".head button")) {
    b.setAttribute("aria-pressed", String(b.dataset.layer === String(layer) && b.dataset.head === String(head)));
  }
}

function renderAttention(r) {
  state.attn = r;
  const box = $("attn-maps");
  box.replaceChildren();
  r.layers.forEach((layer, li) => {
    const row = el("div", { class: "heads", role: "group", "aria-label": `layer ${layer}` });
    for (let h = 0; h < r.n_head; h++) {
      const c = el("canvas", { dataset: { layer: String(layer), head: String(h) } });
      paintMap(c, r.maps[li][h], 1);
      const b = el("button", { type: "button", "aria-pressed": "false", dataset: { layer: String(li), head: String(h) },
        "aria-label": `layer ${layer} head ${h}`, onclick: () => showBig(li, h) }, c);
      row.append(el("figure", { class: "head" }, b, el("figcaption", { text: `L${layer} · head ${h}` })));
    }
    box.append(row);
  });
  showBig(0, 0);
  $("attn-status").textContent = `${r.labels.length} tokens · checkpoint ${r.checkpoint.name}` +
    (r.checkpoint.val_loss !== null ? ` (val ${fmt(r.checkpoint.val_loss, 3)})` : "");
}

async function computeAttention(e) {
  e.preventDefault();
  const status = $("attn-status");
  status.classList.remove("error");
  status.textContent = "computing from the checkpoint…";
  $("attn-go").disabled = true;
  try {
    const r = await apiJSON(`/api/runs/${encodeURIComponent(state.id)}/attention`, {
      method: "POST", json: { text: $("attn-text").value, checkpoint: $("attn-ckpt").value } });
    renderAttention(r);
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) keyBox.refused();
    status.textContent = `error${err.status ? ` ${err.status}` : ""}: ${err.message}`;
    status.classList.add("error");
    if (err instanceof ApiError && err.code === "needs_train_extra") {
      $("attn-note").hidden = false;
      $("attn-note").textContent = err.message;
    }
  } finally {
    $("attn-go").disabled = !(state.data && state.data.attention.available && state.data.checkpoints.length);
  }
}

// --- loading --------------------------------------------------------------------------------
async function loadRun() {
  clearTimeout(state.timer);
  if (!state.id || !keyBox.ready()) return;
  try {
    const d = await apiJSON(`/api/runs/${encodeURIComponent(state.id)}`);
    state.data = d;
    renderRun(d);
    $("run-status").hidden = true;
    if (!d.finished) state.timer = setTimeout(loadRun, REFRESH_MS);
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) keyBox.refused();
    $("run-status").hidden = false;
    $("run-status").textContent = `could not read the run: ${err.message}`;
  }
  document.body.dataset.ready = "1";
}

async function loadList() {
  if (!keyBox.ready()) return;
  let list;
  try {
    list = await apiJSON("/api/runs");
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) keyBox.refused();
    $("run-status").textContent = `could not list runs: ${err.message}`;
    return;
  }
  $("playground-link").hidden = list.context !== "served";
  state.runs = list.data;
  if (!state.runs.length) {
    $("run-status").textContent = list.context === "served"
      ? "The served model's training run folder is not on this machine, so there is nothing to show."
      : "No run folders here yet (a run folder holds config.json); this page looks again every 5 s.";
    state.timer = setTimeout(loadList, REFRESH_MS);
    document.body.dataset.ready = "1";
    return;
  }
  const sel = $("run-select");
  sel.replaceChildren(...state.runs.map((r) => el("option", { value: r.id, text: r.finished ? r.id : `${r.id} (training)` })));
  $("run-pick").hidden = state.runs.length < 2;
  const wanted = new URLSearchParams(location.search).get("run");
  state.id = state.runs.some((r) => r.id === wanted) ? wanted : state.runs[0].id;
  sel.value = state.id;
  await loadRun();
}

async function main() {
  keyBox = await setupKeyBox({ onChange: loadList });
  $("run-select").addEventListener("change", () => {
    state.id = $("run-select").value;
    history.replaceState(null, "", `?run=${encodeURIComponent(state.id)}`);
    $("attn-maps").replaceChildren();
    $("attn-big").replaceChildren();
    loadRun();
  });
  $("attn-form").addEventListener("submit", computeAttention);
  await loadList();
}

main();
