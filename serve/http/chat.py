"""The chat template: how messages become the prompt text the model continues.

Every message becomes ``"{Role}: {content}\\n"`` (System, User, Assistant; developer is System) and
the prompt ends with ``"Assistant:"``; generation also stops at ``"\\nUser:"`` (``CHAT_STOP``) so the
model does not write the user's next turn. ``CHAT_TEMPLATE`` is the same template in Jinja, Hugging
Face's ``chat_template`` convention, for clients that render it themselves (lm-eval reads it from
``/tokenizer_info``).

This module knows nothing about tokenizers or routes.
"""

from __future__ import annotations

from typing import Any

from nextoken.export.artifact import CHAT_TEMPLATE  # noqa: F401  (defined once, with the artifacts that carry it)
from nextoken.serve.http.fields import ChatMessage

CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = "\nUser:"


def chat_prompt(messages: list[ChatMessage] | list[dict[str, Any]], *, add_generation_prompt: bool = True,
                continue_final_message: bool = False) -> str:
    """The prompt text for ``messages``; ``CHAT_TEMPLATE`` renders the same."""
    parts = []
    for m in messages:
        if isinstance(m, dict):
            m = ChatMessage.model_validate(m)
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        parts.append(f"{CHAT_ROLES[m.role]}: {content}\n")
    if continue_final_message:
        return "".join(parts)[:-1]
    return "".join(parts) + ("Assistant:" if add_generation_prompt else "")
