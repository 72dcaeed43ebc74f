// The Chat tab, for a model with a chat template: the conversation goes to /v1/chat/completions, which
// renders it with that template; the assistant's reply streams in as token chips (chips.js) under the
// shared Sampling controls (sampling.js). Replies stay on the page as chips and go back as plain text.
import { el } from "/ui/common.js";
import { addChip, resetTokens, tokenCount, wireChips } from "/ui/chips.js";
import { numberField, running, samplingFields, stop, stream } from "/ui/sampling.js";

const $ = (id) => document.getElementById(id);
// What a reply's first token followed, as the distribution panel shows it: the rendered chat, elided.
const CONVERSATION = "…";
let said = []; // the turns so far, {role, content}: what the next request sends back
let following = true; // the log keeps its newest line in view until the reader scrolls up
let scrollQueued = false;

// Without a template of its own the server renders chats with nextoken's default, which a base model
// was never trained on: the tab is offered only for the model's own or the server's --chat-template.
export function chatAvailable(card) {
  return card.chat_template === "model" || card.chat_template === "--chat-template";
}

function messages(next) {
  const system = $("chat-system").value;
  return [...(system.trim() ? [{ role: "system", content: system }] : []), ...said, { role: "user", content: next }];
}

function turn(role, content) {
  return el("li", { class: `turn ${role}` }, el("span", { class: "role", text: role }), content);
}

function chatToken(entry, id, start) {
  const top = (entry.top_logprobs || []).map((t) => [t.token, t.logprob]).sort((a, b) => b[1] - a[1]);
  return { text: entry.token, logprob: entry.logprob, top, id, start };
}

// Once per frame, not per token: reading the log's height lays it out, and a long reply would lay
// it out thousands of times.
function keepInView(log) {
  if (!following || scrollQueued) return;
  scrollQueued = true;
  requestAnimationFrame(() => {
    scrollQueued = false;
    log.scrollTop = log.scrollHeight;
  });
}

export async function sendChat() {
  if (running()) return;
  const input = $("chat-input");
  const status = $("chat-status");
  const text = input.value;
  if (!text.trim()) {
    status.textContent = "type a message to send";
    input.focus();
    return;
  }
  const body = {
    messages: messages(text), ...samplingFields(), logprobs: true, top_logprobs: numberField("logprobs"),
    stream: true, stream_options: { include_usage: true },
  };
  const log = $("chat-log");
  const start = tokenCount("chat");
  const chips = el("div", {
    class: "said reply", role: "group", "aria-label": "reply (arrow keys move between tokens)",
  });
  const turns = [turn("user", el("div", { class: "said", text })), turn("assistant", chips)];
  let reply = "";
  await stream({
    path: "/v1/chat/completions", body, tokenize: { messages: body.messages }, param: "messages",
    status, shown: $("chat-request-json"), count: () => tokenCount("chat") - start,
    onStart: () => {
      log.append(...turns);
      input.value = "";
      keepInView(log);
    },
    onChoice: (choice) => {
      reply += choice.delta?.content ?? "";
      const entries = choice.logprobs?.content || [];
      entries.forEach((e, k) => addChip(chips, "chat", { ...chatToken(e, choice.token_ids?.[k], start),
                                                          drafted: choice.accepted_draft?.[k] }));
      keepInView(log);
    },
    onEnd: () => {
      if (tokenCount("chat") > start) {
        said.push({ role: "user", content: text }, { role: "assistant", content: reply });
        return;
      }
      // nothing was said (refused, too long, stopped at once): the message returns to be edited
      for (const t of turns) t.remove();
      if (!input.value) input.value = text;
    },
  });
}

function newChat() {
  said = [];
  following = true;
  $("chat-log").replaceChildren();
  resetTokens("chat", CONVERSATION);
  const status = $("chat-status");
  status.textContent = "";
  status.classList.remove("error");
  delete status.dataset.finish;
  $("chat-request-json").textContent = "";
  $("chat-input").focus();
}

export function setupChat() {
  $("chat-send").addEventListener("click", sendChat);
  $("chat-stop").addEventListener("click", stop);
  $("chat-new").addEventListener("click", newChat);
  const log = $("chat-log");
  wireChips(log, "chat");
  log.addEventListener("scroll", () => {
    following = log.scrollHeight - log.scrollTop - log.clientHeight < 8;
  }, { passive: true });
  resetTokens("chat", CONVERSATION);
}
