"""The request contract: every route's request model, which owns every rule, and what it makes for the engine.

A body is validated once, by ``errors.validate(Model, body)``: field types and ranges from the field
declarations, and the rules that tie fields together in each model's ``model_validator`` (``best_of``
equals ``n``, ``top_logprobs`` needs ``logprobs``, one structured-output field at most...), each
answered as a 400 naming the field. A valid request then makes the engine's ``SamplingParams``
(``to_sampling_params``), normalised (temperature 0 is greedy, ``top_k`` -1 is 0) and holding no
second set of bounds; only the checks that depend on the served model (vocabulary, context) remain,
in ``SamplingParams.check``. ``/openapi.json`` is generated from these same models, so the schema
states exactly what the server enforces.

This module knows nothing about tokenizers, models or the engine's internals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from nextoken.serve.http.chat import Conversation
from nextoken.serve.http.errors import broken_rule, refused
from nextoken.serve.http.fields import (
    MAX_METADATA,
    MAX_N,
    MAX_STOP,
    MAX_STOP_TOKEN_IDS,
    MAX_TOP_LOGPROBS,
    SEED_MAX,
    SEED_MIN,
    FunctionCall,
    LogitBias,
    OnlyFalse,
    PromptField,
    StopField,
    StreamOptions,
    Text,
    TokenId,
    Tool,
    ToolChoice,
    _number,
    _Open,
)
from nextoken.serve.http.refused_fields import VllmChatRefused, VllmCompletionRefused
from nextoken.serve.http.structured import StructuredFields
from nextoken.serve.wire import SamplingParams

GREEDY_BELOW = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS): x / 1e-300 overflows
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's completions default
RECORDED = ("user", "metadata", "safety_identifier", "prompt_cache_key")  # accepted, written to the request log


class _Generation(StructuredFields):
    """The fields both generation routes share, and the rules between them."""

    endpoint: ClassVar[str]
    model: Text | None = Field(default=None, description="The served model's id or name (see /v1/models); "
                                                         "absent = the one served. Anything else is a 404.")
    temperature: StrictFloat | None = _number(0, 2, description="0 = greedy. Default 1.")
    top_p: StrictFloat | None = _number(0, 1, lo_open=True, description="Nucleus sampling. Default 1.")
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = Field(
        default=None, description="vLLM extension: keep the k most likely tokens; 0 or -1 = off (the default).")
    min_p: StrictFloat | None = _number(0, 1, description="vLLM extension: drop tokens whose probability is below "
                                                          "min_p times the most likely one's. Default 0.")
    repetition_penalty: StrictFloat | None = _number(
        0, 10, lo_open=True, description="vLLM extension (Hugging Face's): > 1 discourages tokens already in the "
                                         "prompt or output. Default 1.")
    presence_penalty: StrictFloat | None = _number(-2, 2, description="OpenAI's. Default 0.")
    frequency_penalty: StrictFloat | None = _number(-2, 2, description="OpenAI's. Default 0.")
    min_tokens: Annotated[StrictInt, Field(ge=0)] | None = Field(
        default=None, description="vLLM extension: end-of-text and `stop_token_ids` cannot end the output before "
                                  "this many tokens (at most max_tokens). Default 0.")
    stop: StopField = Field(default=None, description=f"Up to {MAX_STOP} strings; the output ends before the first "
                                                      "one and never contains it (unless "
                                                      "include_stop_str_in_output).")
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = Field(
        default=None, description="vLLM extension: token ids that end the output (the stop token is generated and "
                                  "returned, text included, as vLLM does). Each must be below the vocabulary size.")
    seed: Annotated[StrictInt, Field(ge=SEED_MIN, le=SEED_MAX)] | None = Field(
        default=None, description="Same seed, same request = same output, alone or in any batch. With n > 1, "
                                  "choice j is seeded from (seed, j), so every choice differs and each is "
                                  "reproducible.")
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] | None = Field(
        default=None, description="Choices per prompt, each sampled independently. n x prompts must fit the "
                                  "server's capacity (running + queued requests).")
    logit_bias: LogitBias | None = Field(
        default=None, description="Token id (as a string) -> bias in [-100, 100] added to its logit before "
                                  "sampling; -100 bans a token, 100 all but forces it. Ids must be below the "
                                  "vocabulary size.")
    ignore_eos: StrictBool | None = Field(default=None, description="vLLM extension: keep generating after "
                                                                    "end-of-text (benchmarks).")
    speculative: StrictBool | None = Field(
        default=None, description="nextoken extension: false keeps this request out of the server's speculative "
                                  "decoding (--speculative): it never drafts. The output is the same either way "
                                  "(greedy and seeded: token for token; sampled: in distribution); only its speed "
                                  "differs. Default true.")
    stream: StrictBool | None = Field(default=None, description="Answer with server-sent events, one chunk per "
                                                                "step and choice, then `data: [DONE]`.")
    stream_options: StreamOptions | None = Field(default=None, description="Only with stream: true.")
    add_special_tokens: StrictBool | None = Field(
        default=None, description="vLLM extension: a text prompt gets the special tokens its tokenizer adds (a "
                                  "BOS), or, for a model nextoken trained, starts after <|endoftext|> (the document "
                                  "separator it was trained with); false feeds the text alone. Default true.")
    skip_special_tokens: StrictBool | None = Field(
        default=None, description="vLLM extension: special tokens (<|endoftext|> with ignore_eos) add no text to "
                                  "the output. Default true.")
    spaces_between_special_tokens: StrictBool | None = Field(
        default=None, description="vLLM extension: with skip_special_tokens false, a special token's text is set "
                                  "apart from the text around it by spaces. Default true.")
    include_stop_str_in_output: StrictBool | None = Field(
        default=None, description="vLLM extension: the output ends with the stop string that ended it (still "
                                  "cut right after it). Default false.")
    truncate_prompt_tokens: Annotated[StrictInt, Field(ge=-1)] | None = Field(
        default=None, description="vLLM extension: feed only the prompt's last k tokens (the special tokens a text "
                                  "prompt starts with count); -1 = as many as fit beside max_tokens. Not with "
                                  "echo.")
    user: Annotated[Text, Field(max_length=256)] | None = Field(
        default=None, description="Accepted and recorded: written to the request log (logger "
                                  "nextoken.serve.requests, at --log-level info).")
    request_id: Annotated[StrictStr, Field(min_length=1, max_length=256)] | None = Field(
        default=None, description="vLLM extension: the response's id becomes cmpl-<request_id> (chatcmpl- on "
                                  "chat), so a client can find its request in logs.")

    @model_validator(mode="after")
    def _shared_rules(self) -> _Generation:
        so = self.stream_options
        if so is not None and not self.stream:
            raise broken_rule("stream_options is only allowed with stream: true", "stream_options")
        if so is not None and so.continuous_usage_stats and so.include_usage is False:
            raise broken_rule("stream_options.continuous_usage_stats needs include_usage (true, or left out)",
                              "stream_options.continuous_usage_stats")
        if self.structured_fields() and self.ignore_eos:  # a finished structure allows only end-of-text
            raise broken_rule("ignore_eos cannot be combined with structured output: once the structure is "
                              "complete only end-of-text may follow", "ignore_eos")
        if self.truncate_prompt_tokens == 0:
            raise broken_rule("truncate_prompt_tokens must be >= 1, or -1 for as many as fit, got 0",
                              "truncate_prompt_tokens")
        if self.truncate_prompt_tokens is not None and self.echo_prompt:
            raise broken_rule("truncate_prompt_tokens cannot be combined with echo (which prompt would it echo?)",
                              "truncate_prompt_tokens")
        return self

    # --- what the request asks for, as the plan and the engine need it -------------------------
    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        """A last chunk with the whole request's usage (vLLM's default with continuous_usage_stats)."""
        so = self.stream_options
        return so is not None and bool(so.include_usage or (so.include_usage is None and so.continuous_usage_stats))

    @property
    def continuous_usage(self) -> bool:
        """Every chunk carries its choice's usage so far."""
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    @property
    def recorded(self) -> dict[str, Any]:
        """Accepted metadata, written to the request log and nowhere else."""
        return {k: getattr(self, k) for k in RECORDED if getattr(self, k, None) is not None}

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def to_sampling_params(self, *, max_tokens: int | None, logprobs: int | None, seed: int | None,
                           prompt_logprobs: int | None = None, defaults: Mapping[str, int | float] | None = None,
                           extra_stop: Sequence[str] = ()) -> SamplingParams:
        """The engine's settings for one choice (its own ``seed``; ``max_tokens`` None = the rest of the context).

        ``defaults``: the model's recommended settings (generation_config.json) for fields the request omits;
        ``extra_stop``: stop strings the chat template adds (the model must not write the user's next turn).
        """
        d = defaults or {}

        def value(name: str, fallback: float) -> Any:
            v = getattr(self, name)
            return v if v is not None else d.get(name, fallback)

        temperature = value("temperature", 1.0)
        greedy = temperature < GREEDY_BELOW  # the filters cannot change the argmax: turn them off
        return SamplingParams(
            temperature=0.0 if greedy else float(temperature),
            top_p=1.0 if greedy else float(value("top_p", 1.0)),
            top_k=0 if greedy else max(int(value("top_k", 0)), 0),  # -1 is vLLM's spelling of off
            min_p=0.0 if greedy else float(value("min_p", 0.0)),
            repetition_penalty=float(value("repetition_penalty", 1.0)),
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            max_tokens=max_tokens, min_tokens=self.min_tokens or 0, stop=[*self.stop_strings(), *extra_stop],
            # the client's own stop strings, not the chat template's
            include_stop=self.stop_strings() if self.include_stop_str_in_output else [],
            skip_special_tokens=self.skip_special_tokens is not False,
            spaces_between_special_tokens=self.spaces_between_special_tokens is not False,
            stop_token_ids=list(self.stop_token_ids or []), seed=seed, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logit_bias={int(k): float(v) for k, v in (self.logit_bias or {}).items()},
            ignore_eos=bool(self.ignore_eos), structured=self.structured, speculative=self.speculative is not False)


