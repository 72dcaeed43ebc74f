"""A Hugging Face folder's tokenizer as it comes, and the files the tools around it read.

``read_tokenizer``: ``tokenizer.json`` in whatever form the tokenizers library loads it (byte-level
BPE as GPT-2 and SmolLM2, tiktoken-style regex BPE as Llama 3 and Qwen2, Metaspace + byte-fallback
BPE as Llama 2, TinyLlama and Mistral); a GPT-2 folder may instead have ``vocab.json`` + ``merges.txt``.

``tokenizer_files``: what a server and other tools need besides the vocabulary, normalised once
(``TokenizerFiles``), so that an export writes it and a run started ``--init-from`` the folder keeps it:

* ``tokenizer_config.json``: the folder's, with ``chat_template`` a string (the folder's default
  template, also when it came as ``chat_template.jinja`` / ``chat_template.json`` or a named list),
  ``bos_token`` / ``eos_token`` as strings (or null), and ``add_bos_token`` saying whether encoding
  starts with BOS (the folder's flag, else whether ``tokenizer.json``'s post-processor adds one);
* ``generation_config.json``: the folder's (``eos_token_id`` an int or a list, its sampling
  defaults), else the ids config.json names;
* ``eos_token_ids``: every id that ends generation, the first also what separates documents when
  training on.

Nothing here is guessed: a folder that names no end-of-sequence token is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from nextoken.errors import UserError
from nextoken.train.tokenizer import EOT

TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"


@dataclass
class TokenizerFiles:
    """The special tokens, chat template and generation defaults that come with a tokenizer."""

    tokenizer_config: dict[str, Any] = field(default_factory=dict)  # tokenizer_config.json, normalised
    generation_config: dict[str, Any] = field(default_factory=dict)  # generation_config.json
    eos_token_ids: list[int] = field(default_factory=list)  # every id that ends generation (first: documents)

    @property
    def chat_template(self) -> str | None:
        return self.tokenizer_config.get("chat_template")

    def save(self, folder: Path) -> None:
        """Write both files into ``folder`` (a run folder keeps its --init-from folder's)."""
        from nextoken.fileio import atomic_write_text

        for name, obj in ((TOKENIZER_CONFIG, self.tokenizer_config), (GENERATION_CONFIG, self.generation_config)):
            atomic_write_text(folder / name, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, folder: Path) -> TokenizerFiles | None:
        """The files ``save`` wrote, or None when the folder has none (a run with our own tokenizer)."""
        if not (folder / TOKENIZER_CONFIG).is_file():
            return None
        tc = _json(folder / TOKENIZER_CONFIG) or {}
        gen = _json(folder / GENERATION_CONFIG) or {}
        return cls(tc, gen, _ids(gen.get("eos_token_id")))


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _token(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with its content."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_tokenizer(folder: Path, flag: str = "--init-from") -> Tokenizer:
    if (folder / "tokenizer.json").is_file():
        try:
            return Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the library's own message says what it could not parse
            raise UserError(f"{folder}/tokenizer.json cannot be loaded by the tokenizers library: {e}",
                            flag=flag) from None
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        # A slow-tokenizer GPT-2 folder: the same byte-level BPE, assembled as GPT-2 defines it.
        from tokenizers import AddedToken, decoders, models, pre_tokenizers

        tok = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        if tok.token_to_id(EOT) is not None:
            tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
        return tok
    extra = " (tokenizer.model, a sentencepiece file, is not read: convert it with transformers' " \
            "AutoTokenizer.from_pretrained(...).save_pretrained(...))" if (folder / "tokenizer.model").is_file() else ""
    raise UserError(f"{folder} has no tokenizer.json (nor vocab.json + merges.txt){extra}", flag=flag)


def post_processor_bos(tok: Tokenizer) -> str | None:
    """The special token ``tokenizer.json``'s post-processor puts before every text, if any (Llama's <s>)."""
    def first_special(proc: dict[str, Any] | None) -> str | None:
        if not proc:
            return None
        if proc.get("type") == "Sequence":
            found = [first_special(p) for p in proc.get("processors", [])]
            return next((f for f in found if f), None)
        if proc.get("type") == "TemplateProcessing" and proc.get("single"):
            head = proc["single"][0]
            return head["SpecialToken"]["id"] if "SpecialToken" in head else None
        return None

    return first_special(json.loads(tok.to_str()).get("post_processor"))


def chat_template(folder: Path, tc: dict[str, Any]) -> str | None:
    """The folder's default chat template: tokenizer_config.json's, chat_template.jinja or chat_template.json."""
    template = tc.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None:
        template = (_json(folder / "chat_template.json") or {}).get("chat_template")
    return template if isinstance(template, str) else None


def tokenizer_files(folder: Path, config: dict[str, Any], tok: Tokenizer, flag: str = "--init-from"
                    ) -> TokenizerFiles:
    """The folder's tokenizer_config.json / generation_config.json normalised (module docstring)."""
    tc = dict(_json(folder / TOKENIZER_CONFIG) or {})
    gen = dict(_json(folder / GENERATION_CONFIG) or {})
    eos_ids = _ids(gen.get("eos_token_id")) or _ids(config.get("eos_token_id"))
    eos_token = _token(tc.get("eos_token"))
    if not eos_ids and eos_token is not None and tok.token_to_id(eos_token) is not None:
        eos_ids = [tok.token_to_id(eos_token)]
    if not eos_ids and tok.token_to_id(EOT) is not None:  # a GPT-2 folder that names nothing: GPT-2's convention
        eos_ids = [tok.token_to_id(EOT)]
    if not eos_ids:
        raise UserError(f"{folder} names no end-of-sequence token (eos_token_id in config.json or "
                        f"generation_config.json, eos_token in tokenizer_config.json)", flag=flag)
    bad = [i for i in eos_ids if tok.id_to_token(i) is None]
    if bad:
        raise UserError(f"{folder}: eos_token_id {bad} is not in the tokenizer's vocabulary", flag=flag)
    if eos_token is None or tok.token_to_id(eos_token) is None:
        eos_token = tok.id_to_token(eos_ids[0])
    if "bos_token" in tc:
        bos_token = _token(tc["bos_token"])
    else:
        bos_id = gen.get("bos_token_id", config.get("bos_token_id"))
        bos_token = tok.id_to_token(int(bos_id)) if isinstance(bos_id, int) else None
    processor_bos = post_processor_bos(tok)
    add_bos = tc["add_bos_token"] if isinstance(tc.get("add_bos_token"), bool) else processor_bos is not None
    if add_bos and bos_token is None:
        bos_token = processor_bos
    template = chat_template(folder, tc)
    tc.pop("chat_template", None)
    for key in ("pad_token", "unk_token"):
        if isinstance(tc.get(key), dict):
            tc[key] = _token(tc[key])
    tc.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    tc.setdefault("model_max_length", int(config.get("max_position_embeddings", config.get("n_positions", 1024))))
    tc.update(bos_token=bos_token, eos_token=eos_token, add_bos_token=add_bos)
    if template is not None:
        tc["chat_template"] = template
    if not gen:  # what transformers itself derives from config.json
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
        gen.setdefault("eos_token_id", eos_ids if len(eos_ids) > 1 else eos_ids[0])
    return TokenizerFiles(tc, gen, eos_ids)
