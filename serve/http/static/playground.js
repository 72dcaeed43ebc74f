// The playground: stream a completion token by token, each token a chip shaded by its
// probability; a chip opens the model's top alternatives at that position (the API's logprobs).
// "Score text" asks the API for the prompt's own logprobs (echo) and shows each token's surprise.
import {
  EOT, ApiError, api, apiJSON, chipText, el, errorOf, facts, fmt, fmtInt, fmtParams, hasSeries, histogramBuckets,
  histogramQuantile, parsePrometheus, quotedToken, setupKeyBox, sseEvents, sumOf,
} from "/ui/common.js";

const $ = (id) => document.getElementById(id);
const METRICS_EVERY_MS = 2000;
const RATE_WINDOW_MS = 15000;

const state = {
  ctrl: null, // AbortController of the running generation
  gen: { prompt: "", tokens: [] }, // tokens: {text, logprob, top: [[text, logprob], ...], id}
  score: { prompt: "", tokens: [] },
  pinned: { gen: -1, score: -1 },
  modelId: null,
  vocab: null,
  metricsHistory: [], // [{t, generated}] for the tokens/s rate
  lastMetricsAt: 0,
};
let keyBox = null;

// --- generation ---------------------------------------------------------------------------
function numberField(id) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  return Number(raw);
}

function parseStops(text) {
  return text
    .split("\n")
    .filter((s) => s !== "")
    .map((s) => s.replace(/\\(n|t|\\)/g, (_, c) => ({ n: "\n", t: "\t", "\\": "\\" })[c]));
}

export function requestBody() {
  const body = {
    prompt: $("prompt").value,
    max_tokens: numberField("max_tokens"),
    temperature: numberField("temperature"),
    top_k: numberField("top_k"),
    top_p: numberField("top_p"),
    logprobs: numberField("logprobs"),
    stream: true,
    stream_options: { include_usage: true },
  };
  const seed = numberField("seed");
  if (seed !== undefined) body.seed = seed;
  const stops = parseStops($("stop_strings").value);
  if (stops.length) body.stop = stops;
  if ($("ignore_eos").checked) body.ignore_eos = true;
  for (const k of Object.keys(body)) if (body[k] === undefined) delete body[k];
  return body;
}

function setRunning(running) {
  $("generate").disabled = running;
  $("stop").disabled = !running;
  document.body.classList.toggle("generating", running);
}

function markParam(param) {
  for (const node of document.querySelectorAll("[data-param]")) {
    node.toggleAttribute("aria-invalid", node.dataset.param === param);
  }
}

function showError(statusNode, err) {
  if (err instanceof ApiError && err.status === 401) keyBox.refused();
  statusNode.textContent = err instanceof ApiError ? `error ${err.status}: ${err.message}` : `error: ${err.message}`;
  statusNode.classList.add("error");
  if (err instanceof ApiError) markParam(err.param);
}

async function generate() {
  if (state.ctrl) return;
  const status = $("gen-status");
  status.classList.remove("error");
  delete status.dataset.finish;
  markParam(null);
  const body = requestBody();
  $("request-json").textContent = JSON.stringify(body, null, 2);
  const out = $("output");
  out.replaceChildren(el("span", { class: "prompt-text", text: body.prompt }));
  state.gen = { prompt: body.prompt, tokens: [] };
  state.pinned.gen = -1;
  showHint();
  const ctrl = new AbortController();
  state.ctrl = ctrl;
  setRunning(true);
  status.textContent = "waiting for the first token…";
  const t0 = performance.now();
  let firstAt = null;
  let finish = null;
  let usage = null;
  try {
    const res = await api("/v1/completions", { method: "POST", json: body, signal: ctrl.signal });
    if (!res.ok) throw await errorOf(res);
    for await (const chunk of sseEvents(res)) {
      if (chunk.error) throw new ApiError(500, chunk);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      const lp = choice.logprobs;
      if (lp && lp.tokens) {
        for (let i = 0; i < lp.tokens.length; i++) {
          const top = Object.entries(lp.top_logprobs?.[i] || {}).sort((a, b) => b[1] - a[1]);
          addChip({ text: lp.tokens[i], logprob: lp.token_logprobs[i], top, id: choice.token_ids?.[i] });
        }
      }
      if (firstAt === null && state.gen.tokens.length) firstAt = performance.now();
      if (choice.finish_reason) finish = choice.finish_reason;
      const n = state.gen.tokens.length;
      if (n) status.textContent = `${n} token${n === 1 ? "" : "s"}…`;
    }
    const secs = (performance.now() - t0) / 1000;
    const n = usage ? usage.completion_tokens : state.gen.tokens.length;
    const ttft = firstAt === null ? "" : ` · first token after ${fmtInt(firstAt - t0)} ms`;
    status.textContent = `done: ${n} tokens in ${secs.toFixed(2)} s (${fmtInt(n / Math.max(secs, 1e-3))} tok/s)` +
      `${ttft} · finish: ${finish || "?"}`;
    status.dataset.finish = finish || "";
  } catch (err) {
    if (err.name === "AbortError") {
      status.textContent = `stopped after ${state.gen.tokens.length} tokens`;
      status.dataset.finish = "stopped";
    } else {
      showError(status, err);
      status.dataset.finish = "error";
    }
  } finally {
    state.ctrl = null;
    setRunning(false);
  }
}

