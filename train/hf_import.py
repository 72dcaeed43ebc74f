"""Hugging Face import: a model folder (GPT-2 or the llama family, ours or anyone's) -> our GPT.

For ``nextoken train --init-from`` and ``nextoken export HF_DIR``: the folder fixes the
architecture, the tokenizer and the weights. What is read, with safetensors and json only (no
transformers at run time):

* ``config.json``: ``model_type`` gpt2, llama, qwen2 or mistral, turned into a ``GPTConfig``;
  anything our model would compute differently (another activation, a sliding window shorter
  than the context, experts, another rope scaling, ...) is refused naming the field, before
  any weight is read, never approximated (``hf_config``).
* the weights: ``model.safetensors``, or shards listed by ``model.safetensors.index.json``, or
  ``pytorch_model.bin``; bf16 / f16 tensors are upcast to fp32 one at a time into preallocated
  tensors of ours (``hf_layout`` says where each goes), so a model is held once.
* the tokenizer as it comes (``tokenizer.json``; a GPT-2 folder may have ``vocab.json`` +
  ``merges.txt``) and what the tools around it need (``hf_tokens``: chat template, special tokens,
  generation defaults).

This module writes nothing and knows nothing about exporting.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from nextoken.errors import UserError
from nextoken.train.config import GPTConfig
from nextoken.train.hf_config import hf_config, read_config_json
from nextoken.train.hf_layout import CONV1D_SUFFIXES, gpt2_shapes, llama_names, our_shapes
from nextoken.train.hf_tokens import TokenizerFiles, read_tokenizer, tokenizer_files

__all__ = ["HFModel", "from_hf_state_dict", "gpt2_shapes", "hf_config", "init_from_hf", "load_hf",
           "read_hf_config"]


def from_hf_state_dict(hf: Mapping[str, torch.Tensor], config: GPTConfig, flag: str = "--init-from"
                       ) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's (or GPT2Model's, without the ``transformer.`` prefix) state dict -> our GPT's."""
    shapes = gpt2_shapes(config)
    state: dict[str, torch.Tensor] = {}
    for name in hf:
        key = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
        if key.endswith((".attn.bias", ".attn.masked_bias")) and key not in shapes:
            continue  # GPT-2's causal-mask buffers in old checkpoints, not weights
        t = hf[name]
        if key == "lm_head.weight":
            wte = hf.get("transformer.wte.weight", hf.get("wte.weight"))
            if wte is not None and not torch.equal(t, wte):
                raise UserError("lm_head.weight differs from the embedding (an untied head); a GPT-2 folder ties "
                                "them (tie_word_embeddings)", flag=flag)
            continue
        if key not in shapes:
            raise UserError(f"{name} is not a GPT-2 weight", flag=flag)
        if tuple(t.shape) != shapes[key]:
            raise UserError(f"{name} has shape {tuple(t.shape)}; config.json implies {shapes[key]}", flag=flag)
        t = t.float()
        if key.endswith(CONV1D_SUFFIXES):
            t = t.t()  # Conv1D's (in, out) -> nn.Linear's (out, in)
        if key == "transformer.wte.weight" and config.padded_vocab_size > config.vocab_size:
            pad = torch.zeros(config.padded_vocab_size - config.vocab_size, config.n_embd)
            t = torch.cat([t, pad])  # rows never looked up or scored
        state[key] = t.contiguous()
    _missing(shapes, state, flag)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def _missing(wanted: Mapping[str, Any], have: Mapping[str, Any], flag: str) -> None:
    missing = [k for k in wanted if k not in have]
    if missing:
        raise UserError(f"the weights lack {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}", flag=flag)


class Weights(Mapping[str, torch.Tensor]):
    """A folder's checkpoint by tensor name, each read (and upcast to fp32) only when asked for.

    ``model.safetensors``, the shards of ``model.safetensors.index.json``, or ``pytorch_model.bin``
    (loaded whole with ``weights_only``: a pickle from elsewhere must not run code).
    """

    def __init__(self, folder: Path, flag: str) -> None:
        from safetensors import safe_open

        single, index, legacy = (folder / "model.safetensors", folder / "model.safetensors.index.json",
                                 folder / "pytorch_model.bin")
        self._files: dict[str, Path] = {}  # tensor name -> the file that holds it
        self._loaded: dict[str, torch.Tensor] | None = None
        if single.is_file():
            with safe_open(str(single), "pt") as f:
                self._files = dict.fromkeys(f.keys(), single)
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise UserError(f"{index} is not a safetensors index: {e!r}", flag=flag) from None
            self._files = {name: folder / shard for name, shard in weight_map.items()}
            absent = sorted({p.name for p in self._files.values() if not p.is_file()})
            if absent:
                raise UserError(f"{folder} lacks the shard(s) {', '.join(absent)} its index lists", flag=flag)
        elif legacy.is_file():
            self._loaded = torch.load(legacy, map_location="cpu", weights_only=True)
        else:
            raise UserError(f"{folder} holds no model.safetensors, model.safetensors.index.json or "
                            "pytorch_model.bin", flag=flag)
        self._open: dict[Path, Any] = {}
        self._safe_open = safe_open

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._loaded is not None:
            return self._loaded[name].float()
        path = self._files[name]
        if path not in self._open:
            self._open[path] = self._safe_open(str(path), "pt")
        return self._open[path].get_tensor(name).float()  # bf16 / f16 -> fp32

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaded if self._loaded is not None else self._files)

    def __len__(self) -> int:
        return len(self._loaded if self._loaded is not None else self._files)