class CompletionRequest(_Generation, VllmCompletionRefused):
    """POST /v1/completions."""

    endpoint: ClassVar[str] = "completions"

    prompt: PromptField = Field(description="One prompt (text or token ids) or a batch (a list of strings or of "
                                            "token-id lists). Choice index = prompt index x n + j. Token ids are "
                                            "fed exactly as given; text gets the tokenizer's special tokens "
                                            "unless add_special_tokens is false.")
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = Field(
        default=None, description="Tokens to generate per choice (default 16); prompt + max_tokens must fit the "
                                  "context. 0 only with echo: score the prompt, generate nothing.")
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = Field(
        default=None, description="Return each token's log-probability and the N most likely alternatives (the "
                                  "model's own distribution, before sampling settings). With echo, the prompt's "
                                  "tokens come first; a token with nothing before it has null.")
    echo: StrictBool | None = Field(default=None, description="Prepend the prompt to each choice's text (and, with "
                                                              "logprobs, its tokens' log-probabilities).")
    best_of: Annotated[StrictInt, Field(ge=1, le=MAX_N)] | None = Field(
        default=None, description="Only equal to n (every generated choice is returned; none is ranked away).")
    suffix: Annotated[StrictStr, Field(max_length=0)] | None = Field(default=None,
                                                                     description=refused("suffix", 'null or ""'))

    @model_validator(mode="after")
    def _completion_rules(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise broken_rule("max_tokens must be >= 1 (0 only with echo: true, to score the prompt)", "max_tokens")
        n = self.n or 1
        if self.best_of is not None and self.best_of != n:
            raise broken_rule(f"best_of must equal n ({n}): every generated choice is returned, none is ranked "
                              f"away; got {self.best_of}", "best_of", "unsupported_value")
        return self

    def output_tokens(self, default: int | None = None) -> int:
        """max_tokens, else ``default`` (the model's generation_config.json), else OpenAI's 16."""
        if self.max_tokens is not None:
            return self.max_tokens
        return DEFAULT_COMPLETION_TOKENS if default is None else default

    @property
    def logprobs_count(self) -> int | None:
        return self.logprobs

    @property
    def echo_prompt(self) -> bool:
        return bool(self.echo)


class ChatCompletionRequest(_Generation, Conversation, VllmChatRefused):
    """POST /v1/chat/completions."""

    endpoint: ClassVar[str] = "chat"

    add_special_tokens: StrictBool | None = Field(
        default=None, description="vLLM extension: also add the tokenizer's own special tokens (a BOS) before the "
                                  "rendered chat, which usually writes them itself. Default false.")
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = Field(
        default=None, description="Tokens to generate per choice; default: the rest of the context.")
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = Field(
        default=None, description="OpenAI's newer name for max_tokens; wins when both are given.")
    logprobs: StrictBool | None = Field(default=None, description="Return each output token's log-probability.")
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = Field(
        default=None, description="The N most likely alternatives per token; needs logprobs: true.")
    tools: Annotated[list[Tool], Field(max_length=128)] | None = Field(
        default=None, description="Function calling is not supported: accepted only with tool_choice \"none\" "
                                  "(the model is then not offered them).")
    tool_choice: ToolChoice = Field(default=None, description='Only "none" is supported.')
    parallel_tool_calls: None = Field(default=None, description=refused("parallel_tool_calls"))
    functions: None = Field(default=None, description=refused("functions"))
    function_call: FunctionCall = Field(default=None, description='Only "none" is supported.')
    audio: None = Field(default=None, description=refused("audio"))
    modalities: Annotated[list[Literal["text"]], Field(max_length=1)] | None = Field(
        default=None, description=refused("modalities", '["text"]'))
    prediction: None = Field(default=None, description=refused("prediction"))
    reasoning_effort: None = Field(default=None, description=refused("reasoning_effort"))
    verbosity: None = Field(default=None, description=refused("verbosity"))
    web_search_options: None = Field(default=None, description=refused("web_search_options"))
    moderation: None = Field(default=None, description=refused("moderation"))
    store: OnlyFalse | None = Field(default=None, description=refused("store", "false"))
    service_tier: Literal["auto", "default"] | None = Field(
        default=None, description='One tier: "auto" and "default" are served as "default", which the response '
                                  'reports.')
    prompt_cache_retention: None = Field(default=None, description=refused("prompt_cache_retention"))
    prompt_cache_options: None = Field(default=None, description=refused("prompt_cache_options"))
    metadata: Annotated[dict[Annotated[StrictStr, Field(max_length=64)], Annotated[Text, Field(max_length=512)]],
                        Field(max_length=MAX_METADATA)] | None = Field(
        default=None, description="Accepted and recorded in the request log (logger nextoken.serve.requests).")
    safety_identifier: Annotated[Text, Field(max_length=256)] | None = Field(
        default=None, description="Accepted and recorded in the request log.")
    prompt_cache_key: Annotated[Text, Field(max_length=256)] | None = Field(
        default=None, description="Accepted and recorded in the request log.")
    echo: OnlyFalse | None = Field(default=None, description=refused("echo", "false"))

    @model_validator(mode="after")
    def _chat_rules(self) -> ChatCompletionRequest:
        if self.tools is not None and self.tool_choice != "none":
            raise broken_rule('function calling is not supported: tools are accepted only with tool_choice "none"',
                              "tools", "unsupported_parameter")
        if self.tool_choice not in (None, "none"):
            raise broken_rule('function calling is not supported: tool_choice must be "none"', "tool_choice",
                              "unsupported_parameter")
        if self.function_call not in (None, "none"):
            raise broken_rule('function calling is not supported: function_call must be "none"', "function_call",
                              "unsupported_parameter")
        if self.top_logprobs is not None and not self.logprobs:
            raise broken_rule("top_logprobs needs logprobs: true", "top_logprobs")
        return self

    def output_tokens(self, default: int | None = None) -> int | None:
        """max_completion_tokens, else max_tokens, else ``default``; None: the rest of the context."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens if self.max_tokens is not None else default

    @property
    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def echo_prompt(self) -> bool:
        return False



# --- tokenizer routes (vLLM's shapes) -----------------------------------------------------------
class TokenizeCompletionRequest(_Open):
    """POST /tokenize with a prompt."""

    model: Text | None = None
    prompt: Text = Field(description="Text to tokenize.")
    add_special_tokens: StrictBool | None = Field(
        default=None, description="Default true: the special tokens /v1/completions feeds a text prompt with.")
    return_token_strs: StrictBool | None = Field(default=None, description="Also return each token's string.")


class TokenizeChatRequest(Conversation):
    """POST /tokenize with messages: the chat template's tokens, as /v1/chat/completions feeds them."""

    model: Text | None = None
    add_special_tokens: StrictBool | None = Field(
        default=None, description="Also add the tokenizer's own special tokens before the rendered chat. Default "
                                  "false, as /v1/chat/completions.")
    return_token_strs: StrictBool | None = None


class ApplyTemplateRequest(Conversation):
    """POST /apply-template (llama.cpp's): the prompt text /v1/chat/completions would feed for these messages."""

    model: Text | None = None


class DetokenizeRequest(_Open):
    """POST /detokenize."""

    model: Text | None = None
    tokens: Annotated[list[TokenId], Field(max_length=1 << 20)] = Field(description="Token ids, each below the "
                                                                                    "vocabulary size.")