function stop() {
  if (state.ctrl) state.ctrl.abort(); // closing the stream is the cancel: the server frees the slot
}

function probClass(chip, p) {
  chip.style.setProperty("--p", p.toFixed(4));
  if (p > 0.55) chip.classList.add("strong");
}

function addChip(tok) {
  const i = state.gen.tokens.length;
  state.gen.tokens.push(tok);
  const p = Math.exp(tok.logprob);
  const chip = el("span", {
    class: `chip${tok.text === EOT ? " eot" : ""}`,
    role: "button",
    tabindex: i === 0 ? "0" : "-1",
    dataset: { i: String(i), p: String(p), token: tok.text },
    "aria-label": `token ${i + 1}: ${quotedToken(tok.text)}, probability ${fmt(p, 3)}`,
  }, chipText(tok.text));
  probClass(chip, p);
  $("output").append(chip);
}

// --- scoring ------------------------------------------------------------------------------
async function score() {
  const status = $("score-status");
  status.classList.remove("error");
  const text = $("score-text").value;
  if (!text) {
    status.textContent = "type or paste some text to score";
    return;
  }
  const alternatives = numberField("logprobs") || 5;
  const body = { prompt: text, max_tokens: 0, echo: true, logprobs: alternatives, temperature: 0 };
  status.textContent = "scoring…";
  $("score").disabled = true;
  try {
    const res = await api("/v1/completions", { method: "POST", json: body });
    if (!res.ok) {
      $("score-summary").replaceChildren(); // an answer refused: no figures from an earlier text
      $("heat").replaceChildren();
      throw await errorOf(res);
    }
    const out = await res.json();
    renderScore(text, out.choices[0].logprobs);
    status.textContent = "";
  } catch (err) {
    showError(status, err);
  } finally {
    $("score").disabled = false;
  }
}

export function scoreNumbers(tokenLogprobs) {
  const scored = tokenLogprobs.filter((v) => v !== null && v !== undefined);
  const total = -scored.reduce((a, v) => a + v, 0);
  const mean = scored.length ? total / scored.length : NaN;
  return { n: scored.length, total, mean, ppl: Math.exp(mean) };
}

