"""Chat templates: how a conversation becomes the prompt text the model continues.

A model's ``chat_template`` (its tokenizer_config.json's, or ``--chat-template FILE``) is rendered as
transformers' ``apply_chat_template`` renders it: Jinja2 in an immutable sandbox with
``trim_blocks``/``lstrip_blocks`` and loop controls, ``messages``, ``add_generation_prompt``, the
special tokens (``bos_token``, ``eos_token``...), ``raise_exception`` and ``strftime_now``, and a
``tojson`` that does not escape HTML. The rendered text already holds the special tokens the template
writes (a BOS, turn markers), so it is tokenized without adding more, as vLLM does. A model without
a template gets nextoken's documented one (``export.artifact.DEFAULT_CHAT_TEMPLATE``), whose replies
also stop at ``"\\nUser:"``. ``Conversation`` is the request side: the messages and the fields that
steer rendering, shared by every route that renders a chat.

This module knows nothing about tokenizers' internals, routes or the engine.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import Field, StrictBool, StrictStr, model_validator

from nextoken.export.artifact import DEFAULT_CHAT_STOP, DEFAULT_CHAT_TEMPLATE
from nextoken.serve.http.errors import broken_rule, refused
from nextoken.serve.http.fields import MAX_MESSAGES, ChatMessage, _Open

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
# what a chat template reads from the server, never from a request's chat_template_kwargs
RESERVED_TEMPLATE_VARIABLES = frozenset({"messages", "add_generation_prompt", "continue_final_message", "bos_token",
                                         "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                                         "mask_token", "raise_exception", "strftime_now"})


class ChatTemplateError(ValueError):
    """The template refused the conversation (its ``raise_exception``), or could not render it."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_template(source: str) -> jinja2.Template:
    """A template compiled in the sandbox transformers uses; a syntax error raises ChatTemplateError."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e}") from None


def load_chat_template(value: str) -> str:
    """``--chat-template``: a file's text, or, as vLLM takes it, the template itself; either must compile."""
    path = Path(value)
    looks_inline = any(c in value for c in "{}\n")
    if not looks_inline:
        try:
            value = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ChatTemplateError(f"--chat-template {path}: cannot read it ({e.strerror or e})") from None
    try:
        compile_template(value)
    except ChatTemplateError as e:
        raise ChatTemplateError(f"--chat-template: {e}") from None
    return value


class ChatTemplate:
    """One model's chat template, compiled once, with the special tokens it is rendered with."""

    def __init__(self, source: str | None, special_tokens: dict[str, str | None]) -> None:
        self.source = source if source else DEFAULT_CHAT_TEMPLATE
        self.is_default = not source or source == DEFAULT_CHAT_TEMPLATE
        self.template = compile_template(self.source)
        # only the ones the tokenizer has, as transformers passes them (a template tests `bos_token is defined`)
        self.special_tokens = {k: v for k, v in special_tokens.items() if k in SPECIAL_TOKENS and v is not None}
        # nextoken's template has no end-of-turn token: a reply ends where the user's next turn would start
        self.stop = [DEFAULT_CHAT_STOP] if self.is_default else []

    def render(self, messages: Sequence[ChatMessage | dict[str, Any]], *, add_generation_prompt: bool = True,
               continue_final_message: bool = False, extra: Mapping[str, Any] | None = None) -> str:
        """The prompt text; ``continue_final_message`` ends inside the last message (no end of turn after it);
        ``extra``: more template variables (a request's chat_template_kwargs, e.g. enable_thinking)."""
        chat = [_as_dict(m) for m in messages]
        try:
            text = self.template.render({**(extra or {}), "messages": chat, "tools": None, "documents": None,
                                         "add_generation_prompt": add_generation_prompt and not continue_final_message,
                                         **self.special_tokens})
        except Exception as e:  # noqa: BLE001 (a template is code: whatever it raises, it refused this chat)
            raise ChatTemplateError(f"the chat template refused the conversation: {e}") from None
        return _cut_after_final(text, chat[-1]["content"]) if continue_final_message else text


def _cut_after_final(text: str, final: str) -> str:
    """The rendered chat up to the end of the final message's content, as transformers cuts it: where the
    template trimmed the content (Llama-3's ``| trim``), up to its stripped end."""
    at = text.rfind(final.strip())
    if at < 0 or not final.strip():
        raise ChatTemplateError("continue_final_message: the chat template does not write the final message's "
                                "content as given")
    keep = len(final.lstrip()) if text[at:at + len(final.lstrip())] == final.lstrip() else len(final.strip())
    return text[:at + keep]


def _as_dict(m: ChatMessage | dict[str, Any]) -> dict[str, Any]:
    """A message as templates read it: role and content as text (OpenAI's text parts joined)."""
    if isinstance(m, dict):
        m = ChatMessage.model_validate(m)
    content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
    out: dict[str, Any] = {"role": m.role, "content": content}
    if m.name is not None:
        out["name"] = m.name
    return out


# --- the request side: messages and the knobs that steer rendering ------------------------------
class Conversation(_Open):
    """Messages and how the chat template renders them: shared by /v1/chat/completions and /tokenize."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] = Field(
        description="Rendered with the model's chat template (its tokenizer_config.json's, or the server's "
                    "--chat-template). A model without one: \"{Role}: {content}\\n\" per message (System, User, "
                    "Assistant; developer = System), then \"Assistant:\", and generation also stops at \"\\nUser:\".")
    add_generation_prompt: StrictBool | None = Field(
        default=None, description="vLLM extension: end the prompt with the template's assistant header (default "
                                  "true).")
    continue_final_message: StrictBool | None = Field(
        default=None, description="vLLM extension: the model continues the final message (an assistant prefix) "
                                  "instead of starting a new one; not with add_generation_prompt: true.")
    chat_template_kwargs: dict[Annotated[StrictStr, Field(max_length=64)], Any] | None = Field(
        default=None, description="vLLM extension: extra variables for the chat template (e.g. enable_thinking); "
                                  "they cannot replace messages, add_generation_prompt or the special tokens.")
    chat_template: None = Field(default=None, description=refused("chat_template") + " Start the server with "
                                                           "--chat-template FILE instead.")

    @model_validator(mode="after")
    def _rendering_rules(self) -> Conversation:
        if self.continue_final_message and self.add_generation_prompt:
            raise broken_rule("continue_final_message and add_generation_prompt cannot both be true",
                              "continue_final_message")
        reserved = sorted(set(self.chat_template_kwargs or ()) & RESERVED_TEMPLATE_VARIABLES)
        if reserved:
            raise broken_rule(f"chat_template_kwargs cannot set {', '.join(reserved)}", "chat_template_kwargs")
        return self

    @property
    def generation_prompt(self) -> bool:
        return self.add_generation_prompt is not False and not self.continue_final_message
