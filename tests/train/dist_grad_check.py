"""Launched by test_distributed.py under ``torchrun --nproc_per_node 2``: checks gradient averaging.

Each rank runs ``ACCUM`` micro-steps on its own micro-batches through ``wrap_model`` and
``no_grad_sync`` (the loop's own plumbing), then takes one optimizer step (AdamW, or Muon with
AdamW for the rest: Muon orthogonalises each whole matrix, so under FSDP a rank must gather its
shard's full gradient first, and a rank that orthogonalised only its shard would fail here). Every
rank also repeats the step in a single process on the concatenation of every rank's micro-batches and compares the
gathered gradients and updated weights. The ranks see different data, so a missing all-reduce
(or a sum instead of a mean, or a sync skipped on the last micro-step) cannot pass. Writes a
JSON report to argv[2]; exits 1 on a mismatch. argv[1]: comma-separated ``strategy[:optimizer]``.
"""

from __future__ import annotations

import json
import sys

import torch

from nextoken.train import distributed as D
from nextoken.train.config import GPTConfig
from nextoken.train.model import GPT
from nextoken.train.optim import build_optimizer

ACCUM, B, T, V = 2, 3, 16, 23
CFG = GPTConfig(vocab_size=V, block_size=T, n_layer=2, n_head=2, n_embd=16)


def batches(world: int) -> torch.Tensor:
    """(world, ACCUM, B, T + 1) token windows, identical on every rank; rank r uses [r]."""
    return torch.randint(V, (world, ACCUM, B, T + 1), generator=torch.Generator().manual_seed(7))


def full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in D.unwrap(model).named_parameters():
        g = p.grad
        if hasattr(g, "full_tensor"):  # an FSDP2 shard (DTensor): gather the whole gradient
            g = g.full_tensor()
        out[name] = g.detach().clone()
    return out


def make_optimizer(model: torch.nn.Module, optimizer: str) -> torch.optim.Optimizer:
    return build_optimizer(model, optimizer=optimizer, learning_rate=1e-2, weight_decay=0.1, betas=(0.9, 0.99),
                           device_type="cpu", muon_lr=0.05)


def check(strategy: str, optimizer: str, info: D.DistInfo) -> dict[str, float]:
    data = batches(info.world_size)
    torch.manual_seed(0)
    raw = GPT(CFG)
    reference = GPT(CFG)
    reference.load_state_dict(raw.state_dict())
    model = D.wrap_model(raw, info, strategy, torch.device("cpu"))
    opt = make_optimizer(raw, optimizer)
    for micro in range(ACCUM):
        w = data[info.rank, micro]  # (B, T+1)
        with D.no_grad_sync(model, info, skip=micro < ACCUM - 1):
            loss = model(w[:, :-1], w[:, 1:]).loss / ACCUM
        loss.backward()
    grads = full_grads(model)
    opt.step()
    weights = D.full_model_state(model, info, strategy)  # collective under FSDP

    # One process, one batch: every rank's micro-batches concatenated, one mean loss.
    ref_opt = make_optimizer(reference, optimizer)
    allw = data.transpose(0, 1).reshape(-1, T + 1)  # (ACCUM * world * B, T+1)
    reference(allw[:, :-1], allw[:, 1:]).loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    ref_opt.step()
    grad_err = max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads)
    # The gathered full state lands on rank 0 only (cpu_offload); the other ranks get {}.
    weight_err = 0.0
    if info.is_main:
        weight_err = max((weights[n] - v).abs().max().item() for n, v in reference.state_dict().items())
    # A rank's own (un-averaged) gradient is far from the reference: the check has teeth.
    scale = max(g.abs().max().item() for g in ref_grads.values())
    return {"grad_err": grad_err, "weight_err": weight_err, "grad_scale": scale}


def main() -> int:
    torch.set_num_threads(1)
    info = D.init_distributed("cpu")
    assert info.world_size == 2, info
    ok = True
    report = {}
    for spec in sys.argv[1].split(","):
        strategy, _, optimizer = spec.partition(":")
        r = check(strategy, optimizer or "adamw", info)
        report[spec] = r
        ok &= r["grad_err"] < 1e-6 * max(1.0, r["grad_scale"]) and r["weight_err"] < 1e-5
    if info.is_main:
        with open(sys.argv[2], "w") as f:
            json.dump(report, f)
    D.shutdown(info)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
