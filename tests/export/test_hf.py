"""`nextoken export --format hf` and the way back (``train.hf_import.load_hf_gpt2``, for ``train --init-from``)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from nextoken.cli import main
from nextoken.errors import UserError
from nextoken.export.hf import to_hf_state_dict
from nextoken.train.config import GPTConfig
from nextoken.train.hf_import import CONV1D_SUFFIXES, from_hf_state_dict, gpt2_shapes, load_hf_gpt2
from nextoken.train.model import GPT
from nextoken.train.optim import build_optimizer
from nextoken.train.run import load_run


def _err(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


@pytest.mark.parametrize("cfg", [
    GPTConfig(vocab_size=600, block_size=16, n_layer=2, n_head=2, n_embd=32),  # padded to 640 rows
    GPTConfig(vocab_size=67, block_size=16, n_layer=1, n_head=4, n_embd=32, bias=False),
])
def test_state_dict_round_trip(cfg: GPTConfig) -> None:
    torch.manual_seed(0)
    model = GPT(cfg)
    hf = to_hf_state_dict(model.state_dict(), cfg)
    assert {k: tuple(v.shape) for k, v in hf.items()} == gpt2_shapes(cfg)
    assert hf["transformer.wte.weight"].shape[0] == cfg.vocab_size  # padding rows sliced off
    ours = model.state_dict()
    w = "transformer.h.0.attn.c_attn.weight"
    assert torch.equal(hf[w], ours[w].t())  # Conv1D layout is (in, out)
    if not cfg.bias:
        assert all(not hf[k].any() for k in hf if k.endswith(".bias"))  # GPT-2 with zero biases
    # The way back always has biases (GPT-2 has them); zeros where the model had none compute the same.
    imported = dataclasses.replace(cfg, bias=True)
    back = from_hf_state_dict(hf, imported)
    for k, v in ours.items():
        if k in ("transformer.wte.weight", "lm_head.weight"):
            assert torch.equal(back[k][: cfg.vocab_size], v[: cfg.vocab_size]), k
            assert not back[k][cfg.vocab_size:].any()  # never looked up, never scored
        else:
            assert torch.equal(back[k], v), k
    m2 = GPT(imported)
    m2.load_state_dict(back)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(m2(ids).logits, model(ids).logits)


def test_bias_free_model_loads_in_transformers() -> None:
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPTConfig(vocab_size=67, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=False)
    torch.manual_seed(1)
    model = GPT(cfg).eval()
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=67, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                    activation_function="gelu_new")).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict(), cfg), strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}  # tied to wte by transformers
    hf.tie_weights()
    ids = torch.randint(0, 67, (2, 16))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max().item() <= 1e-5


def test_cli_hf_export_files_card_and_replace(tiny_bpe_run: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "hf"
    assert main(["export", str(tiny_bpe_run), "--format", "hf", "--out", str(out), "--name", "tiny"]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json", "special_tokens_map.json", "README.md"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert cfg["nextoken_export"]["format"] == "hf"
    card = (out / "README.md").read_text()
    summary = json.loads((tiny_bpe_run / "summary.json").read_text())
    assert f"{summary['best_val_loss']:.4f}" in card
    assert "| layers / heads (key/value) / width | 2 / 2 (2) / 32 |" in card
    if "transformers" in card:  # the load check ran (transformers installed)
        assert "max |delta logit|" in card
    assert main(["export", str(tiny_bpe_run), "--format", "hf", "--out", str(out), "--checkpoint", "latest"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # replaced in place, no temp folders left

    other = tmp_path / "not-ours"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert "not a nextoken Hugging Face export" in _err(
        capsys, ["export", str(tiny_bpe_run), "--format", "hf", "--out", str(other)])
    assert (other / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("flags, flag", [
    (["--format", "hf", "--opset", "18"], "--opset"),
    (["--format", "hf", "--quantize", "int8"], "--quantize"),
    (["--format", "hf", "--dtype", "fp16"], "--dtype"),
    (["--format", "gguf", "--version", "2"], "--version"),
])
def test_cli_flags_that_do_not_apply(tiny_bpe_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     flags: list[str], flag: str) -> None:
    out = tmp_path / ("m.gguf" if "gguf" in flags else "hf")
    assert flag in _err(capsys, ["export", str(tiny_bpe_run), "--out", str(out), *flags])
    assert not out.exists()


def test_non_gpt2_architecture_is_refused_by_name(tiny_bpe_run: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A recipe option away from GPT-2 (rotary positions, say) must not be written as GPT-2 weights."""
    monkeypatch.setattr(GPTConfig, "non_gpt2_options", lambda self: ["pos_emb", "qk_norm"])
    for fmt, out in (("hf", tmp_path / "hf"), ("gguf", tmp_path / "m.gguf")):
        err = _err(capsys, ["export", str(tiny_bpe_run), "--format", fmt, "--out", str(out)])
        assert "--format" in err and "pos_emb, qk_norm" in err and "--format onnx" in err
        assert not out.exists()


