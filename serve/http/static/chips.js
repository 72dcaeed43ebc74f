// Token chips and the side panel's "Next-token distribution", for each list of tokens the playground
// shows: "gen" (Generate's completion), "chat" (the assistant's replies) and "score" (Score text).
// A token: {text, logprob, top: [[text, logprob], ...] best first, id?, start?}. `start` is the index of
// the first token of its reply, so one list can hold several replies (a chat); absent, the list is one.
import { EOT, chipText, el, fmt, quotedToken } from "/ui/common.js";

const $ = (id) => document.getElementById(id);
// prompt: the text the first token followed, shown in the panel's P(token | text before it)
const lists = { gen: { prompt: "", tokens: [] }, chat: { prompt: "", tokens: [] }, score: { prompt: "", tokens: [] } };
const pinned = { gen: -1, chat: -1, score: -1 };

export function resetTokens(kind, prompt = "", tokens = []) {
  lists[kind] = { prompt, tokens };
  pinned[kind] = -1;
  showHint();
}

export function tokenCount(kind) {
  return lists[kind].tokens.length;
}

// [first, one past the last] index of the reply holding token i.
function replyOf(list, i) {
  const start = list[i].start ?? 0;
  let end = i + 1;
  while (end < list.length && (list[end].start ?? 0) === start) end++;
  return [start, end];
}

// Appends a produced token to `kind`'s list and its chip, shaded by its probability, to `container`.
export function addChip(container, kind, tok) {
  const i = lists[kind].tokens.length;
  lists[kind].tokens.push(tok);
  const p = Math.exp(tok.logprob);
  const chip = el("span", {
    class: `chip${tok.text === EOT ? " eot" : ""}${p > 0.55 ? " strong" : ""}${tok.drafted ? " drafted" : ""}`,
    role: "button",
    tabindex: i === 0 ? "0" : "-1",
    dataset: { i: String(i), p: String(p), token: tok.text },
    "aria-label": `token ${i - (tok.start ?? 0) + 1}: ${quotedToken(tok.text)}, probability ${fmt(p, 3)}`
      + (tok.drafted ? ", an accepted draft token (speculative decoding)" : ""),
  }, chipText(tok.text));
  chip.style.setProperty("--p", p.toFixed(4));
  container.append(chip);
}

export function showHint() {
  $("detail-title").textContent = "Next-token distribution";
  $("detail-hint").hidden = false;
  $("detail-body").replaceChildren();
}

// The panel for the token a tab had pinned, when it is shown again.
export function showPinned(kind) {
  if (pinned[kind] >= 0) showDetail(kind, pinned[kind]);
  else showHint();
}

function alternativeBar(text, q, cls, label = quotedToken(text)) {
  const fill = el("span", { class: "fill" });
  fill.style.width = `${(q * 100).toFixed(2)}%`;
  return el("li", { class: cls, dataset: { token: text, p: String(q) } },
    el("span", { class: "tok", text: label }), el("span", { class: "track" }, fill),
    el("span", { class: "val", text: fmt(q) }));
}

function showDetail(kind, i) {
  const { prompt, tokens: list } = lists[kind];
  if (i < 0 || i >= list.length) {
    showHint();
    return;
  }
  const tok = list[i];
  const [start, end] = replyOf(list, i);
  const before = prompt + list.slice(start, i).map((t) => t.text).join("");
  const tail = before.length > 40 ? `…${before.slice(-40)}` : before;
  $("detail-hint").hidden = true;
  const body = $("detail-body");
  body.replaceChildren();
  $("detail-title").textContent = kind === "score" ? `Scored token ${i + 1}` : `Token ${i - start + 1} of ${end - start}`;
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
    covered += Math.exp(lp);
    bars.append(alternativeBar(text, Math.exp(lp), `bar${text === tok.text ? " chosen" : ""}`));
  }
  if (rank < 0) bars.append(alternativeBar(tok.text, p, "bar chosen outside", `${quotedToken(tok.text)} (chosen)`));
  body.append(bars, el("p", { class: "hint", text: `the top ${tok.top.length} hold ${fmt(covered * 100, 1)}% of the ` +
    "probability. These are the model's own probabilities (temperature 1, before top-k/top-p)." }));
}

// Hover previews a token, click/focus pins it; arrow keys, Home and End walk the chips of `container`.
export function wireChips(container, kind) {
  const chipAt = (target) => target.closest?.(".chip");
  const focusChip = (i) => {
    const chips = container.querySelectorAll(".chip");
    if (!chips.length) return;
    const k = Math.max(0, Math.min(chips.length - 1, i));
    chips.forEach((c, j) => c.setAttribute("tabindex", j === k ? "0" : "-1"));
    chips[k].focus();
  };
  const pin = (i) => {
    pinned[kind] = i;
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
    if (pinned[kind] >= 0) showDetail(kind, pinned[kind]);
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
