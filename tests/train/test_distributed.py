"""Real 2-process gloo runs under torchrun on CPU (no mocks): DDP and FSDP2.

* the two ranks' gradients are averaged: equal to one process on the concatenated batch;
* `nextoken train` under torchrun writes checkpoints that one process resumes (`--resume auto`)
  and loads (`load_run`, `nextoken generate`), for DDP and for FSDP;
* DDP and FSDP runs of the same config end at the same weights (same init on every rank).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nextoken.cli import main
from nextoken.train.checkpoint import list_checkpoints
from nextoken.train.run import load_run
from tests.conftest import REPO, train_tiny

HERE = Path(__file__).resolve().parent
# The same settings as conftest.train_tiny, as flags, with fewer steps.
TINY_FLAGS = ["--tokenizer", "char", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
              "--batch-size", "8", "--max-iters", "6", "--eval-interval", "3", "--eval-iters", "2",
              "--log-interval", "3", "--warmup-iters", "2", "--learning-rate", "3e-3", "--min-lr", "3e-4",
              "--sample-tokens", "8", "--no-progress", "--no-tensorboard", "--threads", "1"]


def torchrun(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` with one thread per rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_gradients_are_averaged_across_ranks(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    specs = ("ddp", "fsdp", "ddp:muon", "fsdp:muon")
    torchrun(str(HERE / "dist_grad_check.py"), ",".join(specs), str(report_path))
    report = json.loads(report_path.read_text())
    for strategy in specs:
        r = report[strategy]
        assert r["grad_scale"] > 1e-2, "gradients too small for the comparison to mean anything"
        assert r["grad_err"] < 1e-6, (strategy, r)
        assert r["weight_err"] < 1e-5, (strategy, r)


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> dict[str, Path]:
    """One DDP and one FSDP run of the same tiny config, each 2 ranks x 6 steps."""
    runs = {}
    for strategy in ("ddp", "fsdp"):
        out = tmp_path_factory.mktemp("dist") / strategy
        proc = torchrun("-m", "nextoken", "train", "--data", str(tiny_corpus), "--out-dir", str(out),
                        "--strategy", strategy, *TINY_FLAGS)
        # Only rank 0 logs: one "done" line, not two.
        assert proc.stderr.count("done: 6 steps") == 1, proc.stderr[-2000:]
        runs[strategy] = out
    return runs


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_rank_run_writes_full_checkpoints(two_rank_runs: dict[str, Path], strategy: str) -> None:
    run = two_rank_runs[strategy]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    assert summary["tokens_seen"] == 6 * 8 * 32 * 2  # both ranks' windows count
    ckpts = list_checkpoints(run / "checkpoints")
    assert [c.step for c in ckpts] == [0, 3, 6] and ckpts[-1].meta["world_size"] == 2
    state = torch.load(ckpts[-1].path / "state.pt", weights_only=True)
    assert len(state["sampler"]) == 2 and len(state["rng"]) == 2  # one stream per rank
    # The optimizer state is complete (every parameter, full shapes), not one rank's shard.
    weights = load_file(ckpts[-1].path / "model.safetensors")
    for name, p in weights.items():
        assert state["optimizer"]["state"][name]["exp_avg"].shape == p.shape, name
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in evals if r["event"] == "eval"]
    assert len(val) == 3 and val[-1] < val[0]  # rank 0 logged every evaluation, and it learned


def test_ddp_and_fsdp_reach_the_same_weights(two_rank_runs: dict[str, Path]) -> None:
    ddp = load_file(list_checkpoints(two_rank_runs["ddp"] / "checkpoints")[-1].path / "model.safetensors")
    fsdp = load_file(list_checkpoints(two_rank_runs["fsdp"] / "checkpoints")[-1].path / "model.safetensors")
    assert ddp.keys() == fsdp.keys()
    for name in ddp:
        torch.testing.assert_close(fsdp[name], ddp[name], atol=1e-4, rtol=1e-4, msg=name)
    init = load_file(list_checkpoints(two_rank_runs["ddp"] / "checkpoints")[0].path / "model.safetensors")
    assert max((ddp[n] - init[n]).abs().max().item() for n in ddp) > 1e-3  # training moved them


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_rank_checkpoint_resumes_in_one_process(two_rank_runs: dict[str, Path], tiny_corpus: Path,
                                                    tmp_path: Path, strategy: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(two_rank_runs[strategy], run)
    summary = train_tiny(run, tiny_corpus, resume="auto", max_iters=9, eval_interval=3, eval_iters=2,
                         log_interval=3, warmup_iters=2)
    assert summary["world_size"] == 1 and summary["steps"] == 9
    assert summary["tokens_seen"] == 6 * 8 * 32 * 2 + 3 * 8 * 32  # 2 ranks' steps, then 1 rank's
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in records if r["event"] == "eval"]
    assert evals == [0, 3, 6, 9]  # the history before the resume point is kept, nothing redone
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    assert ckpt.step == 9 and ckpt.meta["world_size"] == 1
    state = torch.load(ckpt.path / "state.pt", weights_only=True)
    # Adam's step count continued from the 2-rank run's 6 (a fresh optimizer would say 3).
    assert float(state["optimizer"]["state"]["transformer.wte.weight"]["step"]) == 9


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_rank_checkpoint_loads_in_one_process(two_rank_runs: dict[str, Path], strategy: str, capsys) -> None:
    loaded = load_run(two_rank_runs[strategy], "latest")
    assert loaded.checkpoint.step == 6
    assert main(["generate", str(two_rank_runs[strategy]), "--prompt", "the ", "--max-new-tokens", "12",
                 "--seed", "1", "--checkpoint", "latest"]) == 0
    assert capsys.readouterr().out.startswith("the ")


def test_one_process_checkpoint_resumes_on_two_fsdp_ranks(tiny_run: Path, tmp_path: Path) -> None:
    """The other direction: a 1-process run (checkpoint at step 30) continues as 2 FSDP ranks."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    # The run's own settings (a resume refuses others); only where it runs and its budget change.
    torchrun("-m", "nextoken", "train", "--out-dir", str(run), "--strategy", "fsdp", "--max-iters", "33",
             "--resume", "auto")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 33
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    assert ckpt.step == 33 and ckpt.meta["world_size"] == 2
    adam = torch.load(ckpt.path / "state.pt", weights_only=True)["optimizer"]["state"]["transformer.wte.weight"]
    # The 1-process optimizer state was sharded into FSDP, stepped 3 times and gathered back whole.
    assert float(adam["step"]) == 33
    assert adam["exp_avg"].shape == load_file(ckpt.path / "model.safetensors")["transformer.wte.weight"].shape


