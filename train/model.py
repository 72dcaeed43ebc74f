"""A decoder-only GPT in plain PyTorch, with cached (incremental) decoding.

Two call paths share one set of weights:

* training: ``model(input_ids, targets)``: no mask tensor, ``is_causal=True`` attention,
  mean cross-entropy of every position against the next token;
* cached decoding: ``model(input_ids, attention_mask=..., position_ids=...,
  past_key_values=..., use_cache=True)``: the mask is built explicitly in cache-slot space
  (``is_causal=True`` aligns its triangle top-left, so a one-token query behind a cache would
  see only key 0), rows may be left-padded, and presents come back for the next step. This is
  the function the ONNX export traces: pure tensor code, no ``.item()``, no Python counters.

Attention *weights* are never materialised here; ``attention_weights`` recomputes them on a
separate path for plots, so training and serving keep the fused SDPA kernel.

Recipe options (``GPTConfig``; the defaults are GPT-2) each live inside one of the pieces the
serving graph composes (``embed``, ``attn.qkv``, ``attn.c_proj``, ``mlp``, ``head``): rotary
position embeddings and QK-norm in ``qkv``, ReLU^2 in ``mlp``, soft-capping and an untied head
in ``head``. Attention itself stays plain causal SDPA with scale 1/sqrt(head_size) in every
variant, so the serving graph can hand exactly that to ONNX Runtime's kernel.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from nextoken.train.config import GPTConfig

LayerKV = tuple[torch.Tensor, torch.Tensor]  # one layer's (key, value), each (B, nh, S, hs)
KVCache = list[LayerKV]  # per layer


class GPTOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, vocab_size)
    loss: torch.Tensor | None  # scalar mean cross-entropy when targets were given
    present_key_values: KVCache | None  # per layer (B, nh, past+T, hs) when use_cache


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


def apply_rotary(x: torch.Tensor, position_ids: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate channel pairs (i, i + hs/2) of x (B, T, ..., hs) by position * base ** (-2i / hs).

    position_ids: (B, T) or (1, T); any axes between T and hs (heads, q/k) share the rotation.
    The angles are computed here from the positions (in float32, whatever x's dtype), not read
    from a table, so per-row positions (left padding) and any context length work, and the
    exported graph holds no position-sized constant.
    """
    hs = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, hs, 2, dtype=torch.float32, device=x.device) / hs)  # (hs/2,)
    angles = position_ids.to(torch.float32)[..., None] * inv_freq  # (B, T, hs/2)
    angles = angles.reshape(angles.shape[:2] + (1,) * (x.dim() - 3) + angles.shape[2:])  # (B, T, 1.., hs/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : hs // 2], x[..., hs // 2:]  # each (B, T, ..., hs/2)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, T, ..., hs)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.rope_base = config.rope_base if config.pos_emb == "rope" else None
        if config.qk_norm:
            # A learned gain per channel, shared by the heads: with unit-RMS q and k and a fixed
            # 1/sqrt(hs) scale, the gains are what lets attention sharpen.
            self.q_norm = nn.RMSNorm(config.head_size, eps=1e-6)
            self.k_norm = nn.RMSNorm(config.head_size, eps=1e-6)
        else:
            self.q_norm = self.k_norm = None

    def qkv(self, x: torch.Tensor, position_ids: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values for x (B, T, C), each (B, nh, T, hs), ready for attention.

        Anything applied to q and k before attention (normalisation, rotary embeddings at
        ``position_ids`` (B, T) or (1, T)) belongs here: the serving graph (export/serving.py)
        calls this and hands the result to ONNX Runtime's attention kernel.
        """
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        if self.q_norm is None and self.rope_base is None:  # GPT-2: exactly the historical ops
            q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # each (B, T, C)
            q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
            k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
            v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
            return q, k, v
        qkv = self.c_attn(x).view(B, T, 3, nh, hs)  # (B, T, 3, nh, hs)
        qk, v = qkv[:, :, :2], qkv[:, :, 2]  # (B, T, 2, nh, hs), (B, T, nh, hs)
        # q and k go through the norm and the rotation together: half the ops of doing each alone
        if self.q_norm is not None:
            gains = torch.stack([self.q_norm.weight, self.k_norm.weight])[:, None, :]  # (2, 1, hs)
            qk = F.rms_norm(qk, (hs,), eps=self.q_norm.eps) * gains  # unit RMS per head, times the gains
        if self.rope_base is not None:
            if position_ids is None:
                raise ValueError("rotary position embeddings need position_ids")
            qk = apply_rotary(qk, position_ids, self.rope_base)  # (B, T, 2, nh, hs)
        q, k = qk.unbind(2)  # each (B, T, nh, hs)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # each (B, nh, T, hs)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, past: LayerKV | None = None,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerKV]:
        B, T, C = x.shape
        q, k, v = self.qkv(x, position_ids)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, nh, past+T, hs)
            v = torch.cat([past[1], v], dim=2)  # (B, nh, past+T, hs)
        dropout_p = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class ReLUSquared(nn.Module):
    """relu(x) ** 2 (Primer, So et al. 2021; the modded-nanogpt speedrun's MLP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh") if config.mlp_act == "gelu" else ReLUSquared()  # the activation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, past: LayerKV | None = None,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerKV]:
        a, present = self.attn(self.ln_1(x), mask, past, position_ids)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.activation_checkpointing = False
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                **({"wpe": nn.Embedding(config.block_size, config.n_embd)} if config.pos_emb == "learned" else {}),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the stream's variance stays put.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.zero_init:
            # Every block starts as the identity on the residual stream, and an untied head
            # predicts uniformly (loss exactly log(vocab)); gradients still reach these matrices
            # at once, so they move on the first step.
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight") or (name == "lm_head.weight" and not config.tie_embeddings):
                    nn.init.zeros_(p)

    @property
    def tied(self) -> bool:
        """Whether the LM head shares the token embedding's tensor (GPT-2)."""
        return self.lm_head.weight is self.transformer.wte.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Token (and position) embeddings: input_ids (B, T), position_ids (B, T) or (1, T) -> (B, T, C).

        With rotary embeddings there is no position table: positions enter in ``attn.qkv``.
        """
        x = self.transformer.wte(input_ids)  # (B, T, C)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(position_ids)  # (B, T, C)
        return self.transformer.drop(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The residual stream (B, T, C) -> next-token logits (B, T, vocab_size), soft-capped if set."""
        x = self.transformer.ln_f(x)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, padded_vocab)
        if self.config.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]  # (B, T, vocab)
        cap = self.config.logit_softcap
        if cap:
            logits = cap * torch.tanh(logits / cap)  # (B, T, vocab), every logit inside (-cap, cap)
        return logits

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        document_ids: torch.Tensor | None = None,
    ) -> GPTOutput:
        """Logits for every position, and the loss against ``targets`` when given.

        input_ids: (B, T) token ids; targets: (B, T) next-token ids (-100 is ignored).
        attention_mask: (B, past+T) 1 = real token, 0 = padding. position_ids: (B, T).
        past_key_values: per layer (key, value), each (B, nh, past, hs).
        document_ids: (B, T), training path only: a token attends only to earlier tokens of its
        own document (pass each token's position inside its document as position_ids).
        """
        B, T = input_ids.shape
        past_len = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        cached = use_cache or past_key_values is not None or attention_mask is not None
        if document_ids is not None and cached:
            raise ValueError("document_ids is for the training path; the cached path takes attention_mask")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = position_ids_from_mask(attention_mask)[:, -T:]  # (B, T)
            else:
                if past_len + T > self.config.block_size:
                    raise ValueError(
                        f"sequence length {past_len + T} exceeds the model's block_size {self.config.block_size}"
                    )
                position_ids = torch.arange(past_len, past_len + T, device=input_ids.device)[None]  # (1, T)
        mask = None
        if cached:
            if attention_mask is None:
                attention_mask = torch.ones(B, past_len + T, dtype=torch.long, device=input_ids.device)
            mask = build_attention_mask(attention_mask, T, past_len)  # (B, 1, T, past+T)
        elif document_ids is not None:
            mask = build_document_mask(document_ids)  # (B, 1, T, T)

        x = self.embed(input_ids, position_ids)  # (B, T, C)
        presents: KVCache = []
        for i, block in enumerate(self.transformer.h):
            past = past_key_values[i] if past_key_values is not None else None
            if self.activation_checkpointing and self.training and not cached:
                x, present = checkpoint(block, x, mask, past, position_ids, use_reentrant=False)
            else:
                x, present = block(x, mask, past, position_ids)
            presents.append(present)
        logits = self.head(x)  # (B, T, vocab)

        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return GPTOutput(logits, loss, presents if cached else None)

    @torch.no_grad()
    def attention_weights(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Softmax attention weights per layer, each (B, nh, T, T), for plotting.

        A separate path on purpose: the hot paths use fused SDPA, which never forms them.
        """
        B, T = input_ids.shape
        pos = torch.arange(T, device=input_ids.device)[None]
        x = self.embed(input_ids, pos)
        causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
        maps = []
        for block in self.transformer.h:
            q, k, _ = block.attn.qkv(block.ln_1(x), pos)
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])  # (B, nh, T, T)
            maps.append(att.masked_fill(~causal, float("-inf")).softmax(-1))
            x, _ = block(x, position_ids=pos)
        return maps

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` after each row of ``input_ids`` (B, T) with the KV cache.

        When the cache reaches ``block_size`` the context is cut to its last half and
        re-encoded, since learned positions cannot go past the table.
        """
        from nextoken.train.sampling import sample_next

        self.eval()
        idx = input_ids
        window = self.config.block_size
        ctx = idx[:, -window:]
        out = self(ctx, use_cache=True)
        cache, logits = out.present_key_values, out.logits[:, -1, :]
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            idx = torch.cat([idx, nxt[:, None]], dim=1)
            if eos_token_id is not None:
                finished |= nxt == eos_token_id
                if bool(finished.all()):
                    break
            if cache[0][0].shape[2] + 1 > window:
                ctx = idx[:, -(window // 2):]
                out = self(ctx, use_cache=True)
            else:
                out = self(nxt[:, None], past_key_values=cache, use_cache=True)
            cache, logits = out.present_key_values, out.logits[:, -1, :]
        return idx
