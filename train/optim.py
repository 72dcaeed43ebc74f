"""Optimizers: AdamW (GPT-2's recipe, the default) and Muon for the hidden matrices.

``build_optimizer`` returns ``torch.optim.AdamW`` for ``optimizer="adamw"``, exactly as before
this module existed, and ``MuonAdamW`` for ``optimizer="muon"``: one optimizer object (one state
dict, one ``step()``; the loop, gradient scaler, checkpoints and FSDP's state-dict helpers see a
single optimizer) whose groups run one of two updates:

* ``muon=True`` groups (the 2-D weights inside the transformer blocks: ``attn.c_attn``,
  ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``): Nesterov momentum, then the update is
  orthogonalised by a quintic Newton-Schulz iteration (Keller Jordan's Muon, the coefficients
  and lr-shape scaling of ``torch.optim.Muon``'s default), with decoupled weight decay;
* the other groups (token/position embeddings, an untied LM head, norm gains, biases): AdamW
  through ``torch.optim.adamw.adamw``, the functional form ``torch.optim.AdamW`` itself runs.

NOTE on departures from ``torch.optim.Muon``: it runs Newton-Schulz in bfloat16. Here it runs in
float32 on CPUs (this project's CPUs have no bfloat16 arithmetic: bf16 matmuls are slower there,
and less exact) and bfloat16 on CUDA, as torch does; matrices of one shape are orthogonalised in
one batched product instead of one at a time (fewer Python ops per step); an FSDP2 shard is
gathered to the full matrix first (orthogonalising a shard alone would be a different update).

The module ignores the learning-rate schedule: the loop sets each group's ``lr`` every step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.adamw import adamw as adamw_functional

# Keller Jordan's quintic coefficients (torch.optim.Muon's defaults): the iteration's slope at 0
# is maximised, so singular values land in roughly [0.7, 1.2] after 5 steps instead of exactly 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7


def adamw_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's two groups: decay on matrices (and embeddings), none on biases or norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def muon_parameter_names(model: nn.Module) -> list[str]:
    """The hidden matrices Muon updates: 2-D weights inside the blocks (never embeddings or the head)."""
    return [n for n, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and n.startswith("transformer.h.")]


def newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = NS_EPS,
                  coefficients: tuple[float, float, float] = NS_COEFFICIENTS) -> torch.Tensor:
    """Approximately orthogonalise each matrix of G (k, m, n): U S V^T -> U S' V^T, S' ~ 1.

    Runs in G's dtype. Each matrix is first scaled to Frobenius norm 1 (which bounds its spectral
    norm by 1, where the polynomial converges), then iterated on its short side:
    X <- a X + b (X X^T) X + c (X X^T)^2 X.

    NOTE on cost: the textbook loop spends two (short x short x long) products per step. For a
    clearly rectangular matrix (long side >= 2x the short one: c_attn, c_fc, mlp.c_proj) this runs
    the same polynomial on the Gram matrix A = X X^T instead: every step's factor
    M = a + b A + c A^2 is a polynomial in A, so they all commute, and
    X_k = (M_{k-1} ... M_0) X_0 with A_{k+1} = M_k^2 A_k: only (short x short) products until one
    final product with X_0. At 128 x 512 that is ~45% fewer FLOPs for the same result (float32:
    agreement to ~1e-6 with the textbook loop; tests/train/test_optim.py checks both).
    """
    a, b, c = coefficients
    transposed = G.shape[-2] > G.shape[-1]
    X = G.mT if transposed else G  # (k, short, long)
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    if X.shape[-1] >= 2 * X.shape[-2]:
        X = _newton_schulz_gram(X, steps, a, b, c)
    else:
        for _ in range(steps):
            A = X @ X.mT  # (k, short, short)
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
            X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
    return X.mT if transposed else X


def _newton_schulz_gram(X: torch.Tensor, steps: int, a: float, b: float, c: float) -> torch.Tensor:
    """The quintic iteration of ``newton_schulz`` through the Gram matrix; X (k, short, long)."""
    A = X @ X.mT  # (k, s, s)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A)
    Q = None  # (k, s, s): the product of the factors so far
    for i in range(steps):
        M = torch.baddbmm(b * A + a * eye, A, A, alpha=c)  # a + b A + c A^2
        Q = M if Q is None else M @ Q
        if i < steps - 1:
            A = (M @ M) @ A  # the Gram matrix of M X
    return Q @ X  # (k, s, long)


def muon_lr_scale(shape: torch.Size | tuple[int, ...]) -> float:
    """sqrt(max(1, rows / cols)): Keller's scaling, so the update's RMS does not shrink on wide outputs."""
    return max(1.0, shape[0] / shape[1]) ** 0.5


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole matrix behind an FSDP2 shard (a DTensor); a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` cut to ``like``'s shard. Every rank holds the same ``full``, so no data moves."""
    if hasattr(like, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    return full


class MuonAdamW(torch.optim.Optimizer):
    """Muon for groups marked ``muon=True``, AdamW for the others; one state dict for both.

    Group settings: ``lr``, ``weight_decay`` (both updates, decoupled: p *= 1 - lr * wd),
    ``betas``, ``eps`` (AdamW), ``momentum``, ``nesterov``, ``ns_steps`` (Muon).
    Per-parameter state: AdamW ``step``, ``exp_avg``, ``exp_avg_sq`` (the names torch.optim.AdamW
    uses); Muon ``momentum_buffer``.
    """

    def __init__(self, params: Iterable[dict[str, Any]], *, lr: float, betas: tuple[float, float] = (0.9, 0.99),
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, fused: bool = False) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if ns_steps < 1:
            raise ValueError(f"ns_steps must be >= 1, got {ns_steps}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        nesterov=nesterov, ns_steps=ns_steps, muon=False, fused=fused)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["muon"]:
                bad = [tuple(p.shape) for p in group["params"] if p.dim() != 2]
                if bad:
                    raise ValueError(f"Muon updates matrices only; got parameters of shapes {bad[:3]}")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon_step if group["muon"] else self._adamw_step)(group, params)
        return loss

    def _adamw_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        fused = bool(group["fused"])
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                # torch.optim.AdamW's layout: a float32 step count, on the CPU unless fused
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        adamw_functional(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, [], steps,
                         foreach=None if fused else True, fused=fused or None, amsgrad=False, beta1=beta1,
                         beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                         maximize=False)

    def _muon_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        momentum, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        updates = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - momentum)  # buf = momentum * buf + (1 - momentum) * grad
            updates.append(p.grad.lerp(buf, momentum) if group["nesterov"] else buf)
        fulls = [_full(u) for u in updates]  # each (rows, cols)
        ortho = orthogonalise_all(fulls, group["ns_steps"])
        for p, u, o in zip(params, updates, ortho, strict=True):
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(_like(o.to(p.dtype), u), alpha=-lr * muon_lr_scale(p.shape))