def test_fsdp_muon_run_gathers_whole_optimizer_state_and_resumes_in_one_process(tmp_path: Path,
                                                                                 tiny_corpus: Path) -> None:
    """The whole recipe under FSDP: Muon's momentum buffers come back whole (not one rank's shard)
    and a single process continues them."""
    run = tmp_path / "run"
    recipe = ["--optimizer", "muon", "--pos-emb", "rope", "--qk-norm", "--mlp-act", "relu2", "--no-tie-embeddings",
              "--zero-init", "--logit-softcap", "15", "--doc-mask"]
    torchrun("-m", "nextoken", "train", "--data", str(tiny_corpus), "--out-dir", str(run), "--strategy", "fsdp",
             *TINY_FLAGS, *recipe)
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    assert ckpt.step == 6 and ckpt.meta["world_size"] == 2
    state = torch.load(ckpt.path / "state.pt", weights_only=True)["optimizer"]["state"]
    weights = load_file(ckpt.path / "model.safetensors")
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"):
        assert state[name]["momentum_buffer"].shape == weights[name].shape, name
        assert "exp_avg" not in state[name]
    assert state["lm_head.weight"]["exp_avg"].shape == weights["lm_head.weight"].shape
    summary = train_tiny(run, tiny_corpus, resume="auto", max_iters=9, eval_interval=3, eval_iters=2,
                         log_interval=3, warmup_iters=2, optimizer="muon", pos_emb="rope", qk_norm=True,
                         mlp_act="relu2", tie_embeddings=False, zero_init=True, logit_softcap=15.0, doc_mask=True)
    assert summary["steps"] == 9 and summary["world_size"] == 1
    resumed = torch.load(list_checkpoints(run / "checkpoints")[-1].path / "state.pt", weights_only=True)
    assert float(resumed["optimizer"]["state"]["lm_head.weight"]["step"]) == 9  # continued from the 2-rank 6


def test_ranks_stop_together_on_max_time(tmp_path: Path, tiny_corpus: Path) -> None:
    """--max-time under torchrun: the ranks agree on the stopping step and exit cleanly (no hang)."""
    run = tmp_path / "run"
    torchrun("-m", "nextoken", "train", "--data", str(tiny_corpus), "--out-dir", str(run), *TINY_FLAGS,
             "--max-iters", "100000", "--eval-interval", "100000", "--log-interval", "1", "--max-time", "1.5",
             timeout=120)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == "max_time" and 0 < summary["steps"] < 100000
    assert list_checkpoints(run / "checkpoints")[-1].step == summary["steps"]  # the final, collective save


def test_fsdp_llama_family_run_resumes_in_one_process(tmp_path: Path, tiny_corpus: Path) -> None:
    """--arch llama (grouped-query attention, SwiGLU, RMSNorm) with Muon under FSDP: whole checkpoints that one
    process continues."""
    run = tmp_path / "run"
    torchrun("-m", "nextoken", "train", "--data", str(tiny_corpus), "--out-dir", str(run), "--strategy", "fsdp",
             *TINY_FLAGS, "--arch", "llama", "--n-kv-head", "1", "--optimizer", "muon")
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    weights = load_file(ckpt.path / "model.safetensors")
    assert weights["transformer.h.0.attn.c_attn.weight"].shape == ((2 + 2) * 16, 32)  # q | one k head | one v head
    summary = train_tiny(run, tiny_corpus, resume="auto", max_iters=9, eval_interval=3, eval_iters=2, log_interval=3,
                         warmup_iters=2, arch="llama", n_kv_head=1, optimizer="muon")
    assert summary["steps"] == 9 and summary["world_size"] == 1
