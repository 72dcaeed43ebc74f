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
serving graph composes (``embed``, ``ln_1``, ``attn.qkv``, ``attn.c_proj``, ``ln_2``, ``mlp``,
``head``): rotary position embeddings and QK-norm in ``qkv``, ReLU^2 in ``mlp``, soft-capping and
an untied head in ``head``. Attention itself stays plain causal SDPA with scale 1/sqrt(head_dim) in
every variant, so the serving graph can hand exactly that to ONNX Runtime's kernel.

The llama family (``arch="llama"``: Llama, Qwen2, Mistral) is the same tree of modules under the
same names: RMSNorm where GPT-2 has LayerNorm (``ln_1``, ``ln_2``, ``ln_f``), a SwiGLU ``mlp``
(``c_fc`` holds gate | up, ``c_proj`` is down), grouped-query attention (``attention.py``),
rotary positions and no biases (but Qwen2's q/k/v bias). So the optimizer's groups, FSDP's
blocks, checkpoints, probes and both ONNX graphs need nothing of their own for it;
``hf_import`` maps Hugging Face's names onto these.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from nextoken.train.attention import (  # noqa: F401  (re-exported: the model's public helpers)
    CausalSelfAttention,
    LayerKV,
    apply_rotary,
    build_attention_mask,
    build_document_mask,
    position_ids_from_mask,
    rope_frequencies,
)
from nextoken.train.config import GPTConfig

KVCache = list[LayerKV]  # per layer, each (B, n_kv_head, S, hs)


class GPTOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, vocab_size)
    loss: torch.Tensor | None  # scalar mean cross-entropy when targets were given
    present_key_values: KVCache | None  # per layer (B, n_kv_head, past+T, hs) when use_cache


class ReLUSquared(nn.Module):
    """relu(x) ** 2 (Primer, So et al. 2021; the modded-nanogpt speedrun's MLP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class MLP(nn.Module):
    """x (..., C) -> (..., C): c_proj(act(c_fc(x))), or SwiGLU's c_proj(silu(gate) * up) with c_fc = gate | up."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        inner = config.intermediate_size
        self.swiglu = config.mlp_act == "swiglu"
        self.c_fc = nn.Linear(config.n_embd, 2 * inner if self.swiglu else inner, bias=config.bias)
        self.gelu = (nn.SiLU() if self.swiglu else nn.GELU(approximate="tanh") if config.mlp_act == "gelu"
                     else ReLUSquared())  # the activation
        self.c_proj = nn.Linear(inner, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.c_fc(x).chunk(2, dim=-1)  # each (..., inner)
            return self.dropout(self.c_proj(self.gelu(gate) * up))
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


def norm(config: GPTConfig) -> nn.Module:
    """The family's normalisation over the model's width: GPT-2's LayerNorm or the llama family's RMSNorm."""
    if config.arch == "llama":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm(config)
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
                ln_f=norm(config),
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

    @classmethod
    def from_state_dict(cls, config: GPTConfig, state: dict[str, torch.Tensor]) -> GPT:
        """A model whose parameters ARE ``state``'s tensors (no random init, no copy): for loading big folders."""
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state, assign=True)
        if config.tie_embeddings:
            model.lm_head.weight = model.transformer.wte.weight  # assign replaced the shared parameter twice
        return model

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
        past_key_values: per layer (key, value), each (B, n_kv_head, past, hs).
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
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)[None]
        x = self.embed(input_ids, pos)
        maps = []
        for block in self.transformer.h:
            maps.append(block.attn.weights(block.ln_1(x), pos))  # (B, nh, T, T)
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
