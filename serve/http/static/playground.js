// The playground: stream a completion token by token, each token a chip shaded by its
// probability; a chip opens the model's top alternatives at that position (the API's logprobs).
// "Chat" (chat.js) does the same for a chat model's replies; "Score text" asks the API for the
// prompt's own logprobs (echo) and shows each token's surprise.
import { chatAvailable, sendChat, setupChat } from "/ui/chat.js";
import { addChip, resetTokens, showPinned, tokenCount, wireChips } from "/ui/chips.js";
import {
  ApiError, api, apiJSON, chipText, el, errorOf, facts, fmt, fmtInt, fmtParams, hasSeries, histogramBuckets,
  histogramQuantile, parsePrometheus, quotedToken, setupKeyBox, sumOf,
} from "/ui/common.js";
import {
  fitDefaults, numberField, onUnauthorized, running, samplingFields, showError, stop, stream,
} from "/ui/sampling.js";

const $ = (id) => document.getElementById(id);
const METRICS_EVERY_MS = 2000;
const RATE_WINDOW_MS = 15000;
const TABS = { generate: "gen", chat: "chat", score: "score" }; // tab -> the token list its chips show

const state = {
  modelId: null,
  vocab: null,
  metricsHistory: [], // [{t, generated}] for the tokens/s rate
  lastMetricsAt: 0,
};
let keyBox = null;

// --- generation ---------------------------------------------------------------------------
async function generate() {
  if (running()) return;
  const prompt = $("prompt").value;
  const body = {
    prompt, ...samplingFields(), logprobs: numberField("logprobs"),
    stream: true, stream_options: { include_usage: true },
  };
  const out = $("output");
  await stream({
    path: "/v1/completions", body, tokenize: { prompt }, param: "prompt",
    status: $("gen-status"), shown: $("request-json"), count: () => tokenCount("gen"),
    onStart: () => {
      out.replaceChildren(el("span", { class: "prompt-text", text: prompt }));
      resetTokens("gen", prompt);
    },
    onChoice: (choice) => {
      const lp = choice.logprobs;
      for (let i = 0; i < (lp?.tokens?.length ?? 0); i++) {
        const top = Object.entries(lp.top_logprobs?.[i] || {}).sort((a, b) => b[1] - a[1]);
        addChip(out, "gen", { text: lp.tokens[i], logprob: lp.token_logprobs[i], top, id: choice.token_ids?.[i],
                              drafted: choice.accepted_draft?.[i] });
      }
    },
  });
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
  resetTokens("score", "", tokens);
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
    fitDefaults(m);
    $("tab-chat").hidden = !chatAvailable(m);
    if ($("tab-chat").hidden && !$("panel-chat").hidden) selectTab("generate");
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
  for (const t of Object.keys(TABS)) {
    const tab = $(`tab-${t}`);
    const on = t === name;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    $(`panel-${t}`).hidden = !on;
  }
  // One set of Sampling controls serves Generate and Chat: it sits under the shown panel's buttons.
  if (name !== "score") $(`panel-${name}`).querySelector(".buttons").after($("sampling"));
  showPinned(TABS[name]);
}

// The ARIA tabs pattern: arrow keys cycle through the tabs shown, Home and End jump to the ends.
function wireTabs() {
  const list = document.querySelector("[role=tablist]");
  for (const t of Object.keys(TABS)) $(`tab-${t}`).addEventListener("click", () => selectTab(t));
  list.addEventListener("keydown", (e) => {
    const tabs = [...list.querySelectorAll("[role=tab]:not([hidden])")];
    const at = tabs.findIndex((t) => t.getAttribute("aria-selected") === "true");
    const moves = { ArrowRight: at + 1, ArrowLeft: at - 1 + tabs.length, Home: 0, End: tabs.length - 1 };
    if (!(e.key in moves)) return;
    e.preventDefault();
    const next = tabs[moves[e.key] % tabs.length];
    selectTab(next.id.slice("tab-".length));
    next.focus();
  });
}

function wireKeys() {
  const send = { generate, chat: sendChat, score };
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && running()) {
      e.preventDefault();
      stop();
    } else if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      const shown = Object.keys(TABS).find((t) => !$(`panel-${t}`).hidden);
      send[shown]();
    }
  });
}

async function main() {
  keyBox = await setupKeyBox({ onChange: () => { loadModel(); pollMetrics(); } });
  onUnauthorized(() => keyBox.refused());
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", stop);
  $("score").addEventListener("click", score);
  wireChips($("output"), "gen");
  wireChips($("heat"), "score");
  setupChat();
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