function renderScore(text, lp) {
  const tokens = lp.tokens.map((t, i) => ({
    text: t,
    logprob: lp.token_logprobs[i],
    top: Object.entries(lp.top_logprobs?.[i] || {}).sort((a, b) => b[1] - a[1]),
  }));
  state.score = { prompt: "", tokens };
  state.pinned.score = -1;
  const nums = scoreNumbers(lp.token_logprobs);
  let worst = -1;
  tokens.forEach((t, i) => {
    if (t.logprob !== null && (worst < 0 || t.logprob < tokens[worst].logprob)) worst = i;
  });
  const logV = state.vocab ? Math.log(state.vocab) : null;
  facts($("score-summary"), [
    ["tokens scored", String(nums.n), "n"],
    ["total loss", `${fmt(nums.total)} nats`, "total"],
    ["mean loss", `${fmt(nums.mean)} nats/token`, "mean"],
    ["perplexity", fmt(nums.ppl, 2), "ppl"],
    ["log(vocab)", logV === null ? "—" : `${fmt(logV, 3)} (a uniform guess)`, "logv"],
    ["most surprising", worst < 0 ? "—" : `${quotedToken(tokens[worst].text)} (${fmt(-tokens[worst].logprob, 3)})`,
      "worst"],
  ]);
  const heat = $("heat");
  heat.replaceChildren();
  const scale = logV || Math.max(...tokens.map((t) => (t.logprob === null ? 0 : -t.logprob)), 1);
  tokens.forEach((t, i) => {
    const s = t.logprob === null ? null : -t.logprob;
    const cell = el("span", {
      class: `chip heat-chip${s === null ? " unscored" : ""}`,
      role: "button",
      tabindex: i === 0 ? "0" : "-1",
      dataset: { i: String(i), token: t.text, surprise: s === null ? "" : String(s) },
      "aria-label": s === null ? `token ${i + 1}: ${quotedToken(t.text)}, not scored (nothing before it)`
        : `token ${i + 1}: ${quotedToken(t.text)}, surprise ${fmt(s, 3)} nats`,
      title: s === null ? "not scored: no context before it" : `−log p = ${fmt(s, 3)}`,
    }, chipText(t.text));
    if (s !== null) cell.style.setProperty("--s", Math.min(1, s / scale).toFixed(4));
    heat.append(cell);
  });
}

// --- the alternatives panel ---------------------------------------------------------------
function showHint() {
  $("detail-title").textContent = "Next-token distribution";
  $("detail-hint").hidden = false;
  $("detail-body").replaceChildren();
}

function showDetail(kind, i) {
  const list = state[kind].tokens;
  if (i < 0 || i >= list.length) {
    showHint();
    return;
  }
  const tok = list[i];
  const before = state[kind].prompt + list.slice(0, i).map((t) => t.text).join("");
  const tail = before.length > 40 ? `…${before.slice(-40)}` : before;
  $("detail-hint").hidden = true;
  const body = $("detail-body");
  body.replaceChildren();
  $("detail-title").textContent = kind === "gen" ? `Token ${i + 1} of ${list.length}` : `Scored token ${i + 1}`;
  if (tok.logprob === null || tok.logprob === undefined) {
    body.append(el("p", { class: "formula", text: `${quotedToken(tok.text)}: not scored` }),
      el("p", { class: "hint", text: "The first token has no context before it to be predicted from." }));
    return;
  }
  const p = Math.exp(tok.logprob);
  const rank = tok.top.findIndex(([t]) => t === tok.text);
  body.append(
    el("p", { class: "formula", dataset: { p: String(p) } },
      "P(", el("strong", { text: quotedToken(tok.text) }), ` | ${quotedToken(tail)}) = `, el("strong", { text: fmt(p) })),
    el("p", { class: "sub", text: `logprob ${fmt(tok.logprob)} · loss −log p = ${fmt(-tok.logprob, 3)} nats · ` +
      (rank >= 0 ? `rank ${rank + 1}` : `outside the top ${tok.top.length}`) +
      (tok.id !== undefined ? ` · id ${tok.id}` : "") }),
  );
  if (!tok.top.length) {
    body.append(el("p", { class: "hint", text: "No alternatives were requested (alternatives = 0)." }));
    return;
  }
  const bars = el("ol", { class: "bars", "aria-label": `top ${tok.top.length} alternatives` });
  let covered = 0;
  for (const [text, lp] of tok.top) {
    const q = Math.exp(lp);
    covered += q;
    const fill = el("span", { class: "fill" });
    fill.style.width = `${(q * 100).toFixed(2)}%`;
    bars.append(el("li", { class: `bar${text === tok.text ? " chosen" : ""}`, dataset: { token: text, p: String(q) } },
      el("span", { class: "tok", text: quotedToken(text) }),
      el("span", { class: "track" }, fill),
      el("span", { class: "val", text: fmt(q) })));
  }
  if (rank < 0) {
    const fill = el("span", { class: "fill" });
    fill.style.width = `${(p * 100).toFixed(2)}%`;
    bars.append(el("li", { class: "bar chosen outside", dataset: { token: tok.text, p: String(p) } },
      el("span", { class: "tok", text: `${quotedToken(tok.text)} (chosen)` }),
      el("span", { class: "track" }, fill), el("span", { class: "val", text: fmt(p) })));
  }
  body.append(bars, el("p", { class: "hint", text: `the top ${tok.top.length} hold ${fmt(covered * 100, 1)}% of the ` +
    "probability. These are the model's own probabilities (temperature 1, before top-k/top-p)." }));
}

