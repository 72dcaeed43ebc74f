"""The request contract without a server: the models own every rule, and make the engine's settings.

The ranges here are the ones the engine's ``SamplingParams`` used to check a second time with other
bounds; now the request models are the only place they live, so each bad value must be refused here,
naming its field.
"""

from __future__ import annotations

import pytest

from nextoken.serve.http.errors import RequestError, validate
from nextoken.serve.http.requests import ChatCompletionRequest, CompletionRequest
from nextoken.serve.wire import SamplingParams, StructuredKind, StructuredSpec

MESSAGES = [{"role": "user", "content": "hi"}]


def params(**fields: object) -> SamplingParams:
    return validate(CompletionRequest, {"prompt": "x", **fields}).to_sampling_params(
        max_tokens=16, logprobs=None, seed=None)


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2),
    ("top_k", 2.5), ("min_p", 1.5), ("repetition_penalty", 0.0), ("presence_penalty", float("inf")),
    ("frequency_penalty", "0.1"), ("max_tokens", -1), ("max_tokens", 0), ("min_tokens", -1), ("stop", ["a"] * 5),
    ("stop", [""]), ("stop_token_ids", [-1]), ("seed", 1.5), ("logprobs", -1), ("prompt_logprobs", True),
    ("logit_bias", {"1": 101.0}), ("logit_bias", {"-1": 1.0}), ("logit_bias", [1]), ("ignore_eos", 1),
])
def test_a_bad_setting_is_refused_naming_its_field(field: str, value: object) -> None:
    with pytest.raises(RequestError) as e:
        params(**{field: value})
    assert e.value.param == field and e.value.status == 400, e.value.message


def test_settings_are_normalised_for_the_engine() -> None:
    assert params(top_k=-1).top_k == 0  # vLLM's spelling of off
    greedy = params(temperature=1e-300, top_k=5, top_p=0.5, min_p=0.2)
    assert greedy.greedy and (greedy.top_k, greedy.top_p, greedy.min_p) == (0, 1.0, 0.0)
    p = params(temperature=0.7, top_k=5, logit_bias={"3": -100}, stop="x", stop_token_ids=[7], seed=-3)
    assert (p.temperature, p.top_k, p.logit_bias, p.stop, p.stop_token_ids) == (0.7, 5, {3: -100.0}, ["x"], [7])
    chat = validate(ChatCompletionRequest, {"messages": MESSAGES, "stop": "END"})
    # the chat template's own stop strings (nextoken's default template: the user's next turn) come after the request's
    assert chat.to_sampling_params(max_tokens=None, logprobs=None, seed=None, extra_stop=["\nUser:"]).stop == [
        "END", "\nUser:"]


def test_the_models_generation_config_fills_only_what_a_request_omits() -> None:
    defaults = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1}
    req = validate(CompletionRequest, {"prompt": "x", "top_p": 0.5})
    p = req.to_sampling_params(max_tokens=16, logprobs=None, seed=None, defaults=defaults)
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty) == (0.6, 0.5, 20, 0.05, 1.1)
    greedy = validate(CompletionRequest, {"prompt": "x", "temperature": 0}).to_sampling_params(
        max_tokens=16, logprobs=None, seed=None, defaults=defaults)
    assert greedy.greedy and (greedy.top_k, greedy.top_p, greedy.min_p) == (0, 1.0, 0.0)
    assert greedy.repetition_penalty == 1.1  # a penalty changes the argmax: it still applies
    assert req.output_tokens(64) == 64  # generation_config.json's max_new_tokens
    assert validate(CompletionRequest, {"prompt": "x"}).output_tokens() == 16  # OpenAI's default without one
    chat = validate(ChatCompletionRequest, {"messages": MESSAGES, "max_tokens": 5})
    assert chat.output_tokens(64) == 5
    assert validate(ChatCompletionRequest, {"messages": MESSAGES}).output_tokens() is None  # the rest of the context


@pytest.mark.parametrize(("fields", "param"), [
    ({"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"bos_token": "x"}}, "chat_template_kwargs"),
    ({"chat_template": "{{ messages }}"}, "chat_template"),
])
def test_chat_rendering_rules(fields: dict, param: str) -> None:
    with pytest.raises(RequestError) as e:
        validate(ChatCompletionRequest, {"messages": MESSAGES, **fields})
    assert e.value.param == param and e.value.status == 400, e.value.message
    assert validate(ChatCompletionRequest, {"messages": MESSAGES, "chat_template_kwargs": {"enable_thinking": False},
                                            "continue_final_message": True}).generation_prompt is False


@pytest.mark.parametrize(("fields", "spec"), [
    ({}, None),
    ({"response_format": {"type": "text"}, "guided_json": None}, None),
    ({"response_format": {"type": "json_object"}}, StructuredSpec(StructuredKind.JSON_OBJECT, "response_format")),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}}}},
     StructuredSpec(StructuredKind.JSON_SCHEMA, "response_format", schema={"type": "object"})),
    ({"guided_choice": ["a"]}, StructuredSpec(StructuredKind.CHOICE, "guided_choice", choices=("a",))),
    ({"guided_regex": "a+"}, StructuredSpec(StructuredKind.REGEX, "guided_regex", regex="a+")),
    ({"guided_grammar": 'start: "a"'}, StructuredSpec(StructuredKind.GRAMMAR, "guided_grammar", grammar='start: "a"')),
    ({"guided_json": '{"type": "object"}', "guided_whitespace_pattern": " ?"},
     StructuredSpec(StructuredKind.JSON_SCHEMA, "guided_json", schema={"type": "object"}, whitespace=" ?")),
])
def test_the_structure_asked_for(fields: dict, spec: StructuredSpec | None) -> None:
    assert validate(ChatCompletionRequest, {"messages": MESSAGES, **fields}).structured == spec


@pytest.mark.parametrize(("fields", "param"), [
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"guided_json": {}, "guided_choice": ["a"]}, "guided_choice"),
    ({"guided_regex": "a+", "guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
    ({"guided_json": {}, "guided_whitespace_pattern": 3}, "guided_whitespace_pattern"),
    ({"guided_regex": "a", "ignore_eos": True}, "ignore_eos"),
])
def test_a_structure_that_cannot_be_asked_for_is_refused_naming_the_field(fields: dict, param: str) -> None:
    with pytest.raises(RequestError) as e:
        validate(ChatCompletionRequest, {"messages": MESSAGES, **fields})
    assert e.value.param == param, e.value.message


def test_tokenize_chat_cannot_end_twice() -> None:
    from nextoken.serve.http.requests import TokenizeChatRequest

    with pytest.raises(RequestError) as e:
        validate(TokenizeChatRequest, {"messages": MESSAGES, "continue_final_message": True,
                                       "add_generation_prompt": True})
    assert e.value.param == "continue_final_message"
