"""vLLM's request fields, recorded as data (vLLM itself is not installed here): what test_params walks.

Read from vllm-project/vllm at the commits named, field by field (names only; the models' code is vLLM's):

- ``vllm/entrypoints/openai/completion/protocol.py`` ``CompletionRequest``, commit
  d5dba2d7b0ab9b98096560c69db7126b54b14d79
- ``vllm/entrypoints/openai/chat_completion/protocol.py`` ``ChatCompletionRequest``, the same commit
- ``vllm/entrypoints/openai/engine/protocol.py`` ``StreamOptions``, commit d7e52523a55cfd60207c99d9f3b7ed527d2115b7
- ``vllm/sampling_params.py`` ``StructuredOutputsParams`` (its init fields), commit
  00388f6573ccfcffad607b8c9ecdf341a4669ceb

vLLM 0.12 dropped the ``guided_*`` fields for ``structured_outputs``; this server keeps them as aliases,
so they are walked as the server's own fields, not vLLM's.
"""

from __future__ import annotations

# The fields both of vLLM's generation requests have (OpenAI's and vLLM's sampling / extra params).
_SHARED = {
    "model", "frequency_penalty", "logit_bias", "n", "presence_penalty", "response_format", "seed", "stop",
    "stream", "stream_options", "temperature", "top_p", "user",
    # --8<-- sampling params
    "use_beam_search", "top_k", "min_p", "repetition_penalty", "length_penalty", "stop_token_ids",
    "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens", "spaces_between_special_tokens",
    "truncate_prompt_tokens", "allowed_token_ids", "prompt_logprobs",
    # --8<-- extra params
    "add_special_tokens", "structured_outputs", "priority", "request_id", "logits_processors",
    "return_tokens_as_token_ids", "return_token_ids", "cache_salt", "kv_transfer_params", "vllm_xargs",
    "max_repetition_pattern_size", "min_repetition_pattern_size", "repetition_min_count",
}

COMPLETION = _SHARED | {"prompt", "echo", "logprobs", "max_tokens", "suffix", "prompt_embeds"}

CHAT = _SHARED | {
    "messages", "logprobs", "top_logprobs", "max_tokens", "max_completion_tokens", "tools", "tool_choice",
    "reasoning_effort", "include_reasoning", "parallel_tool_calls", "bad_words", "echo", "add_generation_prompt",
    "continue_final_message", "documents", "chat_template", "chat_template_kwargs", "mm_processor_kwargs",
}

STREAM_OPTIONS = {"include_usage", "continuous_usage_stats"}

STRUCTURED_OUTPUTS = {
    "json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace", "disable_additional_properties",
    "whitespace_pattern", "structural_tag",
}