function wireChips(container, kind) {
  const chipAt = (target) => target.closest?.(".chip");
  const focusChip = (i) => {
    const chips = container.querySelectorAll(".chip");
    if (!chips.length) return;
    const k = Math.max(0, Math.min(chips.length - 1, i));
    chips.forEach((c, j) => c.setAttribute("tabindex", j === k ? "0" : "-1"));
    chips[k].focus();
  };
  const pin = (i) => {
    state.pinned[kind] = i;
    container.querySelectorAll(".chip.pinned").forEach((c) => c.classList.remove("pinned"));
    const chip = container.querySelector(`.chip[data-i="${i}"]`);
    if (chip) {
      chip.classList.add("pinned");
      // one tab stop for the whole text: the pinned token (arrow keys move from there)
      container.querySelectorAll('.chip[tabindex="0"]').forEach((c) => c.setAttribute("tabindex", "-1"));
      chip.setAttribute("tabindex", "0");
    }
    showDetail(kind, i);
  };
  container.addEventListener("mouseover", (e) => {
    const chip = chipAt(e.target);
    if (chip) showDetail(kind, Number(chip.dataset.i));
  });
  container.addEventListener("mouseleave", () => {
    if (state.pinned[kind] >= 0) showDetail(kind, state.pinned[kind]);
  });
  container.addEventListener("click", (e) => {
    const chip = chipAt(e.target);
    if (!chip) return;
    pin(Number(chip.dataset.i));
    // One column (phone width): the distribution sits below the text, so bring it into view.
    if (window.matchMedia("(max-width: 860px)").matches) $("detail").scrollIntoView({ block: "nearest" });
  });
  container.addEventListener("focusin", (e) => {
    const chip = chipAt(e.target);
    if (chip) pin(Number(chip.dataset.i));
  });
  container.addEventListener("keydown", (e) => {
    const chip = chipAt(e.target);
    if (!chip) return;
    const i = Number(chip.dataset.i);
    const n = container.querySelectorAll(".chip").length;
    const moves = { ArrowRight: i + 1, ArrowDown: i + 1, ArrowLeft: i - 1, ArrowUp: i - 1, Home: 0, End: n - 1 };
    if (e.key in moves) {
      e.preventDefault();
      focusChip(moves[e.key]);
    } else if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      pin(i);
    }
  });
}

// --- model panel and live figures ---------------------------------------------------------
async function loadModel() {
  if (!keyBox.ready()) return;
  try {
    const [models, info] = await Promise.all([apiJSON("/v1/models"), apiJSON("/api/model")]);
    const m = models.data[0];
    state.modelId = m.id;
    state.vocab = info.vocab_size;
    const src = info.source || {};
    const v = info.verification || {};
    const parity = v.prefill_max_abs_diff === undefined ? "—"
      : `max |Δlogit| ${Number(v.prefill_max_abs_diff).toExponential(1)}, greedy ${v.greedy_identical_steps}/${v.greedy_steps}`;
    facts($("model-facts"), [
      ["name", m.name || info.name, "name"],
      ["version", String(m.version ?? info.version), "version"],
      ["parameters", fmtParams(info.parameters), "parameters"],
      ["context", `${fmtInt(m.context_length ?? info.context)} tokens`, "context"],
      ["vocabulary", `${fmtInt(info.vocab_size)}${info.tokenizer_kind ? ` (${info.tokenizer_kind})` : ""}`, "vocab"],
      ["shape", `${info.n_layer} layers · ${info.n_head} heads · ${info.n_embd} wide`, "shape"],
      ["trained to", src.step === null || src.step === undefined ? "—"
        : `step ${src.step}${src.val_loss ? `, val loss ${fmt(src.val_loss, 3)}` : ""}`, "trained"],
      ["ONNX vs PyTorch", parity, "parity"],
    ]);
    $("run-link").hidden = !info.run_available;
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) keyBox.refused();
    facts($("model-facts"), [["model", `unavailable: ${err.message}`]]);
  }
}

