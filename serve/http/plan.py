"""Planning: one validated request -> one engine request per choice, each checked against the served model.

Convert: ``CompletionRequest`` | ``ChatCompletionRequest`` --> prompts (text or token ids; a chat's
messages through the model's chat template) --> tokenized once --> per prompt and ``n``, a ``Choice``:
the ids the model is fed, the ids it echoes, and its ``SamplingParams`` (``SamplingParams.check``
against the served model: vocabulary and context; its seed derived from the request's; what the
request omits from the model's generation_config.json). Choices are numbered as OpenAI numbers them:
index = prompt index x n + j.

Prompts: a text prompt gets the special tokens of ``ModelTokenizer.encode_prompt`` (the tokenizer's
BOS; ``<|endoftext|>`` first for a model nextoken trained) unless ``add_special_tokens`` is false; a
rendered chat already holds the ones its template writes; a token-id prompt is fed exactly as given
(lm-eval's windows count on it). ``echo`` returns the prompt's own tokens, not those added ones; with
``logprobs`` each echoed token has its log-probability given everything before it, so only a token
with nothing before it (the first of a token-id prompt) has ``null``, as OpenAI's first token does.

This module knows nothing about HTTP, processes or the engine's internals.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from nextoken.serve.http.chat import ChatTemplate, ChatTemplateError
from nextoken.serve.http.errors import RequestError
from nextoken.serve.http.requests import ChatCompletionRequest, CompletionRequest, Conversation
from nextoken.serve.wire import ParamError, SamplingParams


class TokenizerView(Protocol):
    """What planning needs from the served model (``served_model.ServedModel`` has it)."""

    context: int
    eos_id: int
    chat: ChatTemplate
    sampling_defaults: Mapping[str, int | float]

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class Prompt:
    """One prompt: text (a completions string or the rendered chat) or token ids fed as given."""

    text: str | None = None
    ids: list[int] | None = None


@dataclass
class Choice:
    """One engine request: a prompt as fed, its settings, and what the response echoes."""

    index: int  # OpenAI's: prompt index x n + j
    prompt_index: int
    prompt_ids: list[int]  # exactly what the model is fed
    echo_ids: list[int]  # the prompt's own tokens (prompt_ids without the special tokens added before them)
    prompt_text: str | None  # a text prompt (tokenized again by the engine if another version runs it)
    params: SamplingParams | None  # None: nothing to run (echo with max_tokens 0 and no logprobs)
    echo_text: str = ""
    add_special_tokens: bool = False  # how prompt_ids were made from prompt_text

    @property
    def needs_engine(self) -> bool:
        return self.params is not None


def choice_seed(seed: int | None, j: int) -> int | None:
    """Choice j's seed: the request's own for j = 0 (so n = 1 is unchanged), a splitmix64 hash of (seed, j) after."""
    if seed is None or j == 0:
        return seed
    z = (seed + 0x9E3779B97F4A7C15 * j) % (1 << 64)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % (1 << 64)
    return (z ^ (z >> 31)) >> 1  # 63 bits: any integer seed field takes it


def truncated_length(truncate: int | None, context: int, max_tokens: int | None) -> int | None:
    """The prompt tokens ``truncate_prompt_tokens`` keeps: k, or with -1 as many as fit beside max_tokens."""
    if truncate is None or truncate > 0:
        return truncate
    return max(1, context - (max_tokens or 1))


def render_chat(chat: ChatTemplate, req: ChatCompletionRequest | Conversation) -> str:
    """The conversation as the model's template writes it; a template that refuses it is a 400 on messages."""
    try:
        return chat.render(req.messages, add_generation_prompt=req.generation_prompt,
                           continue_final_message=bool(req.continue_final_message),
                           extra=req.chat_template_kwargs)
    except ChatTemplateError as e:
        raise RequestError(str(e), param="messages") from None


def prompts_of(req: CompletionRequest | ChatCompletionRequest, tok: TokenizerView) -> list[Prompt]:
    if isinstance(req, ChatCompletionRequest):
        return [Prompt(text=render_chat(tok.chat, req))]
    p = req.prompt
    if isinstance(p, str):
        return [Prompt(text=p)]
    if isinstance(p[0], str):
        return [Prompt(text=s) for s in p]
    if isinstance(p[0], int):
        return [Prompt(ids=list(p))]
    return [Prompt(ids=list(ids)) for ids in p]


def special_tokens_default(req: CompletionRequest | ChatCompletionRequest) -> bool:
    """add_special_tokens as given, else vLLM's defaults: true for a text prompt, false for a rendered chat."""
    if req.add_special_tokens is not None:
        return req.add_special_tokens
    return req.endpoint != "chat"


def own_tokens(fed: list[int], own: list[int]) -> list[int]:
    """What the prompt echoes: its own tokens when the special ones were added before them, else all it fed."""
    return own if len(own) <= len(fed) and fed[len(fed) - len(own):] == own else fed


def plan_choices(req: CompletionRequest | ChatCompletionRequest, tok: TokenizerView) -> list[Choice]:
    """One Choice per prompt and n, in OpenAI's index order; every model-dependent check happens here."""
    prompts = prompts_of(req, tok)
    n, echo, logprobs = req.choices_per_prompt, req.echo_prompt, req.logprobs_count
    defaults = tok.sampling_defaults
    max_tokens = req.output_tokens(defaults.get("max_tokens"))
    special = special_tokens_default(req)
    extra_stop = tok.chat.stop if req.endpoint == "chat" else []
    choices: list[Choice] = []
    for pi, p in enumerate(prompts):
        if p.ids is not None:
            own, fed, text = list(p.ids), list(p.ids), None
        else:
            fed = tok.encode_prompt(p.text, special)
            own = own_tokens(fed, tok.encode(p.text)) if special else fed
            text = p.text
        keep = truncated_length(req.truncate_prompt_tokens, tok.context, max_tokens)
        if keep is not None and len(fed) > keep:  # vLLM's truncate_prompt_tokens: the last tokens are fed
            fed = own = fed[-keep:]
            text = None  # fed as ids from here on (another version must not tokenize the whole text again)
        echo_text = "" if not echo else (p.text if p.text is not None else tok.decode(own))
        scored_only = echo and max_tokens == 0 and logprobs is None  # the echo is the whole answer
        params = req.to_sampling_params(max_tokens=max_tokens, logprobs=logprobs, seed=req.seed,
                                        prompt_logprobs=logprobs if echo else None, defaults=defaults,
                                        extra_stop=extra_stop)
        try:
            params.check(fed, vocab_size=tok.vocab_size, context=tok.context,
                         where=f" (prompt {pi})" if len(prompts) > 1 else "",
                         prompt_param="messages" if req.endpoint == "chat" else "prompt")
        except ParamError as e:
            raise RequestError(e.message, param=e.param, code=e.code) from None
        for j in range(n):  # the choices of one prompt differ in their seed only
            own_params = None if scored_only else dataclasses.replace(params, seed=choice_seed(req.seed, j))
            choices.append(Choice(pi * n + j, pi, fed, own, text, own_params, echo_text, special))
    return choices