def from_llama_weights(weights: Mapping[str, torch.Tensor], config: GPTConfig, flag: str = "--init-from"
                       ) -> dict[str, torch.Tensor]:
    """A llama-family checkpoint (Hugging Face names) -> our GPT's state dict, fp32, one tensor in memory at a time."""
    names = llama_names(config)
    state = {name: torch.zeros(shape) for name, shape in our_shapes(config).items()}  # (padded rows stay zero)
    for name in weights:
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer older checkpoints saved: recomputed from rope_theta
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # a tied head saved anyway: the embedding is the head
        piece = names.get(name)
        if piece is None:
            raise UserError(f"{name} is not a {config.arch}-family weight our model has (config.json says "
                            f"{'no ' if not config.qkv_bias else ''}q/k/v bias, "
                            f"{'tied' if config.tie_embeddings else 'untied'} head)", flag=flag)
        t = weights[name]
        if tuple(t.shape) != piece.shape:
            raise UserError(f"{name} has shape {tuple(t.shape)}; config.json implies {piece.shape}", flag=flag)
        state[piece.ours][piece.start: piece.stop if piece.stop is not None else t.shape[0]] = t
    _missing(names, set(weights), flag)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


@dataclass
class HFModel:
    """A Hugging Face folder read into our terms."""

    config: GPTConfig
    state_dict: dict[str, torch.Tensor]  # our GPT's names and layout; lm_head tied to the embedding when tied
    tokenizer: Tokenizer
    path: Path
    model_type: str = "gpt2"  # gpt2, llama, qwen2 or mistral: what config.json said
    files: TokenizerFiles = field(default_factory=TokenizerFiles)  # chat template, special tokens, generation

    @property
    def eos_token_id(self) -> int:
        """The token that ends generation and separates documents when training on (the first of several)."""
        return self.files.eos_token_ids[0]


def read_hf_config(folder: str | Path, flag: str = "--init-from") -> GPTConfig:
    """Only the architecture of a Hugging Face folder (config.json), for settling a run's config."""
    return hf_config(read_config_json(Path(folder), flag), Path(folder), flag)


def load_hf(folder: str | Path, flag: str = "--init-from") -> HFModel:
    """Read a Hugging Face model folder (GPT-2 or the llama family) as our GPT's config, weights and tokenizer."""
    folder = Path(folder)
    raw = read_config_json(folder, flag)
    config = hf_config(raw, folder, flag)  # refusals come before any weight is read
    tok = read_tokenizer(folder, flag)
    if tok.get_vocab_size() > config.vocab_size:
        raise UserError(f"the tokenizer has {tok.get_vocab_size()} tokens but config.json's vocab_size is "
                        f"{config.vocab_size}", flag=flag)
    files = tokenizer_files(folder, raw, tok, flag)
    weights = Weights(folder, flag)
    if config.arch == "gpt2":
        state = from_hf_state_dict(weights, config, flag)
    else:
        state = from_llama_weights(weights, config, flag)
    return HFModel(config, state, tok, folder, raw["model_type"], files)


def load_hf_gpt2(folder: str | Path) -> HFModel:
    """``load_hf`` for a GPT-2 folder (the name the tests and older callers use)."""
    return load_hf(folder)


def init_from_hf(folder: str | Path, *, dropout: float, block_size: int) -> HFModel:
    """``load_hf`` for ``nextoken train --init-from``: the folder fixes the architecture.

    ``dropout`` is the run's training choice (folders record their own, not ours to keep);
    ``block_size`` is the run's training window, which must fit the folder's context.
    """
    model = load_hf(folder)
    if block_size > model.config.block_size:
        raise UserError(f"{block_size} exceeds the context of {folder} ({model.config.block_size}: config.json's "
                        f"n_positions / max_position_embeddings)", flag="--block-size")
    model.config = dataclasses.replace(model.config, dropout=dropout)
    return model
