"""Hugging Face's layouts of our model, both ways: names and shapes, no files (``hf_import`` reads them).

GPT-2 (``GPT2LMHeadModel``): our checkpoint already uses its parameter names; two things differ
(field notes, "Interop"):

* GPT-2's ``Conv1D`` stores ``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc`` and ``mlp.c_proj``
  weights as (in, out); our ``nn.Linear`` stores (out, in). Those four are transposed.
* our embedding table has ``padded_vocab_size`` rows (a friendlier matmul); the folder has
  ``vocab_size``, so rows are padded on the way in and sliced off on the way out.

The llama family (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM``): the same
(out, in) layout as ours, other names, and two of our matrices packed from three and two of theirs::

    model.embed_tokens.weight                     transformer.wte.weight (rows padded)
    model.layers.{i}.input_layernorm.weight       transformer.h.{i}.ln_1.weight
    model.layers.{i}.self_attn.{q,k,v}_proj.*     transformer.h.{i}.attn.c_attn.* rows q | k | v
    model.layers.{i}.self_attn.o_proj.weight      transformer.h.{i}.attn.c_proj.weight
    model.layers.{i}.post_attention_layernorm.*   transformer.h.{i}.ln_2.weight
    model.layers.{i}.mlp.{gate,up}_proj.weight    transformer.h.{i}.mlp.c_fc.weight rows gate | up
    model.layers.{i}.mlp.down_proj.weight         transformer.h.{i}.mlp.c_proj.weight
    model.norm.weight                             transformer.ln_f.weight
    lm_head.weight                                lm_head.weight (absent when tied)

``llama_names`` lists each of their tensors with the rows of ours it fills, so a loader can copy
one tensor at a time into preallocated fp32 tensors (a 135M model never exists twice) and the
exporter can cut ours the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from nextoken.train.config import GPTConfig

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Hugging Face's llama-family classes by model_type (the config.json fields are the same; Qwen2 has
# q/k/v biases, Mistral a sliding window: refused unless it spans the context)
LLAMA_FAMILY = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def gpt2_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """GPT2LMHeadModel's state dict (tied lm_head left out), name -> shape, in its Conv1D layout."""
    C, V, T, inner = config.n_embd, config.vocab_size, config.block_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (T, C)}
    for i in range(config.n_layer):
        h = f"transformer.h.{i}."
        shapes.update({
            h + "ln_1.weight": (C,), h + "ln_1.bias": (C,),
            h + "attn.c_attn.weight": (C, 3 * C), h + "attn.c_attn.bias": (3 * C,),
            h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
            h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
            h + "mlp.c_fc.weight": (C, inner), h + "mlp.c_fc.bias": (inner,),
            h + "mlp.c_proj.weight": (inner, C), h + "mlp.c_proj.bias": (C,),
        })
    shapes.update({"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)})
    return shapes


@dataclass(frozen=True)
class Piece:
    """One Hugging Face tensor: the rows [start, stop) of one of ours (its whole first axis when stop is None)."""

    ours: str
    shape: tuple[int, ...]  # the Hugging Face tensor's shape
    start: int = 0
    stop: int | None = None


def llama_names(config: GPTConfig) -> dict[str, Piece]:
    """Every tensor of the llama-family checkpoint for ``config``, Hugging Face name -> where it goes in ours."""
    C, V, hs, inner = config.n_embd, config.vocab_size, config.head_dim, config.intermediate_size
    q, kv = config.n_head * hs, config.n_kv_head * hs
    names = {"model.embed_tokens.weight": Piece("transformer.wte.weight", (V, C), 0, V)}
    for i in range(config.n_layer):
        hf, us = f"model.layers.{i}.", f"transformer.h.{i}."
        names.update({
            hf + "input_layernorm.weight": Piece(us + "ln_1.weight", (C,)),
            hf + "self_attn.q_proj.weight": Piece(us + "attn.c_attn.weight", (q, C), 0, q),
            hf + "self_attn.k_proj.weight": Piece(us + "attn.c_attn.weight", (kv, C), q, q + kv),
            hf + "self_attn.v_proj.weight": Piece(us + "attn.c_attn.weight", (kv, C), q + kv, q + 2 * kv),
            hf + "self_attn.o_proj.weight": Piece(us + "attn.c_proj.weight", (C, q)),
            hf + "post_attention_layernorm.weight": Piece(us + "ln_2.weight", (C,)),
            hf + "mlp.gate_proj.weight": Piece(us + "mlp.c_fc.weight", (inner, C), 0, inner),
            hf + "mlp.up_proj.weight": Piece(us + "mlp.c_fc.weight", (inner, C), inner, 2 * inner),
            hf + "mlp.down_proj.weight": Piece(us + "mlp.c_proj.weight", (C, inner)),
        })
        if config.qkv_bias:
            names.update({
                hf + "self_attn.q_proj.bias": Piece(us + "attn.c_attn.bias", (q,), 0, q),
                hf + "self_attn.k_proj.bias": Piece(us + "attn.c_attn.bias", (kv,), q, q + kv),
                hf + "self_attn.v_proj.bias": Piece(us + "attn.c_attn.bias", (kv,), q + kv, q + 2 * kv),
            })
    names["model.norm.weight"] = Piece("transformer.ln_f.weight", (C,))
    if not config.tie_embeddings:
        names["lm_head.weight"] = Piece("lm_head.weight", (V, C), 0, V)
    return names


def our_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Our GPT's tensors that a llama-family checkpoint fills, name -> shape (padded vocabulary rows included)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for piece in llama_names(config).values():
        rows = config.padded_vocab_size if piece.ours in ("transformer.wte.weight", "lm_head.weight") else None
        if piece.stop is None:
            shapes[piece.ours] = piece.shape
        else:
            have = shapes.get(piece.ours, (0, *piece.shape[1:]))
            shapes[piece.ours] = (rows or max(have[0], piece.stop), *piece.shape[1:])
    return shapes


def to_llama_tensors(state: dict[str, torch.Tensor], config: GPTConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Our GPT's state dict -> the llama-family checkpoint's tensors, one at a time (views; fp32 as stored)."""
    for name, piece in llama_names(config).items():
        t = state[piece.ours].detach()
        if piece.stop is not None:
            t = t[piece.start: piece.stop]
        if tuple(t.shape) != piece.shape:
            raise ValueError(f"{piece.ours} gives {name} the shape {tuple(t.shape)}, expected {piece.shape}")
        yield name, t
