// Shared by the playground and the run page: the API key, fetch, SSE, Prometheus text, formatting.
// Plain ES modules served by nextoken itself; nothing is loaded from anywhere else.

const KEY_ITEM = "nextoken.apiKey"; // sessionStorage: this tab only, gone when it closes

export function apiKey() {
  try {
    return sessionStorage.getItem(KEY_ITEM) || "";
  } catch {
    return "";
  }
}

export function setApiKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_ITEM, key);
    else sessionStorage.removeItem(KEY_ITEM);
  } catch {
    // storage disabled: the key lives in the input field only
  }
}

export class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `HTTP ${status}`);
    this.status = status;
    this.param = e.param || null;
    this.code = e.code || null;
  }
}

// fetch() with the key attached; JSON bodies are sent as application/json.
export function api(path, { method = "GET", json, signal, accept } = {}) {
  const headers = {};
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (accept) headers.Accept = accept;
  const init = { method, headers, signal, cache: "no-store" };
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  return fetch(path, init);
}

export async function apiJSON(path, opts) {
  const res = await api(path, opts);
  let body = null;
  try {
    body = await res.json();
  } catch {
    body = null;
  }
  if (!res.ok) throw new ApiError(res.status, body);
  return body;
}

export async function errorOf(res) {
  let body = null;
  try {
    body = await res.json();
  } catch {
    body = null;
  }
  return new ApiError(res.status, body);
}

// The JSON objects of a text/event-stream response, up to "data: [DONE]".
export async function* sseEvents(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          yield JSON.parse(data);
        }
      }
    }
  } finally {
    reader.releaseLock();
  }
}

// --- Prometheus text exposition -------------------------------------------------------------
function promNumber(s) {
  if (s === "+Inf" || s === "Inf") return Infinity;
  if (s === "-Inf") return -Infinity;
  if (s === "NaN") return NaN;
  return Number(s);
}

// name -> [{labels, value}], for every sample line of a /metrics body.
export function parsePrometheus(text) {
  const out = new Map();
  const lineRe = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$/;
  const labelRe = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const m = lineRe.exec(line);
    if (!m) continue;
    const labels = {};
    if (m[2]) {
      for (const l of m[2].matchAll(labelRe)) {
        labels[l[1]] = l[2].replace(/\\n/g, "\n").replace(/\\"/g, '"').replace(/\\\\/g, "\\");
      }
    }
    if (!out.has(m[1])) out.set(m[1], []);
    out.get(m[1]).push({ labels, value: promNumber(m[3]) });
  }
  return out;
}

export function sumOf(samples, name, filter = () => true) {
  return (samples.get(name) || []).filter((s) => filter(s.labels)).reduce((a, s) => a + s.value, 0);
}

export function hasSeries(samples, name, filter = () => true) {
  return (samples.get(name) || []).some((s) => filter(s.labels));
}

// Cumulative buckets [{le, count}] of one histogram, summed over the series that pass `filter`.
export function histogramBuckets(samples, name, filter = () => true) {
  const byLe = new Map();
  for (const s of samples.get(`${name}_bucket`) || []) {
    if (!filter(s.labels)) continue;
    const le = promNumber(s.labels.le);
    byLe.set(le, (byLe.get(le) || 0) + s.value);
  }
  return [...byLe.entries()].map(([le, count]) => ({ le, count })).sort((a, b) => a.le - b.le);
}

// Prometheus's histogram_quantile: linear interpolation inside the bucket holding the rank.
export function histogramQuantile(q, buckets) {
  if (!buckets.length) return NaN;
  const total = buckets[buckets.length - 1].count;
  if (!(total > 0)) return NaN;
  const rank = q * total;
  let prevLe = 0;
  let prevCount = 0;
  for (const b of buckets) {
    if (b.count >= rank) {
      if (b.le === Infinity) return prevLe; // the answer lies above the highest finite bound
      if (b.count === prevCount) return b.le;
      return prevLe + ((b.le - prevLe) * (rank - prevCount)) / (b.count - prevCount);
    }
    prevLe = b.le;
    prevCount = b.count;
  }
  return prevLe;
}

// --- formatting -----------------------------------------------------------------------------
export const EOT = "<|endoftext|>";

// A token as a chip shows it: whitespace made visible, end-of-text named.
export function visibleToken(t) {
  if (t === EOT) return "⟨eot⟩";
  if (t === "") return "∅";
  return t.replace(/\n/g, "↵").replace(/\t/g, "→").replace(/\r/g, "␍");
}

// A token inside running text: a newline shows as ↵ and also breaks the line, so indentation
// that follows it in the same token starts the next line, as it does in the text.
export function chipText(t) {
  if (t === EOT) return "⟨eot⟩";
  if (t === "") return "∅";
  return t.replace(/\n/g, "↵\n").replace(/\t/g, "→").replace(/\r/g, "␍");
}

// A token as a table label: quoted, with visible spaces at its ends.
export function quotedToken(t) {
  if (t === EOT) return "⟨eot⟩";
  return `“${visibleToken(t).replace(/^ | $/g, "␣")}”`;
}

export function fmt(x, digits = 4) {
  if (x === null || x === undefined || Number.isNaN(x)) return "—";
  return Number(x).toFixed(digits);
}

export function fmtInt(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return "—";
  return Math.round(x).toLocaleString("en-US");
}

export function fmtParams(n) {
  if (!n) return "—";
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)}B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)}M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}k`;
  return String(n);
}

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

export function facts(dl, rows) {
  dl.replaceChildren();
  for (const [term, value, id] of rows) {
    dl.append(el("dt", { text: term }), el("dd", { text: value, dataset: id ? { fact: id } : undefined }));
  }
}

// The key box in the header: ask /api/auth whether the server wants a key, keep it in the tab.
export async function setupKeyBox({ onChange }) {
  const box = document.getElementById("key-box");
  const input = document.getElementById("api-key");
  const note = document.getElementById("key-note");
  input.value = apiKey();
  let required = false;
  try {
    const res = await fetch("/api/auth", { cache: "no-store" });
    required = res.ok && (await res.json()).api_key_required === true;
  } catch {
    required = false;
  }
  box.hidden = !required;
  const commit = () => {
    setApiKey(input.value.trim());
    note.textContent = input.value.trim() ? "" : "this server needs an API key";
    onChange();
  };
  input.addEventListener("change", commit);
  box.addEventListener("submit", (e) => {
    e.preventDefault(); // Enter in the key field: keep it, nothing is sent anywhere
    commit();
  });
  if (required && !apiKey()) {
    note.textContent = "this server needs an API key";
    input.focus();
  }
  return {
    required,
    ready: () => !required || Boolean(apiKey()),
    refused: () => {
      box.hidden = false;
      note.textContent = "the server refused this key (401)";
    },
  };
}
