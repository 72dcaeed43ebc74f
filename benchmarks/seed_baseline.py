"""The seed lesson's Mini-GPT, as the naive baseline our benchmarks measure against.

Post-LayerNorm blocks over ``nn.MultiheadAttention`` with a boolean causal mask, attention
weights returned from every layer, a learned position table, an untied head, plain AdamW at a
constant learning rate, and generation that re-encodes the whole context for every new token
(no KV cache). It is here to be beaten, not used.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SeedBlock(nn.Module):
    def __init__(self, d: int, n_head: int, ff: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, n_head, batch_first=True)
        self.ln1 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))
        self.ln2 = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a, _ = self.attn(x, x, x, attn_mask=mask)  # weights are computed and returned, as in the notebook
        x = self.ln1(x + a)
        return self.ln2(x + self.ff(x))


class SeedMiniGPT(nn.Module):
    def __init__(self, vocab_size: int, d: int = 64, n_layer: int = 2, n_head: int = 4, ff: int = 256,
                 max_len: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d)
        self.pos = nn.Parameter(torch.zeros(1, max_len, d))
        self.blocks = nn.ModuleList([SeedBlock(d, n_head, ff) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab_size, bias=False)
        self.max_len = max_len

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.embed(idx) + self.pos[:, :t]
        mask = torch.triu(torch.ones(t, t, device=idx.device), diagonal=1).bool()
        for b in self.blocks:
            x = b(x, mask)
        return self.head(self.ln_f(x))  # (B, T, V)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
