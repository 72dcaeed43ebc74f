"""vLLM's request extensions this server does not do: declared, so a request that sets one is refused by name.

vLLM's completions and chat requests carry many extensions beyond OpenAI's (``vllm/entrypoints/openai/
{completion,chat_completion}/protocol.py``). The ones honoured are fields of the request models with
their effect (``requests.py``, ``structured.py``); the rest are declared here with the only value
that asks for nothing (null, false, 0), so anything else is a 400 saying why (``errors.REFUSED``)
instead of being ignored like an unknown field. The request models inherit these mixins.

This module knows nothing about tokenizers, models or the engine.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StrictFloat, StrictInt

from nextoken.serve.http.errors import refused
from nextoken.serve.http.fields import OnlyFalse, _Open

OnlyZero = Annotated[StrictInt, Field(ge=0, le=0)]


class VllmRefused(_Open):
    """The extensions both generation routes refuse."""

    use_beam_search: OnlyFalse | None = Field(default=None, description=refused("use_beam_search", "false"))
    length_penalty: Annotated[StrictFloat, Field(ge=1, le=1)] | None = Field(
        default=None, description=refused("length_penalty", "1"))
    allowed_token_ids: None = Field(default=None, description=refused("allowed_token_ids"))
    bad_words: None = Field(default=None, description=refused("bad_words"))
    prompt_logprobs: None = Field(default=None, description=refused("prompt_logprobs"))
    priority: OnlyZero | None = Field(default=None, description=refused("priority", "0"))
    logits_processors: None = Field(default=None, description=refused("logits_processors"))
    return_tokens_as_token_ids: OnlyFalse | None = Field(
        default=None, description=refused("return_tokens_as_token_ids", "false"))
    return_token_ids: None = Field(default=None, description=refused("return_token_ids"))
    cache_salt: None = Field(default=None, description=refused("cache_salt"))
    kv_transfer_params: None = Field(default=None, description=refused("kv_transfer_params"))
    vllm_xargs: None = Field(default=None, description=refused("vllm_xargs"))
    max_repetition_pattern_size: OnlyZero | None = Field(
        default=None, description=refused("max_repetition_pattern_size", "0"))
    min_repetition_pattern_size: OnlyZero | None = Field(
        default=None, description=refused("min_repetition_pattern_size", "0"))
    repetition_min_count: OnlyZero | None = Field(default=None, description=refused("repetition_min_count", "0"))


class VllmCompletionRefused(VllmRefused):
    prompt_embeds: None = Field(default=None, description=refused("prompt_embeds"))


class VllmChatRefused(VllmRefused):
    include_reasoning: None = Field(default=None, description=refused("include_reasoning"))
    documents: None = Field(default=None, description=refused("documents"))
    mm_processor_kwargs: None = Field(default=None, description=refused("mm_processor_kwargs"))
