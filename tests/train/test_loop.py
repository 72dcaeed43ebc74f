"""Training loop: exact resume, crash-safe checkpoints, the schedule, and clear errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nextoken.errors import UserError
from nextoken.train.checkpoint import find_resume_checkpoint, list_checkpoints, verify_checkpoint
from nextoken.train.config import TrainConfig
from nextoken.train.schedule import lr_at
from nextoken.train.validation import overfit_start
from tests.conftest import stop_process, train_tiny


def _losses(run: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["event"] == "train"}


RECIPE = dict(optimizer="muon", pos_emb="rope", qk_norm=True, mlp_act="relu2", tie_embeddings=False,
              zero_init=True, logit_softcap=15.0, doc_mask=True)


@pytest.mark.parametrize("recipe", [{}, RECIPE], ids=["adamw-gpt2", "muon-recipe"])
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, tiny_corpus, recipe) -> None:
    common = dict(max_iters=16, lr_decay_iters=16, eval_interval=8, log_interval=1, dropout=0.1, **recipe)
    train_tiny(tmp_path / "full", tiny_corpus, **common)
    train_tiny(tmp_path / "split", tiny_corpus, **{**common, "max_iters": 8})
    train_tiny(tmp_path / "split", tiny_corpus, **{**common, "resume": "auto"})
    full, split = _losses(tmp_path / "full"), _losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 17))
    assert [split[s] for s in range(9, 17)] == [full[s] for s in range(9, 17)]  # bit-identical floats


def test_run_folder_contents(tiny_run) -> None:
    for name in ("config.json", "tokenizer.json", "metrics.jsonl", "loss.png", "summary.json", "data/tokens.bin"):
        assert (tiny_run / name).is_file(), name
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["final_val_loss"] < math.log(summary["vocab_size"])
    events = [json.loads(line)["event"] for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "eval", "sample", "summary"} <= set(events)
    evals = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert all(abs(e["val_ppl"] - math.exp(e["val_loss"])) < 1e-6 * e["val_ppl"] for e in evals)


def test_keeps_last_k_and_the_best(tmp_path, tiny_corpus) -> None:
    train_tiny(tmp_path / "r", tiny_corpus, max_iters=30, eval_interval=5, keep_last=2)
    steps = [c.step for c in list_checkpoints(tmp_path / "r" / "checkpoints")]
    assert steps[-2:] == [25, 30] and len(steps) <= 3


def test_kill_9_leaves_the_last_good_checkpoint(tmp_path, tiny_corpus) -> None:
    """SIGKILL inside a checkpoint write (a hidden temporary folder exists, the process frozen with SIGSTOP
    so it cannot finish the write first) leaves the last complete checkpoint, which resumes."""
    run = tmp_path / "r"
    cmd = [sys.executable, "-m", "nextoken", "train", "--data", str(tiny_corpus), "--tokenizer", "char",
           "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8",
           "--max-iters", "100000", "--eval-interval", "3", "--eval-iters", "1", "--sample-tokens", "0",
           "--out-dir", str(run), "--no-progress", "--no-tensorboard", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = run / "checkpoints"
    try:
        deadline = time.time() + 120
        while True:
            assert time.time() < deadline and proc.poll() is None, "never caught a checkpoint mid-write"
            if len(list_checkpoints(ckpts)) >= 2 and any(ckpts.glob(".tmp-step-*")):
                stop_process(proc.pid)  # frozen: what we see now is what the kill will leave
                if any(ckpts.glob(".tmp-step-*")):
                    break
                proc.send_signal(signal.SIGCONT)  # the write finished between the two looks: catch the next
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert any(ckpts.glob(".tmp-step-*"))  # killed inside a write: half a checkpoint lies in the folder
    good = find_resume_checkpoint(ckpts, warn=lambda m: None)
    assert good is not None and good.step == list_checkpoints(ckpts)[-1].step
    verify_checkpoint(good.path)
    # resuming from it works, and the half-written folder is swept away
    train_tiny(run, tiny_corpus, max_iters=good.step + 3, eval_interval=3, resume="auto", sample_tokens=0)
    assert list_checkpoints(ckpts)[-1].step == good.step + 3
    assert not any(ckpts.glob(".tmp-step-*"))


def test_corrupt_checkpoint_is_named(tmp_path, tiny_corpus) -> None:
    train_tiny(tmp_path / "r", tiny_corpus, max_iters=10, eval_interval=5)
    newest = list_checkpoints(tmp_path / "r" / "checkpoints")[-1].path
    with open(newest / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match="corrupt or truncated"):
        verify_checkpoint(newest)
    with pytest.raises(UserError, match="corrupt or truncated"):
        train_tiny(tmp_path / "r", tiny_corpus, max_iters=20, resume=str(newest))
    # auto-resume skips it and falls back to the previous good one
    assert find_resume_checkpoint(tmp_path / "r" / "checkpoints", warn=lambda m: None).step == 5


def test_existing_run_is_not_overwritten(tiny_run, tiny_corpus) -> None:
    before = sorted(p.name for p in (tiny_run / "checkpoints").iterdir())
    with pytest.raises(UserError, match="--resume auto"):
        train_tiny(tiny_run, tiny_corpus)
    assert sorted(p.name for p in (tiny_run / "checkpoints").iterdir()) == before


def test_block_size_longer_than_the_data_is_refused(tmp_path) -> None:
    (tmp_path / "small.txt").write_text("tiny corpus " * 10)
    with pytest.raises(UserError, match="--block-size"):
        train_tiny(tmp_path / "r", tmp_path / "small.txt", block_size=64)


def test_gradient_accumulation_reaches_the_token_target(tmp_path, tiny_corpus) -> None:
    s = train_tiny(tmp_path / "r", tiny_corpus, max_iters=4, eval_interval=4, batch_size=4, tokens_per_step=512)
    assert s["tokens_seen"] == 4 * 512  # 4 micro-batches of 4 x 32 tokens per step


def test_warmup_then_cosine_to_the_floor() -> None:
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110)
    assert lr_at(0, cfg) < lr_at(9, cfg) < 1e-3
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(0.55e-3)
    assert lr_at(110, cfg) == pytest.approx(1e-4) and lr_at(500, cfg) == 1e-4


def test_time_schedule_decays_over_max_time() -> None:
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=10**6, max_time=60,
                      lr_schedule="time")
    assert lr_at(9, cfg, 0.5) < 1e-3  # warmup still counts steps
    assert lr_at(10, cfg, 0.0) == pytest.approx(1e-3)
    assert lr_at(10**5, cfg, 0.5) == pytest.approx(0.55e-3)  # half the time: half-way down the cosine
    assert lr_at(20, cfg, 1.2) == pytest.approx(1e-4)
    short = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110, max_time=60,
                        lr_schedule="time")
    assert lr_at(60, short, 0.1) == pytest.approx(0.55e-3)  # the steps run out first: they set the pace
    assert lr_at(110, short, 0.2) == pytest.approx(1e-4)
    no_clock = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110, lr_schedule="time")
    assert lr_at(60, no_clock, 0.0) == pytest.approx(0.55e-3)  # no --max-time: the steps alone
    with pytest.raises(UserError) as e:
        TrainConfig(lr_schedule="time", max_time=10, lr_decay_iters=100)
    assert e.value.flag == "--lr-decay-iters"


def test_a_time_scheduled_run_ends_decayed(tmp_path, tiny_corpus) -> None:
    s = train_tiny(tmp_path / "r", tiny_corpus, max_iters=10**6, max_time=3.0, lr_schedule="time",
                   eval_interval=10**6, log_interval=1, warmup_iters=2, min_lr=1e-4, learning_rate=3e-3)
    assert s["stopped_by"] == "max_time" and s["steps"] > 5
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
           if '"train"' in line]
    assert lrs[-1] < 1.1e-4 < 2.9e-3 < max(lrs)  # from the peak down to the floor within the budget


def test_overfitting_is_reported() -> None:
    rising = [(0, 3.0, 3.0), (10, 2.0, 2.5), (20, 1.5, 2.6), (30, 1.0, 2.7), (40, 0.5, 2.8)]
    assert overfit_start(rising, patience=3) == 10
    assert overfit_start(rising[:4], patience=3) is None
    falling = [(s, 3.0 - s / 100, 3.0 - s / 100) for s in range(0, 50, 10)]
    assert overfit_start(falling, patience=3) is None


@pytest.mark.parametrize(("flags", "message"), [
    (["--tokenizer", "sentencepiece"], "--tokenizer"),
    (["--tokenizer", "bpe", "--vocab-size", "100"], "--vocab-size"),
    (["--n-embd", "30", "--n-head", "4"], "--n-embd"),
    (["--data", "/nonexistent/corpus.txt"], "--data"),
    (["--config", "/nonexistent.toml"], "--config"),
    (["--dtype", "float16", "--device", "cpu"], "--dtype"),
])
def test_cli_errors_are_one_line_and_name_the_flag(tmp_path, tiny_corpus, flags, message) -> None:
    base = ["--data", str(tiny_corpus)] if "--data" not in flags else []
    r = subprocess.run([sys.executable, "-m", "nextoken", "train", *base, *flags, "--out-dir", str(tmp_path / "r"),
                        "--max-iters", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error:")


def test_config_file_and_flags_precedence(tmp_path) -> None:
    from nextoken.train.settings import resolve_train_config

    (tmp_path / "c.toml").write_text('n-layer = 6\nlearning_rate = 0.01\n')
    cfg = resolve_train_config("nanogpt-cpu", str(tmp_path / "c.toml"), {"learning_rate": 0.02})
    assert (cfg.n_layer, cfg.learning_rate, cfg.n_embd) == (6, 0.02, 128)
    (tmp_path / "bad.yaml").write_text("n_layers: 3\n")
    with pytest.raises(UserError, match="unknown setting 'n_layers'"):
        resolve_train_config(None, str(tmp_path / "bad.yaml"), {})


def test_generate_cli(tiny_run) -> None:
    r = subprocess.run([sys.executable, "-m", "nextoken", "generate", str(tiny_run), "--prompt", "the cat",
                        "--max-new-tokens", "20", "--temperature", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("the cat") and len(r.stdout) > len("the cat")
    bad = subprocess.run([sys.executable, "-m", "nextoken", "generate", str(tiny_run.parent)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a run folder" in bad.stderr


def test_quickstart_help_is_fast_and_torch_free() -> None:
    code = "import sys; from nextoken.cli import main; main(['--help'])"
    r = subprocess.run([sys.executable, "-c", code + "\nprint('torch' in sys.modules)"], capture_output=True,
                       text=True, env={**os.environ}, timeout=60)
    assert "quickstart" in r.stdout


def test_tensorboard_events_are_readable_without_our_code(tmp_path, tiny_corpus) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_tiny(tmp_path / "r", tiny_corpus, max_iters=10, eval_interval=5, tensorboard=True)
    acc = EventAccumulator(str(tmp_path / "r" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "eval/val_loss", "eval/train_loss"} <= tags
    assert [e.step for e in acc.Scalars("eval/val_loss")] == [0, 5, 10]
