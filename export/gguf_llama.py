"""GGUF for the llama family (llama.cpp's ``llama`` architecture), and the tokenizer metadata of each style.

What llama.cpp's ``convert_hf_to_gguf.py`` would write for the folder, made from our model:

* tensors ``token_embd``, per block ``attn_norm``, ``attn_q``, ``attn_k``, ``attn_v`` (and their
  biases for Qwen2's q/k/v bias, which llama.cpp's llama graph adds when present),
  ``attn_output``, ``ffn_norm``, ``ffn_gate``, ``ffn_up``, ``ffn_down``, ``output_norm``, and
  ``output`` for an untied head. Our (out, in) matrices are ggml's {in, out} as they are; q and k
  rows are permuted per head (``permute_rope``): llama.cpp's llama graph rotates adjacent channel
  pairs (2i, 2i+1) where Hugging Face (and we) rotate (i, i + head_dim/2).
* rotary: ``rope.freq_base`` (rope_theta), linear scaling as ``rope.scaling.type`` / ``factor``,
  llama3 scaling as the ``rope_freqs`` tensor (each frequency's divisor, as the converter writes it).
* the tokenizer (``vocab_metadata``), by style:
    - byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen2): ``tokenizer.ggml.model = "gpt2"``, the merges,
      and the pre-tokenizer named by llama.cpp (``PRE_TOKENIZERS``: GPT-2's regex, SmolLM's digits
      split, Llama 3's and Qwen2's regexes); any other pre-tokenizer is refused by name;
    - Metaspace + byte-fallback BPE (Llama 2, TinyLlama, Mistral): ``"llama"`` (sentencepiece), the
      pieces with ``▁`` as they are, ``<0xXX>`` pieces as BYTE tokens, scores ranking each merged
      piece by its merge (llama.cpp merges the best-scored piece first, as BPE applies merges in
      order), ``add_space_prefix`` when the tokenizer prepends ``▁``.
  Special tokens (bos, eos, unk, pad), ``add_bos_token`` and the chat template come from the
  tokenizer files the export carries.

This module ignores files and verification (``gguf.py``).
"""

from __future__ import annotations

import json
import re
from typing import Any

import gguf
import numpy as np
import torch

from nextoken.errors import UserError
from nextoken.train.attention import rope_frequencies
from nextoken.train.config import GPTConfig

# A byte-level BPE's pre-tokenizer (tokenizer.json) -> the name llama.cpp gives the same splitting.
GPT2_REGEX = None  # ByteLevel(use_regex=True) alone: GPT-2's own regex, built into the pre-tokenizer
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"gpt2": "gpt-2", "digits+gpt2": "smollm", "llama3": "llama-bpe", "qwen2": "qwen2"}
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of q or k (n_head * head_dim, ...) from rotate-half pairs (i, i + hs/2) to adjacent pairs (2i, 2i+1)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_gguf_tensors(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, np.ndarray]:
    """Our GPT's state dict (arch llama) -> GGUF tensor name -> fp32 array (numpy shape = reversed ggml ne)."""
    c = config
    q, kv, inner = c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.intermediate_size
    out: dict[str, torch.Tensor] = {"token_embd.weight": state["transformer.wte.weight"][: c.vocab_size],
                                    "output_norm.weight": state["transformer.ln_f.weight"]}
    if not c.tie_embeddings:
        out["output.weight"] = state["lm_head.weight"][: c.vocab_size]
    for i in range(c.n_layer):
        h, b = f"transformer.h.{i}.", f"blk.{i}."
        qkv = state[h + "attn.c_attn.weight"]  # (q + 2 kv, C): q | k | v
        fc = state[h + "mlp.c_fc.weight"]  # (2 inner, C): gate | up
        out.update({
            b + "attn_norm.weight": state[h + "ln_1.weight"],
            b + "attn_q.weight": permute_rope(qkv[:q], c.n_head),
            b + "attn_k.weight": permute_rope(qkv[q: q + kv], c.n_kv_head),
            b + "attn_v.weight": qkv[q + kv:],
            b + "attn_output.weight": state[h + "attn.c_proj.weight"],
            b + "ffn_norm.weight": state[h + "ln_2.weight"],
            b + "ffn_gate.weight": fc[:inner],
            b + "ffn_up.weight": fc[inner:],
            b + "ffn_down.weight": state[h + "mlp.c_proj.weight"],
        })
        if c.qkv_bias:
            bias = state[h + "attn.c_attn.bias"]
            out.update({b + "attn_q.bias": permute_rope(bias[:q], c.n_head),
                        b + "attn_k.bias": permute_rope(bias[q: q + kv], c.n_kv_head),
                        b + "attn_v.bias": bias[q + kv:]})
    if c.rope_scaling is not None and c.rope_scaling["rope_type"] == "llama3":
        plain = rope_frequencies(c.head_dim, c.rope_base, None)
        out["rope_freqs.weight"] = plain / rope_frequencies(c.head_dim, c.rope_base, c.rope_scaling)  # divisors
    return {name: np.ascontiguousarray(t.detach().float().cpu().numpy()) for name, t in out.items()}


