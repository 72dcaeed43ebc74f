"""The HTTP side's view of one model version: its tokenizer, chat template, limits and sampling defaults.

Made from the engine's ``ModelStatus`` (the artifact folder it names holds the tokenizer files), once
per version this HTTP process serves; planning tokenizes and renders chats with it, and it turns token
ids into the ``LogprobEntry``s responses carry. It knows nothing about routes or the engine's internals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nextoken.fileio import read_json_object
from nextoken.serve.http.builder import Candidate, LogprobEntry
from nextoken.serve.http.chat import SPECIAL_TOKENS, ChatTemplate
from nextoken.serve.tokens import ModelTokenizer, TokenBytes
from nextoken.serve.wire import ModelStatus

# generation_config.json's sampling keys -> the request field each one is the default of (vLLM's set)
GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                       "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def sampling_defaults(generation_config: dict[str, Any]) -> dict[str, int | float]:
    """The request defaults a model's generation_config.json recommends (its creator's settings), as vLLM
    applies them: only the keys it sets, by the request field's name."""
    out: dict[str, int | float] = {}
    for key, field in GENERATION_DEFAULTS.items():
        v = generation_config.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool):
            out[field] = v
    return out


def chat_template_source(folder: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The model's own template: ``chat_template.jinja`` (where recent transformers save it), else
    tokenizer_config.json's ``chat_template`` (a string, or named templates of which "default" is used)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    t = tokenizer_config.get("chat_template")
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default")
    return t if isinstance(t, str) and t else None


class ServedModel:
    """The HTTP side's view of one model version: what planning and the tokenizer routes need.

    ``chat_template``: the server's ``--chat-template`` (it wins over the model's own);
    ``generation_defaults``: False ignores generation_config.json (``--generation-config vllm``).
    """

    def __init__(self, status: ModelStatus, chat_template: str | None = None, generation_defaults: bool = True
                 ) -> None:
        self.status = status
        self.path = status.path
        self.id = status.id
        self.name = status.name
        self.version = status.version
        self.context = status.max_model_len  # the longest sequence this server caches
        self.model_context = status.context
        folder = Path(status.path)
        config = read_json_object(folder / "config.json") or {}
        generation = read_json_object(folder / "generation_config.json") or {}
        self.tokens = ModelTokenizer.from_folder(folder, config, generation)
        self.tokenizer = self.tokens.tokenizer
        self.eos_ids = self.tokens.eos_ids
        self.eos_id = self.tokens.eos_id
        self.created = int((folder / "config.json").stat().st_mtime)
        self._vocab_size = self.tokenizer.get_vocab_size()
        # id -> text of each special token (<|endoftext|>...), shown only with skip_special_tokens: false
        self.special_texts = {i: t.content for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        self.token_bytes = TokenBytes(self.tokenizer)
        self._token_text: dict[int, str] = {}
        self._pieces: dict[int, tuple[str, list[int]]] = {}  # id -> (text, bytes), for logprob entries
        self._tokenizer_config = dict(self.tokens.tokenizer_config)
        if not self._tokenizer_config.get("unk_token") and self.tokenizer.token_to_id("<unk>") is not None:
            self._tokenizer_config["unk_token"] = "<unk>"
        specials = {k: self.tokens.special_token_text(k) for k in SPECIAL_TOKENS}
        if specials.get("eos_token") is None:
            specials["eos_token"] = self.token_text(self.eos_id)
        if specials.get("bos_token") is None and self.tokens.prefix_id is not None:
            specials["bos_token"] = self.token_text(self.tokens.prefix_id)  # a nextoken model's document start
        own = chat_template_source(folder, self._tokenizer_config)
        self.chat = ChatTemplate(chat_template or own, specials)
        # nextoken's exports write its default template into tokenizer_config.json (for other tools): still ours
        self.chat_template_origin = ("--chat-template" if chat_template else "nextoken default"
                                     if self.chat.is_default else "model")
        self.sampling_defaults = sampling_defaults(generation) if generation_defaults else {}

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        """The text's own tokens (no special tokens added)."""
        return self.tokens.encode(text)

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokens.encode_prompt(text, add_special_tokens)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        t = self._token_text.get(token_id)
        if t is None:
            t = self._token_text[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return t

    def _piece(self, token_id: int) -> tuple[str, list[int]]:
        p = self._pieces.get(token_id)
        if p is None:
            p = self._pieces[token_id] = (self.token_text(token_id), list(self.token_bytes(token_id)))
        return p

    def logprob_entry(self, token_id: int, logprob: float, top_ids: Any, top_lps: Any) -> LogprobEntry:
        """A token with its log-probability and the alternatives the engine sent (ids (N,), logprobs (N,))."""
        top = []
        if top_ids is not None:
            for i, lp in zip(top_ids.tolist(), top_lps.tolist(), strict=True):
                text, raw = self._piece(i)
                top.append(Candidate(text, i, lp, raw))
        text, raw = self._piece(token_id)
        return LogprobEntry(text, token_id, logprob, raw, top)

    def tokenizer_config(self) -> dict[str, Any]:
        return dict(self._tokenizer_config)
