"""Attention: the masks, rotary position embeddings, and causal self-attention with grouped-query heads.

One module serves both families (``GPTConfig.arch``): GPT-2's packed ``c_attn`` (q | k | v, one
head of keys and values per query head) and the llama family's grouped-query attention, where
``n_kv_head`` heads of keys and values each serve ``n_head / n_kv_head`` query heads (Hugging
Face's ``repeat_kv`` order: key head j serves query heads j*g .. j*g+g-1, as SDPA's ``enable_gqa``
and ONNX Runtime's GroupQueryAttention do). The projections keep GPT-2's names; the llama
family's ``q_proj | k_proj | v_proj`` are the rows of ``c_attn`` in that order (``hf_import``).

The module ignores what surrounds attention (norms, MLP, embeddings: ``model.py``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
from torch.nn import functional as F

from nextoken.train.config import GPTConfig

LayerKV = tuple[torch.Tensor, torch.Tensor]  # one layer's (key, value), each (B, n_kv_head, S, hs)


def build_attention_mask(attention_mask: torch.Tensor, q_len: int, past_len: int) -> torch.Tensor:
    """Boolean attention mask in cache-slot space.

    attention_mask: (B, S) with 1 for real tokens and 0 for padding, S = past_len + q_len.
    Returns (B, 1, q_len, S): query i (in slot past_len + i) may see key slot j when
    j <= its own slot and slot j holds a real token. Every query may also see its own slot,
    so a padded query row is never fully masked (a fully masked softmax row is NaN in
    ONNX Runtime); its output is garbage that nobody reads.
    """
    S = attention_mask.shape[1]
    k_slots = torch.arange(S, device=attention_mask.device)  # (S,)
    # arange + offset rather than k_slots[S - q_len:]: torch.export cannot size that slice
    q_slots = torch.arange(q_len, device=attention_mask.device) + past_len  # (T,)
    causal = k_slots[None, :] <= q_slots[:, None]  # (T, S)
    own = k_slots[None, :] == q_slots[:, None]  # (T, S)
    real = attention_mask[:, None, :].bool()  # (B, 1, S)
    return ((causal[None] & real) | own[None])[:, None]  # (B, 1, T, S)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-row positions for a left-padded batch: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)


def build_document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Causal attention inside each document of a packed window.

    document_ids: (B, T), equal for the tokens of one document. Returns a boolean (B, 1, T, T):
    query i may see key j when j <= i and both belong to the same document (so the diagonal
    is always visible and no row is fully masked).
    """
    T = document_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()  # (T, T)
    same = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]  # (B, 1, T, T)