def test_load_hf_gpt2_is_the_checkpoint(tiny_bpe_run: Path, tmp_path: Path) -> None:
    from nextoken.export.hf import export_hf

    out = export_hf(tiny_bpe_run, tmp_path / "hf", log=None)
    loaded = load_hf_gpt2(out)
    run = load_run(tiny_bpe_run)
    assert loaded.config == run.model.config
    assert loaded.tokenizer.to_str() == run.tokenizer.to_str()
    model = GPT(loaded.config)
    model.load_state_dict(loaded.state_dict)
    ids = torch.randint(0, loaded.config.vocab_size, (2, loaded.config.block_size))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, run.model(ids).logits)

    # A GPT2Model-style folder (no "transformer." prefix, legacy mask buffers) with a slow tokenizer
    # (vocab.json + merges.txt) loads to the same weights and the same tokenization.
    from safetensors.torch import load_file, save_file

    legacy = tmp_path / "legacy"
    shutil.copytree(out, legacy)
    state = {k.removeprefix("transformer."): v for k, v in load_file(legacy / "model.safetensors").items()}
    state["h.0.attn.bias"] = torch.ones(1, 1, 4, 4)
    save_file(state, legacy / "model.safetensors")
    run.tokenizer.model.save(str(legacy))  # vocab.json, merges.txt
    (legacy / "tokenizer.json").unlink()
    again = load_hf_gpt2(legacy)
    assert all(torch.equal(again.state_dict[k], v) for k, v in loaded.state_dict.items())
    text = "the cat sat on the mat.<|endoftext|>HELLO"
    assert again.tokenizer.encode(text).ids == run.tokenizer.encode(text).ids


@pytest.mark.parametrize("field, value", [
    ("activation_function", "relu"), ("add_cross_attention", True), ("scale_attn_by_inverse_layer_idx", True),
    ("tie_word_embeddings", False), ("model_type", "mixtral"),
])
def test_load_hf_gpt2_refuses_what_our_gpt_cannot_be(tiny_bpe_run: Path, tmp_path: Path, field: str,
                                                     value: object) -> None:
    from nextoken.export.hf import export_hf

    out = export_hf(tiny_bpe_run, tmp_path / "hf", log=None, verify=False)
    cfg = json.loads((out / "config.json").read_text())
    cfg[field] = value
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=field) as e:
        load_hf_gpt2(out)
    assert e.value.flag == "--init-from"


def test_conv1d_suffixes_cover_the_four_matrices() -> None:
    cfg = GPTConfig(vocab_size=10, block_size=4, n_layer=1, n_head=1, n_embd=8)
    transposed = sorted(k for k in gpt2_shapes(cfg) if k.endswith(CONV1D_SUFFIXES))
    assert transposed == ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
                          "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"]


def test_init_from_hf_continues_where_the_checkpoint_stood(tiny_bpe_run: Path, tmp_path: Path) -> None:
    """What `train --init-from` does with the folder: same loss as the checkpoint on the same batch (not
    log(vocab) of a fresh model), and training steps from there lower it."""
    from nextoken.export.hf import export_hf
    from nextoken.train.data import TokenData, windows
    from nextoken.train.hf_import import init_from_hf

    out = export_hf(tiny_bpe_run, tmp_path / "hf", log=None, verify=False)
    with pytest.raises(UserError, match="n_positions") as e:
        init_from_hf(out, dropout=0.0, block_size=64)
    assert e.value.flag == "--block-size"
    init = init_from_hf(out, dropout=0.1, block_size=16)
    assert init.config.dropout == 0.1
    model = GPT(init.config)
    model.load_state_dict(init.state_dict)
    original = load_run(tiny_bpe_run).model
    data = TokenData(tiny_bpe_run / "data")
    x, y = windows(data.train, list(range(0, 160, 20)), 16)
    model.eval()
    with torch.no_grad():
        start = model(x, y).loss.item()
        assert start == pytest.approx(original(x, y).loss.item(), abs=1e-6)
    assert start < 0.8 * math.log(init.config.vocab_size)
    model.train()
    opt = build_optimizer(model, optimizer="adamw", learning_rate=1e-3, weight_decay=0.0, betas=(0.9, 0.99),
                          device_type="cpu")
    for _ in range(5):
        loss = model(x, y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert model(x, y).loss.item() < start
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied after loading
