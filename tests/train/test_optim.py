"""Muon (train/optim.py) against a small reference computation written out here, step by step.

The reference is the algorithm as published (Keller Jordan's post; torch.optim.Muon's docstring):
Nesterov momentum, then the quintic Newton-Schulz iteration on one matrix at a time, in float64,
then decoupled weight decay and a step of lr * sqrt(max(1, rows / cols)). The optimizer under test
batches matrices by shape and runs in float32, so agreement to ~1e-6 means the same algorithm.
"""

from __future__ import annotations

import copy

import pytest
import torch

from nextoken.train.config import GPTConfig
from nextoken.train.model import GPT
from nextoken.train.optim import MuonAdamW, build_optimizer, muon_parameter_names, newton_schulz

A, B, C = 3.4445, -4.7750, 2.0315


def reference_newton_schulz(G: torch.Tensor, steps: int) -> torch.Tensor:
    """X <- a X + b (X X^T) X + c (X X^T)^2 X on the short side, after scaling to unit Frobenius norm."""
    X = G.double()
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / max(X.norm().item(), 1e-7)
    for _ in range(steps):
        gram = X @ X.T
        X = A * X + B * (gram @ X) + C * (gram @ gram @ X)
    return X.T if tall else X


def test_newton_schulz_matches_the_reference_and_orthogonalises() -> None:
    g = torch.Generator().manual_seed(0)

    def spread(rows: int, cols: int) -> torch.Tensor:  # singular values from 0.1 to 10
        u, _ = torch.linalg.qr(torch.randn(rows, min(rows, cols), generator=g))
        v, _ = torch.linalg.qr(torch.randn(cols, min(rows, cols), generator=g))
        return u @ torch.diag(torch.logspace(-1, 1, min(rows, cols))) @ v.T

    for m in (spread(24, 8), spread(8, 24), spread(16, 16)):
        ours = newton_schulz(m[None], steps=5)[0]
        torch.testing.assert_close(ours.double(), reference_newton_schulz(m, 5), atol=2e-5, rtol=0)
        # singular values pushed from a wide spread to roughly [0.7, 1.2] (not exactly 1: see the coefficients)
        before, after = torch.linalg.svdvals(m), torch.linalg.svdvals(ours)
        assert before.max() / before.min() > 50
        assert after.min() > 0.6 and after.max() < 1.25, after


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=31, block_size=16, n_layer=2, n_head=2, n_embd=16, tie_embeddings=False,
                         qk_norm=True))


def test_muon_groups_hold_exactly_the_hidden_matrices() -> None:
    model = tiny_model()
    names = muon_parameter_names(model)
    assert sorted({n.split(".", 3)[-1] for n in names}) == ["attn.c_attn.weight", "attn.c_proj.weight",
                                                             "mlp.c_fc.weight", "mlp.c_proj.weight"]
    opt = build_optimizer(model, optimizer="muon", learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.99),
                          device_type="cpu")
    by_id = {id(p): n for n, p in model.named_parameters()}
    muon = [by_id[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]]
    adam = [by_id[id(p)] for g in opt.param_groups if not g["muon"] for p in g["params"]]
    assert sorted(muon) == sorted(names)
    assert {"transformer.wte.weight", "lm_head.weight", "transformer.wpe.weight"} <= set(adam)
    assert all(not g["muon"] or g["lr"] == 0.02 for g in opt.param_groups)
    with pytest.raises(ValueError, match="matrices only"):
        MuonAdamW([{"params": [torch.nn.Parameter(torch.zeros(3))], "muon": True}], lr=0.1)


def _loss(model: GPT, seed: int) -> torch.Tensor:
    x = torch.randint(0, 31, (4, 16), generator=torch.Generator().manual_seed(seed))
    return model(x, torch.roll(x, -1, 1)).loss


