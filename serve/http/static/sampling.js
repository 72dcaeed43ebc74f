// The Sampling controls, shared by Generate and Chat: the request fields they set, defaults that fit
// the served model, max_tokens fitted into its context, and the one stream that runs at a time.
import { ApiError, api, apiJSON, errorOf, fmtInt, sseEvents } from "/ui/common.js";

const $ = (id) => document.getElementById(id);
const DEFAULTED = ["temperature", "top_k", "top_p"]; // besides max_tokens, what a generation_config may set
const PAGE_DEFAULTS = Object.fromEntries([...DEFAULTED, "max_tokens"].map((id) => [id, $(id).defaultValue]));
// A text prompt is at most one token per UTF-8 byte (char and byte-level tokenizers) plus the few special
// tokens the tokenizer adds: below that bound nothing needs counting.
const SPECIAL_TOKENS_ALLOWANCE = 4;
const served = { context: null };
let ctrl = null; // AbortController of the running stream
let refused = () => {};

export function numberField(id) {
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

// The fields the Sampling controls set; an empty field is left out (JSON drops undefined), so the
// server's default applies.
export function samplingFields() {
  const stops = parseStops($("stop_strings").value);
  return {
    max_tokens: numberField("max_tokens"),
    temperature: numberField("temperature"),
    top_k: numberField("top_k"),
    top_p: numberField("top_p"),
    seed: numberField("seed"),
    stop: stops.length ? stops : undefined,
    ignore_eos: $("ignore_eos").checked || undefined,
  };
}

// On (re)loading the model (its /v1/models card): the controls' defaults become its generation_config's
// and max tokens is kept within its context. Setting defaultValue moves only a value nobody edited.
export function fitDefaults(card) {
  served.context = card.max_model_len ?? card.context_length ?? null;
  const model = card.default_sampling_params || {};
  for (const id of DEFAULTED) $(id).defaultValue = String(model[id] ?? PAGE_DEFAULTS[id]);
  if (!served.context) return;
  const max = $("max_tokens");
  max.max = String(served.context);
  const wanted = Number(model.max_tokens ?? PAGE_DEFAULTS.max_tokens);
  max.defaultValue = String(Math.max(1, Math.min(wanted, Math.floor(served.context / 2))));
}

class PromptTooLong extends Error {
  constructor(count, context, param) {
    super(`the prompt is ${fmtInt(count)} tokens long: it fills this model's ${fmtInt(context)}-token context, ` +
      "leaving no room for a reply; shorten it");
    this.param = param;
  }
}

// Lowers body.max_tokens to what the context leaves after the prompt, counted by /tokenize (the tokens
// the route will feed: `tokenize` is {prompt} or {messages}). Returns a note for the status line.
async function fitContext(body, tokenize, param, signal) {
  const context = served.context;
  // a chat's template adds text that only the server can count
  const bound = typeof tokenize.prompt === "string"
    ? new TextEncoder().encode(tokenize.prompt).length + SPECIAL_TOKENS_ALLOWANCE : Infinity;
  if (!context || body.max_tokens === undefined || bound + body.max_tokens <= context) return "";
  const { count } = await apiJSON("/tokenize", { method: "POST", json: tokenize, signal });
  const room = context - count;
  if (room < 1) throw new PromptTooLong(count, context, param);
  if (body.max_tokens <= room) return "";
  body.max_tokens = room;
  return `max tokens lowered to ${fmtInt(room)} to fit the ${fmtInt(context)}-token context`;
}

export function markParam(param) {
  for (const node of document.querySelectorAll("[data-param]")) {
    node.toggleAttribute("aria-invalid", node.dataset.param === param);
  }
}

// What a 401 does besides the status line (the key box asks for a key).
export function onUnauthorized(fn) {
  refused = fn;
}

export function showError(statusNode, err) {
  if (err instanceof ApiError && err.status === 401) refused();
  statusNode.textContent = err instanceof ApiError ? `error ${err.status}: ${err.message}` : `error: ${err.message}`;
  statusNode.classList.add("error");
  markParam(err.param ?? null);
}

export function running() {
  return ctrl !== null;
}

export function stop() {
  if (ctrl) ctrl.abort(); // closing the stream is the cancel: the server frees the slot
}

// One stream at a time, whichever tab started it: Generate, Send and New chat wait, every Stop is live.
function setRunning(on) {
  for (const b of document.querySelectorAll("[data-while=idle]")) b.disabled = on;
  for (const b of document.querySelectorAll("[data-while=running]")) b.disabled = !on;
}

function doneText(n, secs, ttftMs, finish) {
  const ttft = ttftMs === null ? "" : ` · first token after ${fmtInt(ttftMs)} ms`;
  return `done: ${n} tokens in ${secs.toFixed(2)} s (${fmtInt(n / Math.max(secs, 1e-3))} tok/s)${ttft}` +
    ` · finish: ${finish || "?"}`;
}

async function readStream(res, onChoice, count, status) {
  const t0 = performance.now();
  let firstAt = null;
  let finish = null;
  let usage = null;
  for await (const chunk of sseEvents(res)) {
    if (chunk.error) throw new ApiError(500, chunk);
    if (chunk.usage) usage = chunk.usage;
    const choice = chunk.choices && chunk.choices[0];
    if (!choice) continue;
    onChoice(choice);
    if (firstAt === null && count()) firstAt = performance.now();
    if (choice.finish_reason) finish = choice.finish_reason;
    const n = count();
    if (n) status.textContent = `${n} token${n === 1 ? "" : "s"}…`;
  }
  const n = usage ? usage.completion_tokens : count();
  return { finish, text: doneText(n, (performance.now() - t0) / 1000, firstAt === null ? null : firstAt - t0, finish) };
}

// Streams `body` to `path` (after fitting it into the context), handing each chunk's choice to
// `onChoice`; `count()` is the tokens shown so far. The status line shows progress, then the outcome,
// also kept in its data-finish ("stopped", "error" or the finish reason) once `onEnd(finish)` has run.
export async function stream({
  path, body, tokenize, param, status, shown, count, onStart, onChoice, onEnd = () => {},
}) {
  if (ctrl) return;
  const own = new AbortController();
  ctrl = own;
  setRunning(true);
  status.classList.remove("error");
  delete status.dataset.finish;
  markParam(null);
  shown.textContent = "";
  onStart();
  let finish;
  try {
    status.textContent = "waiting for the first token…";
    const note = await fitContext(body, tokenize, param, own.signal);
    shown.textContent = JSON.stringify(body, null, 2);
    const res = await api(path, { method: "POST", json: body, signal: own.signal });
    if (!res.ok) throw await errorOf(res);
    const done = await readStream(res, onChoice, count, status);
    status.textContent = note ? `${done.text} · ${note}` : done.text;
    finish = done.finish || "";
  } catch (err) {
    if (err.name === "AbortError") {
      status.textContent = `stopped after ${count()} tokens`;
      finish = "stopped";
    } else {
      showError(status, err);
      finish = "error";
    }
  } finally {
    ctrl = null;
    setRunning(false);
  }
  onEnd(finish);
  status.dataset.finish = finish;
}
