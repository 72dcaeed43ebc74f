"""Every request parameter is honoured or refused with a 400 naming it: none is accepted and ignored.

The parameters come from the installed ``openai`` package's request TypedDicts (completions, chat and
the Responses API), from vLLM's request models (recorded in ``vllm_fields.py`` with the commit read,
nested ``stream_options`` and ``structured_outputs`` included) and from the server's own request
models (the fields it refuses), so a new OpenAI or vLLM parameter or a new field of ours fails
``test_every_parameter_is_classified`` until it is decided here. For each parameter:

- ``refused``: bodies that must get a 4xx whose ``error.param`` names it;
- ``honoured``: a body that must be served (200), and the test (in test_openai_compat.py,
  test_vllm_compat.py, test_responses_api.py or, for the chat template's fields, test_chat_server.py) that
  shows its effect through the real server.

Metadata-only fields (``user``, ``metadata``, ``safety_identifier``, ``prompt_cache_key``) count as
honoured because they are recorded in the request log; test_openai_compat checks the log line.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from nextoken.serve.http.chat import ChatTemplate
from nextoken.serve.http.errors import RequestError, validate
from nextoken.serve.http.fields import StreamOptions, StructuredOutputs
from nextoken.serve.http.plan import render_chat
from nextoken.serve.http.requests import ChatCompletionRequest, CompletionRequest
from nextoken.serve.http.responses_api import ResponsesRequest
from tests.conftest import ServerProcess
from tests.serve.http import test_chat_server, test_openai_compat, test_responses_api, test_vllm_compat, vllm_fields

TEST_MODULES = (test_openai_compat, test_vllm_compat, test_responses_api, test_chat_server)

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
MESSAGES = [{"role": "user", "content": "hi"}]


@dataclass
class Decision:
    honoured: dict | None = None  # extra body fields of a request that must be served
    test: str | None = None  # the test in one of TEST_MODULES that shows the effect
    refused: list[dict] = field(default_factory=list)  # bodies (extra fields) that must be refused naming it
    status: int = 400  # the refusals' status


def H(value: dict, test: str, *refused: dict) -> Decision:  # noqa: N802
    return Decision(value, test, list(refused))


def R(*refused: dict, status: int = 400) -> Decision:  # noqa: N802
    return Decision(None, None, list(refused), status)


SHARED = {
    "model": Decision({"model": "<the served id>"}, "test_model_names_the_served_version", [{"model": "gpt-9"}], 404),
    "temperature": H({"temperature": 0.7}, "test_temperature_zero_is_the_argmax", {"temperature": 3},
                     {"temperature": "hot"}),
    "top_p": H({"top_p": 0.5}, "test_top_p_top_k_min_p_narrow_to_the_argmax", {"top_p": 0}),
    "top_k": H({"top_k": 5}, "test_top_p_top_k_min_p_narrow_to_the_argmax", {"top_k": -5}),
    "min_p": H({"min_p": 0.1}, "test_top_p_top_k_min_p_narrow_to_the_argmax", {"min_p": 1.5}),
    "repetition_penalty": H({"repetition_penalty": 1.3}, "test_penalties_change_a_repetitive_greedy_output",
                            {"repetition_penalty": 0}),
    "presence_penalty": H({"presence_penalty": 1.0}, "test_penalties_change_a_repetitive_greedy_output",
                          {"presence_penalty": 3}),
    "frequency_penalty": H({"frequency_penalty": 1.0}, "test_penalties_change_a_repetitive_greedy_output",
                           {"frequency_penalty": -3}),
    "min_tokens": H({"min_tokens": 1}, "test_min_tokens_holds_back_end_of_text", {"min_tokens": 5, "max_tokens": 2},
                    {"min_tokens": -1}),
    "stop": H({"stop": ["\n"]}, "test_stop_strings_through_the_openai_client", {"stop": ["a", "b", "c", "d", "e"]},
              {"stop": [""]}),
    "stop_token_ids": H({"stop_token_ids": [3]}, "test_stop_token_ids_end_the_output", {"stop_token_ids": [10 ** 6]},
                        {"stop_token_ids": [-1]}),
    "seed": H({"seed": 7}, "test_seed_reproduces_and_n_choices_differ", {"seed": "abc"}),
    "n": H({"n": 2}, "test_seed_reproduces_and_n_choices_differ", {"n": 0}, {"n": 129}),
    "logit_bias": H({"logit_bias": {"3": 5.0}}, "test_logit_bias_forces_and_bans_tokens",
                    {"logit_bias": {"3": 101}}, {"logit_bias": {"x": 1}}, {"logit_bias": {"99999": 1}}),
    "ignore_eos": H({"ignore_eos": True}, "test_ignore_eos_generates_past_end_of_text", {"ignore_eos": "yes"}),
    "speculative": H({"speculative": False}, "test_speculative_false_keeps_a_request_from_drafting",
                     {"speculative": "no"}),
    "stream": H({"stream": True}, "test_streamed_choices_carry_their_index_and_usage_sums_them", {"stream": "yes"}),
    "stream_options": H({"stream": True, "stream_options": {"include_usage": True}},
                        "test_streamed_choices_carry_their_index_and_usage_sums_them",
                        {"stream_options": {"include_usage": True}},
                        {"stream": True, "stream_options": {"include_obfuscation": True}},
                        {"stream": True, "stream_options": {"include_usage": False, "continuous_usage_stats": True}}),
    "add_special_tokens": H({"add_special_tokens": False}, "test_add_special_tokens_false_feeds_the_text_alone",
                            {"add_special_tokens": 1}),
    "response_format": H({"response_format": {"type": "json_object"}, "max_tokens": 4},
                         "test_response_format_json_schema_is_enforced", {"response_format": {"type": "xml"}},
                         {"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}}),
    "guided_json": H({"guided_json": {"type": "object"}, "max_tokens": 4}, "test_guided_regex_choice_and_json",
                     {"guided_json": "{not json"}),
    "guided_regex": H({"guided_regex": "[ab]+", "max_tokens": 4}, "test_guided_regex_choice_and_json",
                      {"guided_regex": "(unclosed"}, {"guided_regex": "a", "structured_outputs": {"regex": "b"}}),
    "structured_outputs": H({"structured_outputs": {"choice": ["yes", "no"]}},
                            "test_structured_outputs_and_their_old_names", {"structured_outputs": {}},
                            {"structured_outputs": {"regex": "a", "choice": ["a"]}},
                            {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
                            {"structured_outputs": {"regex": "a", "bogus": 1}}),
    "skip_special_tokens": H({"skip_special_tokens": False}, "test_skip_special_tokens_and_the_spaces_between_them",
                             {"skip_special_tokens": "no"}),
    "spaces_between_special_tokens": H({"spaces_between_special_tokens": False},
                                       "test_skip_special_tokens_and_the_spaces_between_them",
                                       {"spaces_between_special_tokens": 1}),
    "include_stop_str_in_output": H({"include_stop_str_in_output": True, "stop": ["e"]},
                                    "test_include_stop_str_in_output_keeps_the_stop_string",
                                    {"include_stop_str_in_output": 0}),
    "truncate_prompt_tokens": H({"truncate_prompt_tokens": 4}, "test_truncate_prompt_tokens_feeds_the_last_tokens",
                                {"truncate_prompt_tokens": 0}, {"truncate_prompt_tokens": -2}),
    "request_id": H({"request_id": "job-7"}, "test_request_id_names_the_response", {"request_id": ""},
                    {"request_id": 7}),
    "guided_choice": H({"guided_choice": ["yes", "no"]}, "test_guided_regex_choice_and_json",
                       {"guided_choice": []}),
    "guided_grammar": H({"guided_grammar": 'start: "yes" | "no"'}, "test_guided_regex_choice_and_json",
                        {"guided_grammar": "start: ((("}),
    "guided_whitespace_pattern": H({"guided_json": {"type": "object"}, "guided_whitespace_pattern": " ?",
                                    "max_tokens": 4}, "test_guided_regex_choice_and_json",
                                   {"guided_whitespace_pattern": " ?"}),
    "user": H({"user": "alice"}, "test_metadata_is_recorded_in_the_request_log", {"user": 5}),
    "use_beam_search": R({"use_beam_search": True}),
    "length_penalty": R({"length_penalty": 0.5}),
    "allowed_token_ids": R({"allowed_token_ids": [1, 2]}),
    "bad_words": R({"bad_words": ["the"]}),
    "prompt_logprobs": R({"prompt_logprobs": 1}),
    "priority": R({"priority": 1}, {"priority": -1}),
    "logits_processors": R({"logits_processors": ["my.Processor"]}),
    "return_tokens_as_token_ids": R({"return_tokens_as_token_ids": True}),
    "return_token_ids": R({"return_token_ids": True}, {"return_token_ids": False}),
    "cache_salt": R({"cache_salt": "salt"}),
    "kv_transfer_params": R({"kv_transfer_params": {"do_remote_decode": True}}),
    "vllm_xargs": R({"vllm_xargs": {"a": 1}}),
    "max_repetition_pattern_size": R({"max_repetition_pattern_size": 4}),
    "min_repetition_pattern_size": R({"min_repetition_pattern_size": 2}),
    "repetition_min_count": R({"repetition_min_count": 3}),
}
COMPLETIONS = {
    **SHARED,
    "prompt": H({"prompt": ["the", "a"]}, "test_batched_prompts_are_indexed_as_openai_does", {"prompt": 12},
                {"prompt": [[]]}, {"prompt": ""}),
    "max_tokens": H({"max_tokens": 3}, "test_max_tokens_is_the_length", {"max_tokens": 0}, {"max_tokens": 10 ** 6}),
    "logprobs": H({"logprobs": 2}, "test_logprobs_give_the_top_alternatives", {"logprobs": 21}),
    "echo": H({"echo": True}, "test_echo_prepends_the_prompt_and_scores_it", {"echo": "yes"}),
    "best_of": H({"best_of": 2, "n": 2}, "test_seed_reproduces_and_n_choices_differ", {"best_of": 3},
                 {"best_of": 1, "n": 2}),
    "suffix": R({"suffix": "the end"}),
    "prompt_embeds": R({"prompt_embeds": "AAAA"}),
    "truncate_prompt_tokens": H({"truncate_prompt_tokens": 4}, "test_truncate_prompt_tokens_feeds_the_last_tokens",
                                {"truncate_prompt_tokens": 0}, {"truncate_prompt_tokens": 2, "echo": True}),
}
CHAT = {
    **SHARED,
    "messages": H({"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]},
                  "test_chat_is_the_template_through_completions", {"messages": []},
                  {"messages": [{"role": "tool", "content": "x"}]}),
    "max_tokens": H({"max_tokens": 3}, "test_max_tokens_is_the_length", {"max_tokens": 0}),
    "max_completion_tokens": H({"max_completion_tokens": 3}, "test_max_tokens_is_the_length",
                               {"max_completion_tokens": 0}),
    "logprobs": H({"logprobs": True}, "test_logprobs_give_the_top_alternatives", {"logprobs": 2}),
    "top_logprobs": H({"logprobs": True, "top_logprobs": 2}, "test_logprobs_give_the_top_alternatives",
                      {"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21}),
    "tools": R({"tools": [TOOL]}, {"tools": [TOOL], "tool_choice": "auto"}),
    "tool_choice": R({"tool_choice": "required"}, {"tool_choice": {"type": "function",
                                                                  "function": {"name": "get_weather"}}}),
    "parallel_tool_calls": R({"parallel_tool_calls": True}),
    "functions": R({"functions": [TOOL["function"]]}),
    "function_call": R({"function_call": "auto"}),
    "audio": R({"audio": {"voice": "alloy", "format": "wav"}}),
    "modalities": R({"modalities": ["text", "audio"]}, {"modalities": ["audio"]}),
    "prediction": R({"prediction": {"type": "content", "content": "hi"}}),
    "reasoning_effort": R({"reasoning_effort": "low"}),
    "verbosity": R({"verbosity": "low"}),
    "web_search_options": R({"web_search_options": {}}),
    "moderation": R({"moderation": {"model": "omni-moderation-latest"}}),
    "store": R({"store": True}),
    "service_tier": H({"service_tier": "auto"}, "test_service_tier_is_reported", {"service_tier": "flex"}),
    "prompt_cache_retention": R({"prompt_cache_retention": "24h"}),
    "prompt_cache_options": R({"prompt_cache_options": {"mode": "explicit", "ttl": "30m"}}),
    "metadata": H({"metadata": {"team": "eval"}}, "test_metadata_is_recorded_in_the_request_log",
                  {"metadata": {f"k{i}": "v" for i in range(17)}}),
    "safety_identifier": H({"safety_identifier": "u-1"}, "test_metadata_is_recorded_in_the_request_log",
                           {"safety_identifier": 5}),
    "prompt_cache_key": H({"prompt_cache_key": "k"}, "test_metadata_is_recorded_in_the_request_log",
                          {"prompt_cache_key": 5}),
    "echo": R({"echo": True}),
    "add_generation_prompt": H({"add_generation_prompt": False}, "test_continue_final_message_and_chat_template_kwargs",
                               {"add_generation_prompt": "yes"}),
    "continue_final_message": H({"messages": [*MESSAGES, {"role": "assistant", "content": "the"}],
                                 "continue_final_message": True, "add_generation_prompt": False},
                                "test_continue_final_message_and_chat_template_kwargs",
                                {"continue_final_message": True, "add_generation_prompt": True}),
    "chat_template_kwargs": H({"chat_template_kwargs": {"enable_thinking": False}},
                              "test_continue_final_message_and_chat_template_kwargs",
                              {"chat_template_kwargs": {"messages": []}}, {"chat_template_kwargs": [1]}),
    "chat_template": R({"chat_template": "{{ messages }}"}),
    "include_reasoning": R({"include_reasoning": True}),
    "documents": R({"documents": [{"title": "a", "text": "b"}]}),
    "mm_processor_kwargs": R({"mm_processor_kwargs": {}}),
}
RESPONSES = {
    "model": H({"model": "<the served id>"}, "test_responses_create_answers_as_chat_does", {"model": "gpt-9"}),
    "input": H({"input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]},
               "test_responses_create_answers_as_chat_does", {"input": ""}, {"input": []},
               {"input": [{"type": "function_call_output", "role": "user", "content": "x"}]},
               {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}),
    "instructions": H({"instructions": "b"}, "test_responses_create_answers_as_chat_does",
                      {"instructions": 5}),
    "max_output_tokens": H({"max_output_tokens": 3}, "test_max_output_tokens_makes_the_response_incomplete",
                           {"max_output_tokens": 0}, {"max_output_tokens": 10 ** 6}),
    "temperature": H({"temperature": 0.5}, "test_responses_create_answers_as_chat_does", {"temperature": 3}),
    "top_p": H({"top_p": 0.5}, "test_responses_create_answers_as_chat_does", {"top_p": 0}),
    "stream": H({"stream": True}, "test_responses_stream_through_the_openai_client", {"stream": "yes"}),
    "stream_options": H({"stream": True, "stream_options": {"include_obfuscation": False}},
                        "test_responses_stream_through_the_openai_client", {"stream_options": {}},
                        {"stream": True, "stream_options": {"include_obfuscation": True}}),
    "text": H({"text": {"format": {"type": "json_object"}}}, "test_text_format_json_schema_is_enforced",
              {"text": {"format": {"type": "xml"}}}, {"text": {"verbosity": "low"}},
              {"text": {"format": {"type": "json_schema", "name": "a b", "schema": {}}}}),
    "metadata": H({"metadata": {"team": "eval"}}, "test_responses_create_answers_as_chat_does",
                  {"metadata": {"k": 5}}),
    "user": H({"user": "alice"}, "test_responses_create_answers_as_chat_does", {"user": 5}),
    "safety_identifier": H({"safety_identifier": "u-1"}, "test_responses_create_answers_as_chat_does",
                           {"safety_identifier": 5}),
    "prompt_cache_key": H({"prompt_cache_key": "k"}, "test_responses_create_answers_as_chat_does",
                          {"prompt_cache_key": 5}),
    "service_tier": H({"service_tier": "auto"}, "test_responses_create_answers_as_chat_does",
                      {"service_tier": "flex"}),
    "tools": H({"tools": []}, "test_responses_create_answers_as_chat_does",
               {"tools": [{"type": "function", "name": "f", "parameters": {}}]}, {"tools": [{"type": "web_search"}]}),
    "tool_choice": H({"tool_choice": "none"}, "test_responses_create_answers_as_chat_does",
                     {"tool_choice": "required"}),
    "ignore_eos": H({"ignore_eos": True}, "test_max_output_tokens_makes_the_response_incomplete",
                    {"ignore_eos": "yes"}),
    "stop": H({"stop": ["e"]}, "test_responses_stream_through_the_openai_client", {"stop": [""]}),
    "seed": H({"seed": 3}, "test_responses_create_answers_as_chat_does", {"seed": "x"}),
    "store": R({"store": True}),
    "previous_response_id": R({"previous_response_id": "resp_1"}),
    "conversation": R({"conversation": "conv_1"}),
    "background": R({"background": True}),
    "background_options": R({"background_options": {"completion_window": "2h"}}),
    "reasoning": R({"reasoning": {"effort": "low"}}),
    "include": R({"include": ["message.output_text.logprobs"]}),
    "parallel_tool_calls": R({"parallel_tool_calls": True}),
    "max_tool_calls": R({"max_tool_calls": 2}),
    "top_logprobs": R({"top_logprobs": 2}),
    "truncation": R({"truncation": "auto"}),
    "prompt": R({"prompt": {"id": "pmpt_1"}}),
    "context_management": R({"context_management": [{"type": "compaction"}]}),
    "image": R({"image": {"context_compression": "auto"}}),
    "access_programs": R({"access_programs": {"cyber": "standard"}}),
    "moderation": R({"moderation": {"model": "omni-moderation-latest"}}),
    "prompt_cache_retention": R({"prompt_cache_retention": "24h"}),
    "prompt_cache_options": R({"prompt_cache_options": {"ttl": "30m"}}),
}
RESPONSES["model"].status = 404
ENDPOINTS = {"completions": ("/v1/completions", COMPLETIONS, {"prompt": "the", "max_tokens": 2, "temperature": 0}),
             "chat": ("/v1/chat/completions", CHAT, {"messages": MESSAGES, "max_tokens": 2, "temperature": 0}),
             "responses": ("/v1/responses", RESPONSES, {"input": "hi", "max_output_tokens": 2, "temperature": 0})}
MODELS = {"completions": CompletionRequest, "chat": ChatCompletionRequest, "responses": ResponsesRequest}
VLLM = {"completions": vllm_fields.COMPLETION, "chat": vllm_fields.CHAT, "responses": set()}

# vLLM's nested request objects, field by field ("<object>.<field>"), on both generation routes.
NESTED = {
    "stream_options.include_usage": H({"stream": True, "stream_options": {"include_usage": True}},
                                      "test_streamed_choices_carry_their_index_and_usage_sums_them",
                                      {"stream": True, "stream_options": {"include_usage": "yes"}}),
    "stream_options.continuous_usage_stats": H(
        {"stream": True, "stream_options": {"continuous_usage_stats": True}},
        "test_continuous_usage_stats_put_usage_in_every_chunk",
        {"stream": True, "stream_options": {"include_usage": False, "continuous_usage_stats": True}}),
    "structured_outputs.json": H({"structured_outputs": {"json": {"type": "object"}}, "max_tokens": 4},
                                 "test_structured_outputs_and_their_old_names",
                                 {"structured_outputs": {"json": "{not json"}}),
    "structured_outputs.regex": H({"structured_outputs": {"regex": "[ab]+"}, "max_tokens": 4},
                                  "test_structured_outputs_and_their_old_names",
                                  {"structured_outputs": {"regex": "(unclosed"}}),
    "structured_outputs.choice": H({"structured_outputs": {"choice": ["yes", "no"]}},
                                   "test_structured_outputs_and_their_old_names",
                                   {"structured_outputs": {"choice": []}}),
    "structured_outputs.grammar": H({"structured_outputs": {"grammar": 'start: "yes" | "no"'}},
                                    "test_structured_outputs_and_their_old_names",
                                    {"structured_outputs": {"grammar": "start:((("}}),
    "structured_outputs.json_object": H({"structured_outputs": {"json_object": True}, "max_tokens": 4},
                                        "test_structured_outputs_and_their_old_names",
                                        {"structured_outputs": {"json_object": False}}),
    "structured_outputs.whitespace_pattern": H(
        {"structured_outputs": {"json_object": True, "whitespace_pattern": " ?"}, "max_tokens": 4},
        "test_structured_outputs_and_their_old_names",
        {"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}),
    "structured_outputs.disable_any_whitespace": H(
        {"structured_outputs": {"json_object": True, "disable_any_whitespace": True}, "max_tokens": 4},
        "test_structured_outputs_and_their_old_names",
        {"structured_outputs": {"regex": "a", "disable_any_whitespace": True}}),
    "structured_outputs.disable_additional_properties": R(
        {"structured_outputs": {"json_object": True, "disable_additional_properties": True}}),
    "structured_outputs.structural_tag": R({"structured_outputs": {"structural_tag": "{}"}}),
}
NESTED["stream_options.include_obfuscation"] = R({"stream": True, "stream_options": {"include_obfuscation": True}})
NESTED_MODELS = {"stream_options": (StreamOptions, vllm_fields.STREAM_OPTIONS),
                 "structured_outputs": (StructuredOutputs, vllm_fields.STRUCTURED_OUTPUTS)}


def openai_params(endpoint: str) -> set[str]:
    """The request parameters of the installed openai package (streaming and not)."""
    if endpoint == "chat":
        from openai.types.chat import completion_create_params as params
    elif endpoint == "responses":
        from openai.types.responses import response_create_params as params

        return set(typing.get_type_hints(params.ResponseCreateParamsBase)) | {"stream"}
    else:
        from openai.types import completion_create_params as params
    return set(typing.get_type_hints(params.CompletionCreateParamsBase)) | {"stream"}


def our_fields(model: type) -> set[str]:
    return {f.alias or name for name, f in model.model_fields.items()}


def has_test(name: str | None) -> bool:
    return name is not None and any(callable(getattr(m, name, None)) for m in TEST_MODULES)


CASES = [(ep, name) for ep, (_, table, _) in ENDPOINTS.items() for name in sorted(table)]


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_every_parameter_is_classified(endpoint: str) -> None:
    pytest.importorskip("openai")
    table = ENDPOINTS[endpoint][1]
    known = openai_params(endpoint) | VLLM[endpoint] | our_fields(MODELS[endpoint])
    missing = known - set(table)
    assert not missing, f"{endpoint}: decide each of {sorted(missing)} (honoured with a test, or refused)"
    unknown = set(table) - known
    assert not unknown, f"{endpoint}: {sorted(unknown)} are neither OpenAI's, vLLM's nor the server's fields"
    for name, d in table.items():
        assert d.honoured is not None or d.refused, f"{endpoint}.{name}: neither honoured nor refused"
        if d.honoured is not None:
            assert has_test(d.test), f"{endpoint}.{name}: honoured, but no test module has {d.test}"


def test_every_nested_vllm_field_is_classified() -> None:
    for obj, (model, theirs) in NESTED_MODELS.items():
        fields = theirs | our_fields(model)
        missing = {f"{obj}.{f}" for f in fields} - set(NESTED)
        assert not missing, f"decide each of {sorted(missing)} (honoured with a test, or refused)"
    for name, d in NESTED.items():
        assert d.honoured is not None or d.refused, name
        assert d.honoured is None or has_test(d.test), f"{name}: honoured, but no test module has {d.test}"


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("name", sorted(NESTED))
def test_nested_field_is_honoured_or_refused_naming_it(params_server: ServerProcess, endpoint: str,
                                                       name: str) -> None:
    path, _, base = ENDPOINTS[endpoint]
    check(params_server, path, base, name, NESTED[name])


@pytest.fixture(scope="module")
def params_server(tiny_bpe_artifact: Path) -> Iterator[ServerProcess]:
    # byte-level BPE: its vocabulary has every character JSON needs (structured output)
    s = ServerProcess(tiny_bpe_artifact, "--max-batch-size", "8", "--max-queue", "8")
    yield s
    s.stop()


@pytest.mark.parametrize(("endpoint", "name"), CASES)
def test_parameter_is_honoured_or_refused_naming_it(params_server: ServerProcess, endpoint: str, name: str) -> None:
    path, table, base = ENDPOINTS[endpoint]
    check(params_server, path, base, name, table[name])


def check(params_server: ServerProcess, path: str, base: dict, name: str, d: Decision) -> None:
    for extra in d.refused:
        body = {**base, **extra}
        r = httpx.post(params_server.url + path, json=body, timeout=60)
        assert r.status_code == d.status, (body, r.status_code, r.text)
        err = r.json()["error"]
        # a nested field is named by its path (response_format.json_schema.name)
        assert err["param"] == name or err["param"].startswith((name + ".", name + "[")), (body, err)
        assert err["message"], (body, err)
    if d.honoured is not None:
        body = {**base, **d.honoured}
        if name == "model":
            body["model"] = httpx.get(params_server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        r = httpx.post(params_server.url + path, json=body, timeout=60)
        assert r.status_code == 200, (body, r.status_code, r.text[:500])


# --- the 400 messages, without a server ---------------------------------------------------------
def parse_request(body: dict, endpoint: str) -> CompletionRequest | ChatCompletionRequest:
    """The request contract alone: the model validates the body (field rules and the rules between fields)."""
    return validate(ChatCompletionRequest if endpoint == "chat" else CompletionRequest, body)


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"prompt": "x", "temperature": 3}, "temperature", "temperature must be in [0, 2], got 3"),
    ({"prompt": "x", "top_p": 0}, "top_p", "top_p must be in (0, 1], got 0"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens", "max_tokens must be an integer, got 2.5"),
    ({"prompt": "x", "stream": "yes"}, "stream", 'stream must be a boolean, got "yes"'),
    ({"prompt": "x", "stop": ["a"] * 5}, "stop", "stop may hold at most 4 items, got 5"),
    ({"prompt": "x", "stop": 5}, "stop", "stop must be a string or a list of at most 4 strings"),
    ({"prompt": [1, "a"]}, "prompt", "prompt must be an integer"),
    ({"prompt": [[1], [-1]]}, "prompt", "prompt must be >= 0, got -1"),
    ({}, "prompt", "prompt is required"),
    ({"prompt": "x", "logit_bias": {"a": 1}}, "logit_bias", "logit_bias keys must be token ids"),
    ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias", "logit_bias must be in [-100, 100], got 101"),
    ({"prompt": "x", "best_of": 2}, "best_of", "best_of must equal n (1)"),
    ({"prompt": "x", "seed": 1 << 70}, "seed", "seed must be in"),
    ({"prompt": "x", "use_beam_search": True}, "use_beam_search", "beam search is not supported"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "0 only with echo"),
])
def test_completions_errors_name_the_field_and_the_value(body: dict, param: str, message: str) -> None:
    with pytest.raises(RequestError) as e:
        parse_request(body, "completions")
    assert e.value.param == param and message in e.value.message, (e.value.param, e.value.message)
    assert e.value.status == 400


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "messages[0].role must be"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content",
     "messages[0].content must be a string or a list of text parts"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content",
     "messages[0].content must be 'text'"),
    ({"messages": [{"role": "user", "content": "a\ud800"}]}, "messages[0].content", "not valid Unicode"),
    ({"messages": MESSAGES, "tools": [TOOL]}, "tools", "function calling is not supported"),
    ({"messages": MESSAGES, "audio": {"voice": "x"}}, "audio", "audio output is not supported"),
    ({"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    ({"messages": MESSAGES, "stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream"),
    ({"messages": MESSAGES, "response_format": {"type": "json_schema"}}, "response_format.json_schema",
     "response_format.json_schema is required"),
])
def test_chat_errors_name_the_field(body: dict, param: str, message: str) -> None:
    with pytest.raises(RequestError) as e:
        parse_request(body, "chat")
    assert e.value.param == param and message in e.value.message, (e.value.param, e.value.message)


def test_unknown_fields_are_ignored_and_tool_choice_none_is_served_without_tools() -> None:
    req = parse_request({"messages": MESSAGES, "tools": [TOOL], "tool_choice": "none", "x_unknown": {"a": 1}}, "chat")
    # the tools are not offered to the model (nextoken's default template, no bos_token given)
    assert render_chat(ChatTemplate(None, {}), req) == "User: hi\nAssistant:"
