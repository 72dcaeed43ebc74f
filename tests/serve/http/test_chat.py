"""Chat templates (serve/http/chat.py) render exactly what transformers' ``apply_chat_template`` renders.

The same template, the same messages, the same special tokens: the text must be equal character for
character, and the tokens the server feeds equal the ones ``apply_chat_template(tokenize=True)`` makes,
for ChatML (Qwen2), Llama-3 and Mistral-style templates over their own tokenizer styles.
"""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from nextoken.export.artifact import DEFAULT_CHAT_TEMPLATE
from nextoken.serve.http.chat import ChatTemplate, ChatTemplateError, load_chat_template
from nextoken.serve.tokens import ModelTokenizer
from tests.chat_templates import STYLE_OF, TEMPLATES
from tests.tokenizer_styles import STYLES

SYSTEM = {"role": "system", "content": "You are terse.  "}
CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "Hello there"}],
    "system and user": [SYSTEM, {"role": "user", "content": "What is 2+2?"}],
    "several turns": [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Tell me about the fox, naïvely: € 😀"}],
}
DATE = {"date_string": "26 Jul 2024"}  # Llama-3's template dates its system turn: fixed so both sides agree


def family(name: str) -> tuple[ChatTemplate, PreTrainedTokenizerFast, ModelTokenizer]:
    tok, specials = STYLES[STYLE_OF[name]]()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=TEMPLATES[name], **specials)
    eos = tok.token_to_id(specials["eos_token"])
    return ChatTemplate(TEMPLATES[name], specials), hf, ModelTokenizer(tok, (eos,), None, specials)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_the_prompt_is_what_transformers_renders(name: str, conversation: str, generation_prompt: bool) -> None:
    ours, hf, tokens = family(name)
    messages = CONVERSATIONS[conversation]
    text = ours.render(messages, add_generation_prompt=generation_prompt, extra=DATE)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **DATE)
    assert tokens.encode_prompt(text, add_special_tokens=False) == hf.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=generation_prompt, **DATE)


@pytest.mark.parametrize("name", ["chatml", "llama3"])
@pytest.mark.parametrize("prefix", ["The colour is", "The colour is "])  # Llama-3's template trims the space
def test_continue_final_message_ends_inside_the_assistants_turn(name: str, prefix: str) -> None:
    ours, hf, _ = family(name)
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": prefix}]
    text = ours.render(messages, continue_final_message=True, extra=DATE)
    assert text.endswith(prefix if name == "chatml" else prefix.strip())
    assert text == hf.apply_chat_template(messages, tokenize=False, continue_final_message=True, **DATE)


def test_a_template_that_refuses_the_conversation_says_why() -> None:
    ours, _, _ = family("mistral")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        ours.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ChatTemplateError, match="refused"):  # a template is code: any failure is a refusal
        ChatTemplate("{{ messages[0]['content'] + 1 }}", {}).render([{"role": "user", "content": "a"}])


def test_the_sandbox_keeps_templates_from_changing_anything() -> None:
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{% set _ = messages.append(1) %}", {}).render([{"role": "user", "content": "a"}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}", {})


def test_the_helpers_transformers_gives_templates() -> None:
    t = ChatTemplate("{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|{% for m in messages %}"
                     "{% if loop.first %}{% continue %}{% endif %}{{ m.content }}{% endfor %}", {})
    text = t.render([{"role": "user", "content": "<b>a</b> é"}, {"role": "user", "content": "x"}])
    # tojson keeps non-ASCII and markup as they are (transformers' own filter), unlike Jinja's escaping one
    assert text == '[{"role": "user", "content": "<b>a</b> é"}, {"role": "user", "content": "x"}]|4|x'


def test_nextokens_own_template_renders_the_same_in_transformers() -> None:
    tok, _ = STYLES["byte_bpe"]()
    specials = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    ours = ChatTemplate(None, specials)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=DEFAULT_CHAT_TEMPLATE, **specials)
    messages = [{"role": "developer", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    text = ours.render(messages)
    assert text == "<|endoftext|>System: Be kind.\nUser: Hi\nAssistant:"
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.stop == ["\nUser:"] and ChatTemplate(TEMPLATES["chatml"], specials).stop == []
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "you"}]}]
    assert ours.render(parts) == "<|endoftext|>User: Hi you\nAssistant:"


def test_chat_template_flag_takes_a_file_or_the_template_itself(tmp_path) -> None:
    f = tmp_path / "t.jinja"
    f.write_text(TEMPLATES["chatml"], encoding="utf-8")
    assert load_chat_template(str(f)) == TEMPLATES["chatml"]
    assert load_chat_template(TEMPLATES["mistral"]) == TEMPLATES["mistral"]
    with pytest.raises(ChatTemplateError, match="--chat-template .*missing.jinja: cannot read it"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ChatTemplateError, match="--chat-template: the chat template does not compile"):
        load_chat_template("{% if %}")
