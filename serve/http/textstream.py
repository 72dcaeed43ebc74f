"""Token ids -> text deltas, with stop strings that are never emitted and never split.

Byte-level BPE tokens can end in the middle of a UTF-8 character, so text is decoded over a
short window of recent ids and only released once it no longer ends in the replacement
character (the prefix/read-offset scheme vLLM and TGI use). Released text then passes a stop
filter that holds back any tail which could still become a stop string, so a stop string is
cut out whole even when its pieces arrive in different steps (or kept, with vLLM's
``include_stop_str_in_output``, and the text still ends right after it).

Special tokens (``<|endoftext|>`` generated with ``ignore_eos``) add no text unless the request
shows them (vLLM's ``skip_special_tokens: false``); shown, each is set apart from the text around it
by a space (``spaces_between_special_tokens``, as vLLM's detokenizer joins its pieces), and the
decode window restarts after it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer


@dataclass
class TextDelta:
    text: str  # new text for the client (may be empty)
    stopped: bool  # a stop string was found: the request is finished


CONTEXT_TOKENS = 5  # prompt tokens decoded before the first new one (vLLM's initial offset)


class TextStream:
    """``context``: the prompt's last tokens. A Metaspace tokenizer (Llama-2, Mistral) drops a word's leading
    space when the word starts the decoded text, so the first new token is decoded after them."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str], context: list[int] | None = None, *,
                 include: list[str] | None = None, special: dict[int, str] | None = None,
                 spaces: bool = True) -> None:
        """``include``: stop strings kept in the text; ``special``: id -> text of the special tokens to show."""
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.include = set(include or ())
        self.special = special or {}
        self.spaces = spaces
        # every token but the shown special ones, after the prompt's last few
        self.ids: list[int] = list(context[-CONTEXT_TOKENS:]) if context else []
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.pending = ""  # decoded text not yet released (a possible stop-string prefix)
        self.last: str | None = None  # the kind of the last piece of text: "text" or "special"

    def _decode_new(self) -> str:
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = self.tok.decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return self._piece(full[len(prefix):], "text")
        return ""

    def _piece(self, text: str, kind: str) -> str:
        """``text`` with the space that sets a shown special token apart from its neighbours."""
        apart = self.spaces and self.last is not None and "special" in (kind, self.last)
        self.last = kind
        return " " + text if apart else text

    def _show_special(self, token_id: int) -> str:
        """A shown special token's text, after whatever the window still held (even a broken character)."""
        held = ""
        if self.read_offset < len(self.ids):
            prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
            held = self.tok.decode(self.ids[self.prefix_offset:], skip_special_tokens=True)[len(prefix):]
        out = self._piece(held, "text") if held else ""
        self.prefix_offset = self.read_offset = len(self.ids)  # the next text decodes on its own
        return out + self._piece(self.special[token_id], "special")

    def push(self, token_id: int, check_stops: bool = True) -> TextDelta:
        """Add a token; ``check_stops=False`` releases its text unscanned (before ``min_tokens``)."""
        if token_id in self.special:
            self.pending += self._show_special(token_id)
        else:
            self.ids.append(token_id)
            self.pending += self._decode_new()
        if not check_stops:
            out, self.pending = self.pending, ""
            return TextDelta(out, False)
        return self._release(final=False)

    def finish(self) -> str:
        """Text held back at the end (a partial stop-string prefix that never completed)."""
        return self._release(final=True).text

    def _release(self, final: bool) -> TextDelta:
        if self.stop:
            hit = min(((self.pending.find(s), s) for s in self.stop if s in self.pending), default=None)
            if hit is not None:
                out = self.pending[: hit[0] + (len(hit[1]) if hit[1] in self.include else 0)]
                self.pending = ""
                return TextDelta(out, True)
        keep = 0 if final else self._held_back()
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return TextDelta(out, False)

    def _held_back(self) -> int:
        """Length of the longest tail of ``pending`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:n]):
                    best = n
                    break
        return best