def add_llama_hparams(w: gguf.GGUFWriter, c: GPTConfig) -> None:
    """The llama architecture's keys beyond those every GGUF of ours has (context, widths, blocks, heads)."""
    w.add_head_count_kv(c.n_kv_head)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_freq_base(c.rope_base)
    w.add_vocab_size(c.vocab_size)
    if c.rope_scaling is not None and c.rope_scaling["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(c.rope_scaling["factor"]))


def _pre_tokenizer(tok_json: dict[str, Any]) -> str | None:
    """The name llama.cpp gives this byte-level pre-tokenizer, or None when it has none."""
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    last = steps[-1] if steps else {}
    if kinds[-1:] != ["ByteLevel"] or last.get("add_prefix_space"):
        return None
    if kinds == ["ByteLevel"] and last.get("use_regex", True):
        return PRE_TOKENIZERS["gpt2"]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and last.get("use_regex", True):
        return PRE_TOKENIZERS["digits+gpt2"]
    if kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        return {LLAMA3_REGEX: PRE_TOKENIZERS["llama3"], QWEN2_REGEX: PRE_TOKENIZERS["qwen2"]}.get(pattern)
    return None


def tokenizer_style(tok_json: dict[str, Any]) -> str:
    """byte_level, byte_fallback (Metaspace + byte-fallback BPE), or the reason GGUF cannot hold it (UserError)."""
    model = tok_json.get("model") or {}
    decoder = tok_json.get("decoder") or {}
    if model.get("type") != "BPE" or not model.get("merges"):
        raise UserError("GGUF holds byte-level or byte-fallback BPE tokenizers; this one is a "
                        f"{'character' if model.get('type') == 'BPE' else model.get('type')} vocabulary, which "
                        "llama.cpp's tokenizer models would split differently (unseen characters have no "
                        "<unk> there). Use --format onnx or --format hf for this model", flag="--format")
    if model.get("byte_fallback"):
        return "byte_fallback"
    if decoder.get("type") == "ByteLevel":
        if _pre_tokenizer(tok_json) is None:
            raise UserError(f"the tokenizer's pre-tokenizer {json.dumps(tok_json.get('pre_tokenizer'))[:200]} is "
                            f"none that llama.cpp implements ({', '.join(PRE_TOKENIZERS.values())}); llama.cpp would "
                            "split text differently", flag="--format")
        return "byte_level"
    raise UserError(f"the tokenizer's decoder {decoder.get('type')!r} is neither byte-level nor byte-fallback BPE's",
                    flag="--format")


def _adds_space_prefix(tok_json: dict[str, Any]) -> bool:
    """Whether the tokenizer puts ▁ before the text (Metaspace prepend, or a Prepend("▁") normalizer)."""
    def walk(node: Any) -> bool:
        if isinstance(node, dict):
            if node.get("type") == "Metaspace" and node.get("prepend_scheme", "always") != "never" \
                    and node.get("add_prefix_space", True):
                return True
            if node.get("type") == "Prepend" and node.get("prepend") == "\u2581":
                return True
            return any(walk(v) for v in node.values())
        return any(walk(v) for v in node) if isinstance(node, list) else False

    return walk(tok_json.get("normalizer")) or walk(tok_json.get("pre_tokenizer"))


def vocab_metadata(tok_json: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """The GGUF tokenizer fields for this tokenizer.json: model, pre, tokens, types, and merges or scores."""
    style = tokenizer_style(tok_json)
    vocab: dict[str, int] = dict(tok_json["model"]["vocab"])
    for added in tok_json.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    by_id = {i: t for t, i in vocab.items()}
    special = {a["content"] for a in tok_json.get("added_tokens", []) if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"].get("merges", [])]
    unk = tok_json["model"].get("unk_token")
    tokens, types = [], []
    for i in range(vocab_size):
        t = by_id.get(i)
        if t is None:  # ids the model has rows for but the tokenizer never emits
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
            continue
        tokens.append(t)
        if t in special:
            kind = gguf.TokenType.UNKNOWN if t == unk else gguf.TokenType.CONTROL
        elif style == "byte_fallback" and BYTE_PIECE.fullmatch(t):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.UNKNOWN if t == unk else gguf.TokenType.NORMAL
        types.append(int(kind))
    if style == "byte_level":
        return {"model": "gpt2", "pre": _pre_tokenizer(tok_json), "tokens": tokens, "types": types, "merges": merges}
    # sentencepiece's scores: the piece a merge makes ranks by the merge (earlier = higher); others 0
    rank: dict[str, float] = {}
    for r, merge in enumerate(merges):
        left, right = merge.split(" ", 1)
        rank.setdefault(left + right, -float(r + 1))
    scores = [rank.get(t, 0.0) for t in tokens]
    return {"model": "llama", "pre": "default", "tokens": tokens, "types": types, "scores": scores,
            "add_space_prefix": _adds_space_prefix(tok_json)}
