"""Hugging Face import: a GPT-2-layout folder (``GPT2LMHeadModel``, ours or anyone's) -> our GPT.

For ``nextoken train --init-from``: the folder fixes the architecture, the tokenizer and the
starting weights. Our checkpoint already uses GPT-2's parameter names; two things differ (field
notes, "Interop"):

* GPT-2's ``Conv1D`` stores ``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc`` and ``mlp.c_proj``
  weights as (in, out); our ``nn.Linear`` stores (out, in). Those four are transposed.
* our embedding table has ``padded_vocab_size`` rows (a friendlier matmul); the folder has
  ``vocab_size``, so the import pads the rows back (never looked up, never scored).

GPT-2's layout itself (``gpt2_shapes``, ``CONV1D_SUFFIXES``) is defined here, beside the model it
fills; the way out (``nextoken.export.hf``) writes the same layout. This module writes nothing
and knows nothing about exporting.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from nextoken.errors import UserError
from nextoken.train.config import GPTConfig
from nextoken.train.tokenizer import EOT

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt2_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """GPT2LMHeadModel's state dict (tied lm_head left out), name -> shape, in its Conv1D layout."""
    C, V, T = config.n_embd, config.vocab_size, config.block_size
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (T, C)}
    for i in range(config.n_layer):
        h = f"transformer.h.{i}."
        shapes.update({
            h + "ln_1.weight": (C,), h + "ln_1.bias": (C,),
            h + "attn.c_attn.weight": (C, 3 * C), h + "attn.c_attn.bias": (3 * C,),
            h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
            h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
            h + "mlp.c_fc.weight": (C, 4 * C), h + "mlp.c_fc.bias": (4 * C,),
            h + "mlp.c_proj.weight": (4 * C, C), h + "mlp.c_proj.bias": (C,),
        })
    shapes.update({"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)})
    return shapes


def from_hf_state_dict(hf: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's (or GPT2Model's, without the ``transformer.`` prefix) state dict -> our GPT's."""
    shapes = gpt2_shapes(config)
    state: dict[str, torch.Tensor] = {}
    for name, t in hf.items():
        key = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
        if key.endswith((".attn.bias", ".attn.masked_bias")) and key not in shapes:
            continue  # GPT-2's causal-mask buffers in old checkpoints, not weights
        if key == "lm_head.weight":
            wte = hf.get("transformer.wte.weight", hf.get("wte.weight"))
            if wte is not None and not torch.equal(t, wte):
                raise UserError("lm_head.weight differs from the embedding (an untied head); nextoken's GPT ties "
                                "them", flag="--init-from")
            continue
        if key not in shapes:
            raise UserError(f"{name} is not a GPT-2 weight", flag="--init-from")
        if tuple(t.shape) != shapes[key]:
            raise UserError(f"{name} has shape {tuple(t.shape)}; config.json implies {shapes[key]}", flag="--init-from")
        t = t.float()
        if key.endswith(CONV1D_SUFFIXES):
            t = t.t()  # Conv1D's (in, out) -> nn.Linear's (out, in)
        if key == "transformer.wte.weight" and config.padded_vocab_size > config.vocab_size:
            pad = torch.zeros(config.padded_vocab_size - config.vocab_size, config.n_embd)
            t = torch.cat([t, pad])  # rows never looked up or scored
        state[key] = t.contiguous()
    missing = [k for k in shapes if k not in state]
    if missing:
        raise UserError(f"the weights lack {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}",
                        flag="--init-from")
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


@dataclass
class HFModel:
    """A GPT-2-layout folder read into our terms."""

    config: GPTConfig
    state_dict: dict[str, torch.Tensor]  # our GPT's names and layout; lm_head tied to the embedding
    tokenizer: Tokenizer  # has <|endoftext|>
    path: Path


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg, flag="--init-from")


def config_from_hf(hf: dict[str, Any], where: Path) -> GPTConfig:
    """GPTConfig from a GPT-2 config.json; a GPT-2 option our GPT cannot express is refused by name."""
    _need(hf.get("model_type") == "gpt2", f"{where}/config.json has model_type {hf.get('model_type')!r}; only "
                                          f"GPT-2 (\"gpt2\") folders can be imported")
    n_embd = hf.get("n_embd", 768)
    checks = {
        "activation_function": (hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
                                "tanh GELU (gelu_new)"),
        "n_inner": (hf.get("n_inner") in (None, 4 * n_embd), f"4 * n_embd = {4 * n_embd}"),
        "layer_norm_epsilon": (abs(float(hf.get("layer_norm_epsilon", 1e-5)) - 1e-5) < 1e-12, "1e-05"),
        "scale_attn_weights": (hf.get("scale_attn_weights", True) is True, "true"),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False) is False, "false"),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True) is True, "true"),
        "add_cross_attention": (hf.get("add_cross_attention", False) is False, "false"),
    }
    for key, (ok, want) in checks.items():
        _need(ok, f"{where}/config.json sets {key} = {hf.get(key)!r}; nextoken's GPT needs {want}")
    try:
        return GPTConfig(vocab_size=int(hf["vocab_size"]), block_size=int(hf.get("n_positions", hf.get("n_ctx"))),
                         n_layer=int(hf["n_layer"]), n_head=int(hf["n_head"]), n_embd=int(n_embd),
                         dropout=float(hf.get("resid_pdrop", 0.0)), bias=True)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}/config.json is not a usable GPT-2 config: {e}", flag="--init-from") from None


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    single, index, legacy = folder / "model.safetensors", folder / "model.safetensors.index.json", \
        folder / "pytorch_model.bin"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(folder / shard))
        return state
    if legacy.is_file():
        # weights_only: a pickle from elsewhere must not run code
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise UserError(f"{folder} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin",
                    flag="--init-from")


