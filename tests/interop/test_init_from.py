"""`nextoken train --init-from HF_DIR`: continue training a GPT-2-layout folder (ours or anyone's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nextoken.errors import UserError
from nextoken.train.settings import resolve_train_config


def test_a_run_starts_from_the_folders_weights_tokenizer_and_architecture(
        interop_hf: Path, tiny_corpus: Path, tmp_path: Path) -> None:
    from nextoken.train.hf_import import load_hf_gpt2
    from nextoken.train.loop import train
    from nextoken.train.run import load_run

    # One AdamW step at a learning rate of 1e-12 (the quickstart's Muon would move the weights by
    # its own rate): the checkpoint holds the starting weights to ~1e-9.
    cfg = resolve_train_config("quickstart", None, dict(
        init_from=str(interop_hf), data=[str(tiny_corpus)], out_dir=str(tmp_path / "run"), max_iters=1,
        optimizer="adamw",
        warmup_iters=0, learning_rate=1e-12, min_lr=1e-12, weight_decay=0.0, eval_interval=1, eval_iters=1,
        batch_size=2, max_time=0.0, max_corpus_chars=0, progress=False, tensorboard=False, threads=1))
    train(cfg, quiet=True)

    hf = load_hf_gpt2(interop_hf)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):  # the preset's shape gave way
        assert saved["model"][name] == getattr(hf.config, name), name
        assert saved["train"][name] == getattr(hf.config, name), name
    assert saved["train"]["tokenizer"] == "bpe" and saved["train"]["init_from"] == str(interop_hf)
    run_tok = json.loads((tmp_path / "run" / "tokenizer.json").read_text())
    assert run_tok["model"]["vocab"] == json.loads(hf.tokenizer.to_str())["model"]["vocab"]

    state = load_run(tmp_path / "run", "latest").model.state_dict()
    for name, want in hf.state_dict.items():
        assert torch.allclose(state[name], want, atol=1e-6), name


def test_architecture_flags_are_refused_by_name(interop_hf: Path) -> None:
    for flag, value in (("n_layer", 8), ("tokenizer", "char"), ("pos_emb", "rope"), ("zero_init", True)):
        with pytest.raises(UserError) as e:
            resolve_train_config(None, None, {"init_from": str(interop_hf), flag: value})
        assert e.value.flag == "--" + flag.replace("_", "-")
    hf_context = json.loads((interop_hf / "config.json").read_text())["n_positions"]
    with pytest.raises(UserError) as e:
        resolve_train_config(None, None, {"init_from": str(interop_hf), "block_size": hf_context + 1})
    assert e.value.flag == "--block-size"
    shorter = resolve_train_config(None, None, {"init_from": str(interop_hf), "block_size": hf_context // 2})
    assert shorter.block_size == hf_context // 2  # a shorter training window is a training choice


def test_the_cli_names_the_flag_and_a_folder_that_is_not_gpt2(interop_hf: Path, tmp_path: Path) -> None:
    def train_cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "nextoken", "train", *args, "--out-dir", str(tmp_path / "r")],
                              capture_output=True, text=True, timeout=120)

    r = train_cli("--init-from", str(interop_hf), "--n-embd", "64")
    assert r.returncode == 2 and "--n-embd" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    r = train_cli("--init-from", str(tmp_path / "other"))
    assert r.returncode == 2 and "--init-from" in r.stderr and "llama" in r.stderr and "Traceback" not in r.stderr