async function pollMetrics() {
  if (!keyBox.ready()) return;
  let text;
  try {
    const res = await api("/metrics");
    if (!res.ok) throw await errorOf(res);
    text = await res.text();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) keyBox.refused();
    return;
  }
  const s = parsePrometheus(text);
  const current = (l) => l.model === state.modelId;
  const mine = state.modelId && hasSeries(s, "nextoken_requests_running", current) ? current : () => true;
  const now = performance.now();
  const generated = sumOf(s, "nextoken_generation_tokens_total");
  const hist = state.metricsHistory;
  hist.push({ t: now, generated });
  while (hist.length > 2 && now - hist[1].t >= RATE_WINDOW_MS) hist.shift();
  const first = hist[0];
  const rate = hist.length > 1 ? (generated - first.generated) / ((now - first.t) / 1000) : null;
  const ttft = histogramQuantile(0.5, histogramBuckets(s, "nextoken_time_to_first_token_seconds", mine));
  const kv = sumOf(s, "nextoken_kv_cache_usage_ratio", mine);
  facts($("live-facts"), [
    ["generated tok/s", rate === null ? "…" : `${fmt(rate, 1)} (last ${fmtInt((now - first.t) / 1000)} s)`, "rate"],
    ["running", fmtInt(sumOf(s, "nextoken_requests_running", mine)), "running"],
    ["waiting", fmtInt(sumOf(s, "nextoken_requests_waiting", mine)), "waiting"],
    ["TTFT p50", Number.isNaN(ttft) ? "—" : `${fmt(ttft * 1000, 1)} ms`, "ttft"],
    ["requests finished", fmtInt(sumOf(s, "nextoken_requests_total")), "requests"],
    ["KV cache in use", `${fmt(kv * 100, 1)}%`, "kv"],
  ]);
  state.lastMetricsAt = Date.now();
  $("live-age").textContent = "· live";
}

// --- tabs and keyboard ----------------------------------------------------------------------
function selectTab(name) {
  for (const t of ["generate", "score"]) {
    const tab = $(`tab-${t}`);
    const on = t === name;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    $(`panel-${t}`).hidden = !on;
  }
  const kind = name === "score" ? "score" : "gen";
  if (state.pinned[kind] >= 0) showDetail(kind, state.pinned[kind]);
  else showHint();
}

function wireTabs() {
  $("tab-generate").addEventListener("click", () => selectTab("generate"));
  $("tab-score").addEventListener("click", () => selectTab("score"));
  document.querySelector("[role=tablist]").addEventListener("keydown", (e) => {
    if (e.key !== "ArrowLeft" && e.key !== "ArrowRight") return;
    const next = $("tab-generate").getAttribute("aria-selected") === "true" ? "score" : "generate";
    selectTab(next);
    $(`tab-${next}`).focus();
  });
}

function wireKeys() {
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.ctrl) {
      e.preventDefault();
      stop();
    } else if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      if ($("panel-score").hidden) generate();
      else score();
    }
  });
}

async function main() {
  keyBox = await setupKeyBox({ onChange: () => { loadModel(); pollMetrics(); } });
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", stop);
  $("score").addEventListener("click", score);
  wireChips($("output"), "gen");
  wireChips($("heat"), "score");
  wireTabs();
  wireKeys();
  await loadModel();
  await pollMetrics();
  setInterval(pollMetrics, METRICS_EVERY_MS);
  setInterval(() => {
    if (state.modelId && keyBox.ready()) {
      apiJSON("/v1/models").then((m) => { if (m.data[0].id !== state.modelId) loadModel(); }).catch(() => {});
    }
  }, 10000);
  document.body.dataset.ready = "1";
}

main();