def rope_frequencies(head_dim: int, base: float, scaling: dict[str, Any] | None,
                     device: torch.device | None = None) -> torch.Tensor:
    """Rotary inverse frequencies (head_dim / 2,) float32, as Hugging Face computes them.

    ``1 / base ** (2i / head_dim)``; ``scaling`` (``GPTConfig.rope_scaling``) stretches them:
    ``linear`` divides every frequency by ``factor``; ``llama3`` divides the low frequencies
    (wavelengths beyond ``original_max_position_embeddings / low_freq_factor``) by ``factor``,
    keeps the high ones and blends in between (Llama 3.1's long-context recipe). Computed from
    constants on every call, so a traced graph folds them and no float16 cast ever rounds them.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    if scaling is None:
        return inv_freq
    kind, factor = scaling.get("rope_type", scaling.get("type")), float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    old_context = float(scaling["original_max_position_embeddings"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    wavelen = 2 * math.pi / inv_freq  # (hs/2,)
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    return torch.where(medium, smoothed, scaled)


def apply_rotary(x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + hs/2) of x (B, T, ..., hs) by position * inv_freq[i].

    position_ids: (B, T) or (1, T); any axes between T and hs (heads) share the rotation.
    inv_freq: (hs/2,) float32 (``rope_frequencies``). The angles are computed here from the
    positions (in float32, whatever x's dtype), not read from a table, so per-row positions (left
    padding) and any context length work, and the exported graph holds no position-sized constant.
    The pairing (i, i + hs/2) is Hugging Face's ``rotate_half`` (Llama, Qwen2, Mistral).
    """
    hs = x.shape[-1]
    angles = position_ids.to(torch.float32)[..., None] * inv_freq  # (B, T, hs/2)
    angles = angles.reshape(angles.shape[:2] + (1,) * (x.dim() - 3) + angles.shape[2:])  # (B, T, 1.., hs/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : hs // 2], x[..., hs // 2:]  # each (B, T, ..., hs/2)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, T, ..., hs)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.dropout = config.dropout
        q_width = config.n_head * config.head_dim
        # q | k | v in one matmul: (n_head + 2 * n_kv_head) * head_dim rows
        self.c_attn = nn.Linear(config.n_embd, config.qkv_size, bias=config.bias or config.qkv_bias)
        self.c_proj = nn.Linear(q_width, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.rope_base = config.rope_base if config.pos_emb == "rope" else None
        self.rope_scaling = config.rope_scaling
        if config.qk_norm:
            # A learned gain per channel, shared by the heads: with unit-RMS q and k and a fixed
            # 1/sqrt(hs) scale, the gains are what lets attention sharpen.
            self.q_norm = nn.RMSNorm(config.head_dim, eps=1e-6)
            self.k_norm = nn.RMSNorm(config.head_dim, eps=1e-6)
        else:
            self.q_norm = self.k_norm = None

    @property
    def plain(self) -> bool:
        """GPT-2's attention: nothing happens to q and k between the projection and the product."""
        return self.q_norm is None and self.rope_base is None and self.n_kv_head == self.n_head

    def qkv(self, x: torch.Tensor, position_ids: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, nh, T, hs), keys and values (B, n_kv_head, T, hs) for x (B, T, C), ready for attention.

        Anything applied to q and k before attention (normalisation, rotary embeddings at
        ``position_ids`` (B, T) or (1, T)) belongs here: the serving graph (export/serving.py)
        calls this and hands the result to ONNX Runtime's attention kernel.
        """
        B, T, C = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        if self.plain and nh * hs == C:  # GPT-2: exactly the historical ops
            q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
            q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
            k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
            v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
            return q, k, v
        qkv = self.c_attn(x).view(B, T, nh + 2 * nkv, hs)  # (B, T, nh + 2 nkv, hs)
        qk, v = qkv[:, :, : nh + nkv], qkv[:, :, nh + nkv:]  # (B, T, nh + nkv, hs), (B, T, nkv, hs)
        # q and k go through the norm and the rotation together: half the ops of doing each alone
        if self.q_norm is not None:
            gains = torch.cat([self.q_norm.weight.expand(nh, hs), self.k_norm.weight.expand(nkv, hs)])  # (nh+nkv, hs)
            qk = F.rms_norm(qk, (hs,), eps=self.q_norm.eps) * gains  # unit RMS per head, times the gains
        if self.rope_base is not None:
            if position_ids is None:
                raise ValueError("rotary position embeddings need position_ids")
            inv_freq = rope_frequencies(hs, self.rope_base, self.rope_scaling, x.device)  # (hs/2,)
            qk = apply_rotary(qk, position_ids, inv_freq)  # (B, T, nh + nkv, hs)
        q, k = qk[:, :, :nh], qk[:, :, nh:]  # (B, T, nh, hs), (B, T, nkv, hs)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh | nkv, T, hs)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, past: LayerKV | None = None,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerKV]:
        B, T, _ = x.shape
        q, k, v = self.qkv(x, position_ids)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, nkv, past+T, hs)
            v = torch.cat([past[1], v], dim=2)  # (B, nkv, past+T, hs)
        dropout_p = self.dropout if self.training else 0.0
        gqa = self.n_kv_head != self.n_head
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh * hs)
        return self.resid_dropout(self.c_proj(y)), (k, v)

    def weights(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Softmax attention weights (B, nh, T, T) of a causal pass over x (B, T, C), for plots."""
        T = x.shape[1]
        q, k, _ = self.qkv(x, position_ids)
        k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, nh, T, hs): each query head's keys
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, nh, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return att.masked_fill(~causal, float("-inf")).softmax(-1)