def _read_tokenizer(folder: Path) -> Tokenizer:
    if (folder / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        # A slow-tokenizer GPT-2 folder: the same byte-level BPE, assembled as GPT-2 defines it.
        from tokenizers import decoders, models, pre_tokenizers

        tok = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        if tok.token_to_id(EOT) is not None:
            from tokenizers import AddedToken

            tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    else:
        raise UserError(f"{folder} has no tokenizer.json (nor vocab.json + merges.txt)", flag="--init-from")
    _need(tok.token_to_id(EOT) is not None, f"the tokenizer in {folder} has no {EOT} token, which nextoken uses "
                                             f"between documents and to end generation")
    return tok


def read_hf_config(folder: str | Path) -> GPTConfig:
    """Only the architecture of a GPT-2-layout folder (config.json), for settling a run's config."""
    folder = Path(folder)
    _need(folder.is_dir(), f"{folder} is not a folder")
    try:
        hf = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}/config.json cannot be read: {e}", flag="--init-from") from None
    return config_from_hf(hf, folder)


def load_hf_gpt2(folder: str | Path) -> HFModel:
    """Read a GPT-2-layout Hugging Face folder (ours or anyone's) as our GPT's config, weights and tokenizer."""
    folder = Path(folder)
    config = read_hf_config(folder)
    tok = _read_tokenizer(folder)
    _need(tok.get_vocab_size() <= config.vocab_size,
          f"the tokenizer has {tok.get_vocab_size()} tokens but config.json's vocab_size is {config.vocab_size}")
    state = from_hf_state_dict(_read_weights(folder), config)
    return HFModel(config, state, tok, folder)


def init_from_hf(folder: str | Path, *, dropout: float, block_size: int) -> HFModel:
    """``load_hf_gpt2`` for ``nextoken train --init-from``: the folder fixes the architecture.

    ``dropout`` is the run's training choice (GPT-2 folders record their own, not ours to keep);
    ``block_size`` is the run's training window, which must fit the folder's position table.
    """
    model = load_hf_gpt2(folder)
    if block_size > model.config.block_size:
        raise UserError(f"{block_size} exceeds the n_positions ({model.config.block_size}) of {folder}",
                        flag="--block-size")
    model.config = dataclasses.replace(model.config, dropout=dropout)
    return model