def test_muon_update_matches_the_reference_and_adamw_matches_torch() -> None:
    """Three steps of MuonAdamW against: the reference Muon for the hidden matrices, and
    torch.optim.AdamW itself (the same groups) for everything else. Both sides take each step
    from the same weights with the same gradients (the reference is re-synced after each
    comparison), so float32-vs-float64 differences cannot accumulate through the loss."""
    lr, muon_lr, wd, mom = 2e-3, 0.05, 0.1, 0.95
    model, ref = tiny_model(), tiny_model()
    opt = build_optimizer(model, optimizer="muon", learning_rate=lr, weight_decay=wd, betas=(0.9, 0.99),
                          device_type="cpu", muon_lr=muon_lr, muon_momentum=mom)
    hidden = set(muon_parameter_names(ref))
    ref_params = dict(ref.named_parameters())
    ref_adam = torch.optim.AdamW(
        [{"params": [p for n, p in ref_params.items() if n not in hidden and p.dim() >= 2], "weight_decay": wd},
         {"params": [p for n, p in ref_params.items() if n not in hidden and p.dim() < 2], "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.99))
    bufs = {n: torch.zeros_like(ref_params[n], dtype=torch.float64) for n in hidden}
    moved = 0.0
    for step in range(3):
        model.zero_grad()
        _loss(model, step).backward()
        for n, p in model.named_parameters():
            ref_params[n].grad = p.grad.clone()
        opt.step()
        ref_adam.step()
        with torch.no_grad():
            for n in hidden:
                p = ref_params[n]
                g = p.grad.double()
                bufs[n] = mom * bufs[n] + (1 - mom) * g
                update = (1 - mom) * g + mom * bufs[n]  # Nesterov: g.lerp(buf, mom)
                o = reference_newton_schulz(update, 5)
                new = p.double() * (1 - muon_lr * wd) - muon_lr * max(1, p.shape[0] / p.shape[1]) ** 0.5 * o
                moved = max(moved, (new - p.double()).abs().max().item())
                p.copy_(new.float())
        for n, p in model.named_parameters():
            tol = 2e-6 if n in hidden else 1e-7
            torch.testing.assert_close(p, ref_params[n], atol=tol, rtol=0, msg=f"{n} after step {step + 1}")
        with torch.no_grad():
            for n, p in model.named_parameters():
                ref_params[n].copy_(p)
    assert moved > 1e-3  # Muon moved the matrices by far more than the tolerance


def test_muon_is_torch_muon_up_to_its_bfloat16() -> None:
    """The same algorithm as torch.optim.Muon (whose Newton-Schulz runs in bfloat16)."""
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("this torch has no torch.optim.Muon")
    w = torch.randn(32, 8, generator=torch.Generator().manual_seed(3))
    ours_p, theirs_p = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ours = MuonAdamW([{"params": [ours_p], "muon": True}], lr=0.02, weight_decay=0.1, momentum=0.95)
    theirs = torch.optim.Muon([theirs_p], lr=0.02, weight_decay=0.1, momentum=0.95)
    for seed in range(2):
        g = torch.randn(32, 8, generator=torch.Generator().manual_seed(10 + seed))
        ours_p.grad, theirs_p.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    step = (ours_p - w).abs().max().item()
    assert (ours_p - theirs_p).abs().max().item() < 0.05 * step  # bfloat16 has ~3 significant digits


def test_state_dict_round_trip_continues_identically() -> None:
    model = tiny_model()
    opt = build_optimizer(model, optimizer="muon", learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.99),
                          device_type="cpu")
    for step in range(2):
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())  # state_dict() holds the live tensors
    kinds = {frozenset(s) for s in saved_opt["state"].values()}
    assert kinds == {frozenset({"momentum_buffer"}), frozenset({"step", "exp_avg", "exp_avg_sq"})}

    def third_step(m: GPT, o: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        o.zero_grad()
        _loss(m, 2).backward()
        o.step()
        return {k: v.clone() for k, v in m.state_dict().items()}

    expected = third_step(model, opt)
    fresh = tiny_model(seed=1)
    fresh.load_state_dict(saved_model)
    fresh_opt = build_optimizer(fresh, optimizer="muon", learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.99),
                                device_type="cpu")
    fresh_opt.load_state_dict(saved_opt)
    got = third_step(fresh, fresh_opt)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_fused_adamw_on_cpu_is_adamw_up_to_rounding(optimizer: str) -> None:
    """--fused-adamw swaps AdamW's kernel (one fused op instead of a loop over parameters),
    not its arithmetic: the same run ends at the same weights to float32 rounding."""
    ends = {}
    for fused in (False, True):
        model = tiny_model()
        opt = build_optimizer(model, optimizer=optimizer, learning_rate=3e-3, weight_decay=0.1, betas=(0.9, 0.99),
                              device_type="cpu", fused_adamw=fused)
        assert all(bool(g.get("fused")) == fused for g in opt.param_groups if not g.get("muon"))
        for step in range(4):
            opt.zero_grad()
            _loss(model, step).backward()
            opt.step()
        ends[fused] = torch.cat([p.detach().flatten() for p in model.parameters()])
    start = torch.cat([p.detach().flatten() for p in tiny_model().parameters()])
    assert (ends[False] - start).abs().max() > 1e-3
    torch.testing.assert_close(ends[True], ends[False], atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_muon_on_cuda_matches_the_cpu_update() -> None:
    """The GPU path: bfloat16 Newton-Schulz and fused AdamW kernels, close to the CPU's float32 update."""
    cpu, gpu = tiny_model(), tiny_model().cuda()
    opts = [build_optimizer(m, optimizer="muon", learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.99),
                            device_type=d, muon_lr=0.02) for m, d in ((cpu, "cpu"), (gpu, "cuda"))]
    x = torch.randint(0, 31, (4, 16), generator=torch.Generator().manual_seed(0))
    for m, opt in zip((cpu, gpu), opts, strict=True):
        dev = next(m.parameters()).device
        m(x.to(dev), torch.roll(x, -1, 1).to(dev)).loss.backward()
        opt.step()
    for (n, a), b in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(b.cpu(), a, atol=2e-3, rtol=0, msg=n)  # bf16 NS: ~1% of a 0.02 step
