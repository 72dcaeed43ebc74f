"""The llama family in train/: equal to transformers' Llama / Qwen2 / Mistral, trains, resumes, refuses by name.

The Hugging Face folders are ``tests/hf_folders.py``'s (random weights made with transformers, sharded,
bf16 / f16 / fp32). Equal logits on 2 x 40 random tokens, through the full and the cached path, leave
no room for a misplaced head, rotary pair or bias.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nextoken.errors import UserError
from nextoken.train.config import GPTConfig, TrainConfig
from nextoken.train.hf_config import hf_config
from tests.conftest import train_tiny
from tests.hf_folders import CASES


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_transformers_full_and_cached(hf_folders, case: str) -> None:
    from nextoken.train.hf_import import load_hf
    from nextoken.train.model import GPT

    ref = hf_folders.reference(case)
    hf = load_hf(hf_folders.folder(case))
    ours = GPT.from_state_dict(hf.config, hf.state_dict).eval()
    assert ours.tied == hf.config.tie_embeddings
    ids = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits  # (2, 40, vocab)
        assert (ours(ids).logits - want).abs().max().item() <= 1e-4
        first = ours(ids[:, :29], use_cache=True)
        rest = ours(ids[:, 29:], past_key_values=first.present_key_values, use_cache=True)
        assert (rest.logits - want[:, 29:]).abs().max().item() <= 1e-4
        assert first.present_key_values[0][0].shape[1] == hf.config.n_kv_head  # the cache holds the kv heads


def test_config_fields_are_read_as_the_folder_says(hf_folders) -> None:
    from nextoken.train.hf_import import load_hf

    qwen = load_hf(hf_folders.folder("qwen2"))
    c = qwen.config
    assert (c.arch, c.n_kv_head, c.qkv_bias, c.tie_embeddings, c.rope_base) == ("llama", 2, True, True, 1e6)
    llama3 = read_config(hf_folders.folder("llama3"))
    assert llama3.rope_scaling["rope_type"] == "llama3" and not llama3.tie_embeddings
    assert qwen.files.chat_template and qwen.files.eos_token_ids == [2, 0]
    assert qwen.files.tokenizer_config["bos_token"] is None and qwen.files.tokenizer_config["add_bos_token"] is False
    l3 = load_hf(hf_folders.folder("llama3")).files.tokenizer_config
    assert l3["add_bos_token"] is True and l3["bos_token"] == "<|begin_of_text|>"  # the post-processor adds it


def read_config(folder: Path) -> GPTConfig:
    return hf_config(json.loads((folder / "config.json").read_text()), folder)


BASE = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "vocab_size": 300, "intermediate_size": 128, "max_position_embeddings": 128}


@pytest.mark.parametrize("field, value", [
    ("sliding_window", 32), ("num_local_experts", 8), ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
    ("hidden_act", "gelu"), ("attention_bias", True), ("model_type", "mixtral"),
])
def test_what_cannot_be_computed_is_refused_naming_the_field(field: str, value: object, tmp_path: Path) -> None:
    hf = {**BASE, field: value}
    with pytest.raises(UserError) as e:
        hf_config(hf, tmp_path)
    assert field in str(e.value) and e.value.flag == "--init-from"
    hf_config({**BASE, "sliding_window": 128}, tmp_path)  # a window as long as the context is no window
    hf_config({**BASE, "model_type": "qwen2", "sliding_window": 32, "use_sliding_window": False}, tmp_path)


def test_arch_flags_are_checked_by_name() -> None:
    with pytest.raises(UserError) as e:
        TrainConfig(n_kv_head=2)
    assert e.value.flag == "--n-kv-head"
    with pytest.raises(UserError) as e:
        TrainConfig(arch="llama", mlp_act="relu2")
    assert e.value.flag == "--mlp-act"
    with pytest.raises(UserError) as e:
        TrainConfig(arch="llama", n_head=4, n_kv_head=3)
    assert e.value.flag == "--n-kv-head"
    cfg = TrainConfig(arch="llama", n_kv_head=2)
    assert (cfg.pos_emb, cfg.mlp_act, cfg.bias) == ("rope", "swiglu", False)  # the family's own
    m = cfg.model_config(300)
    assert (m.n_kv_head, m.head_dim, m.intermediate_size) == (2, 32, 384)


def test_num_params_matches_the_model() -> None:
    from nextoken.train.model import GPT

    for cfg in (GPTConfig(arch="llama", n_kv_head=2, qkv_bias=True, tie_embeddings=False, head_dim=24),
                GPTConfig(arch="llama", n_kv_head=1), GPTConfig(intermediate_size=200)):
        assert GPT(cfg).num_params() == cfg.num_params()


def test_arch_llama_trains_with_muon_and_resumes_exactly(tiny_corpus: Path, tmp_path: Path) -> None:
    """20 steps straight, and 10 then a resume to 20: the same losses bit for bit (CPU, one thread)."""
    from nextoken.train.run import load_run

    settings = dict(tokenizer="bpe", arch="llama", n_kv_head=1, n_head=2, optimizer="muon", max_iters=20,
                    lr_decay_iters=20, eval_interval=10, zero_init=True)  # one schedule for both
    straight = train_tiny(tmp_path / "a", tiny_corpus, **settings)
    train_tiny(tmp_path / "b", tiny_corpus, **{**settings, "max_iters": 10})
    resumed = train_tiny(tmp_path / "b", tiny_corpus, **{**settings, "resume": "auto"})
    assert resumed["final_val_loss"] == straight["final_val_loss"]
    saved = json.loads((tmp_path / "a" / "config.json").read_text())["model"]
    assert (saved["arch"], saved["n_kv_head"], saved["mlp_act"], saved["pos_emb"]) == ("llama", 1, "swiglu", "rope")
    model = load_run(tmp_path / "a", "latest").model
    assert model.transformer.h[0].attn.c_attn.weight.shape == ((2 + 2 * 1) * 16, 32)
    assert "wpe" not in model.transformer and type(model.transformer.ln_f).__name__ == "RMSNorm"


def test_init_from_a_llama_family_folder_starts_from_its_weights(hf_folders, tiny_corpus: Path,
                                                                tmp_path: Path) -> None:
    from nextoken.train.hf_import import load_hf
    from nextoken.train.loop import train
    from nextoken.train.run import load_run
    from nextoken.train.settings import resolve_train_config

    folder = hf_folders.folder("qwen2")
    # One AdamW step at a learning rate of 1e-12: the checkpoint holds the starting weights to ~1e-9.
    cfg = resolve_train_config("quickstart", None, dict(
        init_from=str(folder), data=[str(tiny_corpus)], out_dir=str(tmp_path / "run"), max_iters=1,
        optimizer="adamw", warmup_iters=0, learning_rate=1e-12, min_lr=1e-12, weight_decay=0.0, eval_interval=1,
        eval_iters=1, batch_size=2, block_size=32, max_time=0.0, max_corpus_chars=0, progress=False,
        tensorboard=False, threads=1))
    assert (cfg.arch, cfg.qkv_bias, cfg.mlp_act) == ("llama", True, "swiglu")  # the preset's recipe gave way
    train(cfg, quiet=True)
    hf = load_hf(folder)
    state = load_run(tmp_path / "run", "latest").model.state_dict()
    for name, want in hf.state_dict.items():
        assert torch.allclose(state[name], want, atol=1e-6), name
    run = tmp_path / "run"
    assert json.loads((run / "tokenizer_config.json").read_text())["chat_template"] == hf.files.chat_template
    assert json.loads((run / "config.json").read_text())["tokenizer"]["eos_token_id"] == 2  # <|im_end|>