def orthogonalise_all(mats: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
    """Newton-Schulz for a list of matrices, batched by shape; float32 on CPU, bfloat16 on CUDA."""
    out: list[torch.Tensor | None] = [None] * len(mats)
    by_shape: dict[tuple[int, ...], list[int]] = {}  # shape -> positions in mats
    for i, m in enumerate(mats):
        by_shape.setdefault(tuple(m.shape), []).append(i)
    for idx in by_shape.values():
        first = mats[idx[0]]
        dtype = torch.bfloat16 if first.device.type == "cuda" else torch.float32
        stacked = torch.stack([mats[i] for i in idx]).to(dtype)  # (k, rows, cols)
        result = newton_schulz(stacked, steps)
        for j, i in enumerate(idx):
            out[i] = result[j]
    return out  # type: ignore[return-value]


def build_optimizer(model: nn.Module, *, optimizer: str, learning_rate: float, weight_decay: float,
                    betas: tuple[float, float], device_type: str, muon_lr: float = 0.02,
                    muon_momentum: float = 0.95, muon_ns_steps: int = 5,
                    fused_adamw: bool = False) -> torch.optim.Optimizer:
    """The run's optimizer over ``model``'s parameters (``model`` unwrapped: DDP's or not, FSDP's in place).

    ``adamw``: ``torch.optim.AdamW`` exactly as GPT-2-style runs always had it (fused on CUDA;
    the for-loop kernel on CPU unless ``fused_adamw``: one fused kernel instead of ~10 ops per
    parameter, ~3x less time in the step, rounding different in the last bits).
    ``muon``: ``MuonAdamW`` with the hidden matrices in one Muon group at ``muon_lr`` and the
    rest in AdamW groups at ``learning_rate``, decayed like AdamW's.
    """
    fused = device_type == "cuda" or fused_adamw
    if optimizer == "adamw":
        extra = {"fused": True} if fused else {}
        return torch.optim.AdamW(adamw_groups(model, weight_decay), lr=learning_rate, betas=betas, **extra)
    if optimizer != "muon":
        raise ValueError(f"optimizer must be adamw or muon, got {optimizer!r}")
    hidden = set(muon_parameter_names(model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n in hidden], "muon": True, "lr": muon_lr, "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in hidden and p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in hidden and p.dim() < 2], "weight_decay": 0.0},
    ]
    return MuonAdamW([g for g in groups if g["params"]], lr=learning_rate, betas=betas, momentum=muon_momentum,
                     ns_steps=muon_ns_steps, fused=fused)

