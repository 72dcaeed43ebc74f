"""The recipe options in the model: each keeps cached decoding equal to the full forward pass
(left padding included) and does what its name says.

Every equivalence test runs on every option alone and on all of them together: a variant whose
cached path and full path disagreed (rotary at the wrong positions, a norm applied on one path
only, a cap on one path only) fails here before any export is tried.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from nextoken.errors import UserError
from nextoken.train.checkpoint import list_checkpoints
from nextoken.train.config import GPT2_ARCHITECTURE, GPTConfig, TrainConfig
from nextoken.train.data import document_layout
from nextoken.train.model import GPT, position_ids_from_mask
from nextoken.train.run import load_run
from tests.conftest import train_tiny

V = 50
# option name -> GPTConfig overrides; "all" is the whole recipe at once
VARIANTS: dict[str, dict] = {
    "gpt2": {},
    "rope": {"pos_emb": "rope"},
    "qk_norm": {"qk_norm": True},
    "relu2": {"mlp_act": "relu2"},
    "untied": {"tie_embeddings": False},
    "zero_init": {"zero_init": True},
    "softcap": {"logit_softcap": 5.0},
    "all": {"pos_emb": "rope", "qk_norm": True, "mlp_act": "relu2", "tie_embeddings": False, "zero_init": True,
            "logit_softcap": 5.0},
}


def make(variant: str, seed: int = 0, perturb: bool = True) -> GPT:
    """A tiny model of ``variant``. ``perturb`` moves every weight off its init, so zero-initialised
    projections, unit gains and a uniform head do not make paths agree by being trivial."""
    torch.manual_seed(seed)
    m = GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=16, **VARIANTS[variant]))
    if perturb:
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_cached_decode_equals_full_forward(variant: str) -> None:
    model = make(variant)
    x = torch.randint(0, V, (3, 12))
    full = model(x).logits  # (B, T, V), the training path (is_causal SDPA)
    out = model(x[:, :5], use_cache=True)
    steps, cache = [out.logits], out.present_key_values
    for t in range(5, 12):
        out = model(x[:, t: t + 1], past_key_values=cache, use_cache=True)
        cache = out.present_key_values
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert full.std() > 1e-2  # not a constant output agreeing with itself


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_left_padded_batch_matches_each_row_alone(variant: str) -> None:
    model = make(variant)
    prompts = [[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model(ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True)
    assert torch.isfinite(out.logits).all()
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    mask2 = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
    pos2 = mask2.sum(1, keepdim=True) - 1
    step = model(nxt, attention_mask=mask2, position_ids=pos2, past_key_values=out.present_key_values,
                 use_cache=True)
    for b, p in enumerate(prompts):
        alone = model(torch.tensor([p + [nxt[b].item()]])).logits
        torch.testing.assert_close(out.logits[b, -1], alone[0, len(p) - 1], atol=1e-5, rtol=0)
        torch.testing.assert_close(step.logits[b, -1], alone[0, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_counts_parameters(variant: str) -> None:
    model = make(variant, perturb=False)
    assert model.config.num_params() == model.num_params()
    assert model.config.num_params(non_embedding=False) == model.num_params(non_embedding=False)


def test_each_architecture_option_is_named_for_gpt2_loaders() -> None:
    assert GPTConfig().non_gpt2_options() == []
    assert GPTConfig(zero_init=True).non_gpt2_options() == []  # only the starting weights differ
    for variant, overrides in VARIANTS.items():
        if variant in ("gpt2", "zero_init", "all"):
            continue
        assert GPTConfig(**overrides).non_gpt2_options() == list(overrides), variant
    assert set(GPTConfig(**VARIANTS["all"]).non_gpt2_options()) == set(GPT2_ARCHITECTURE)
    # a config.json written before the options existed is a GPT-2
    old = {k: v for k, v in GPTConfig().to_dict().items() if k not in GPT2_ARCHITECTURE and k != "zero_init"}
    assert GPTConfig.from_dict(old) == GPTConfig()


@torch.no_grad()
def test_rope_depends_on_relative_positions_only() -> None:
    """Shifting every position by 7 changes nothing with rotary embeddings (and no position table);
    rotating q alone, or at a position other than k's, would break this."""
    model = make("rope")
    assert "wpe" not in model.transformer
    x = torch.randint(0, V, (2, 10))
    pos = torch.arange(10)[None]  # (1, T)
    mask = torch.ones(2, 10, dtype=torch.long)
    a = model(x, attention_mask=mask, position_ids=pos, use_cache=True).logits
    b = model(x, attention_mask=mask, position_ids=pos + 7, use_cache=True).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # ... while a learned table does see absolute positions
    gpt2 = make("gpt2")
    c = gpt2(x, attention_mask=mask, position_ids=pos, use_cache=True).logits
    d = gpt2(x, attention_mask=mask, position_ids=pos + 7, use_cache=True).logits
    assert (c - d).abs().max() > 1e-3


@torch.no_grad()
def test_qk_norm_gives_unit_rms_queries_and_keys() -> None:
    model = make("qk_norm", perturb=False)
    attn = model.transformer.h[0].attn
    q, k, _ = attn.qkv(torch.randn(2, 5, 16) * 3, torch.arange(5)[None])  # each (B, nh, T, hs)
    for t in (q, k):
        torch.testing.assert_close(t.pow(2).mean(-1), torch.ones(2, 2, 5), atol=1e-3, rtol=0)  # eps 1e-6 on small q
    assert attn.q_norm.weight.shape == (8,)  # a learned gain per head channel


@torch.no_grad()
def test_relu2_activation() -> None:
    mlp = make("relu2").transformer.h[0].mlp
    h = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0])
    assert mlp.gelu(h).tolist() == [0.0, 0.0, 0.0, 0.25, 9.0]


def test_untied_head_and_zero_init() -> None:
    model = make("all", perturb=False)
    assert not model.tied and model.lm_head.weight is not model.transformer.wte.weight
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight") or name == "lm_head.weight":
            assert p.abs().max() == 0, name
    x = torch.randint(0, V, (2, 8))
    # a zero head predicts uniformly: the first loss is exactly log(vocab)
    assert model(x, x).loss.item() == pytest.approx(math.log(V), abs=1e-6)
    # The zero head gets a gradient at once; it is also why nothing below it does on the first
    # step (the residual stream's gradient is head^T (p - y) = 0), only from the second on.
    model.train()
    model(x, x).loss.backward()
    assert model.lm_head.weight.grad.abs().max() > 0
    tied = make("zero_init", perturb=False)
    assert tied.tied and tied.lm_head.weight.abs().max() > 0  # a tied head is the embedding: not zeroed


@torch.no_grad()
def test_soft_capped_logits_stay_inside_the_cap() -> None:
    model = make("softcap")
    with torch.no_grad():
        model.lm_head.weight.mul_(100)  # raw logits far beyond the cap
    logits = model(torch.randint(0, V, (2, 8))).logits
    assert logits.abs().max() <= 5.0 and logits.abs().max() > 4.9  # tanh saturates to 1.0 in float32
    raw = model.lm_head(model.transformer.ln_f(torch.randn(1, 1, 16)))[0, 0]  # uncapped logits (V,)
    assert raw.abs().max() > 50


def test_document_layout() -> None:
    eot = 0
    x = torch.tensor([[5, 6, 0, 7, 8, 0, 9], [0, 1, 2, 3, 4, 5, 6]])
    docs, pos = document_layout(x, eot)
    assert docs.tolist() == [[0, 0, 1, 1, 1, 2, 2], [1, 1, 1, 1, 1, 1, 1]]
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5, 6]]


@pytest.mark.parametrize("variant", ["gpt2", "all"])
@torch.no_grad()
def test_document_mask_makes_each_document_see_only_itself(variant: str) -> None:
    """With the mask, the second document's logits are those of that document alone (from its
    <|endoftext|> at position 0), whatever came before it in the window."""
    model = make(variant)
    eot = 0
    first, second = [5, 6, 7, 8, 9], [eot, 11, 12, 13]
    x = torch.tensor([first + second])
    docs, pos = document_layout(x, eot)
    masked = model(x, document_ids=docs, position_ids=pos).logits
    alone = model(torch.tensor([second])).logits
    torch.testing.assert_close(masked[0, len(first):], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(masked[0, : len(first)], model(torch.tensor([first])).logits[0], atol=1e-5, rtol=0)
    plain = model(x).logits  # without the mask the second document sees the first
    assert (plain[0, len(first):] - alone[0]).abs().max() > 1e-3


@pytest.mark.parametrize(("overrides", "flag"), [
    ({"pos_emb": "alibi"}, "--pos-emb"),
    ({"mlp_act": "swiglu"}, "--mlp-act"),
    ({"logit_softcap": -1.0}, "--logit-softcap"),
    ({"rope_base": 500.0}, "--rope-base"),  # without --pos-emb rope it would do nothing
    ({"muon_lr": 0.05}, "--muon-lr"),  # without --optimizer muon it would do nothing
    ({"optimizer": "lion"}, "--optimizer"),
    ({"optimizer": "muon", "muon_momentum": 1.0}, "--muon-momentum"),
    ({"optimizer": "muon", "muon_ns_steps": 0}, "--muon-ns-steps"),
    ({"pos_emb": "rope", "n_embd": 36, "n_head": 4}, "--pos-emb"),  # odd head size 9
])
def test_bad_recipe_settings_name_the_flag(overrides: dict, flag: str) -> None:
    with pytest.raises(UserError) as e:
        TrainConfig(**overrides)
    assert e.value.flag == flag


def test_cli_flags_reach_the_saved_config(tmp_path, tiny_corpus) -> None:
    run = tmp_path / "r"
    flags = ["--pos-emb", "rope", "--rope-base", "500", "--qk-norm", "--mlp-act", "relu2", "--no-tie-embeddings",
             "--zero-init", "--logit-softcap", "20", "--doc-mask", "--optimizer", "muon", "--muon-lr", "0.03",
             "--muon-momentum", "0.9", "--muon-ns-steps", "4"]
    r = subprocess.run([sys.executable, "-m", "nextoken", "train", "--data", str(tiny_corpus), "--tokenizer", "char",
                        "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--max-iters", "2",
                        "--eval-interval", "2", "--eval-iters", "1", "--sample-tokens", "4", "--no-progress",
                        "--no-tensorboard", "--threads", "1", "--out-dir", str(run), *flags],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((run / "config.json").read_text())
    assert {k: cfg["model"][k] for k in ("pos_emb", "rope_base", "qk_norm", "mlp_act", "tie_embeddings",
                                         "zero_init", "logit_softcap")} == {
        "pos_emb": "rope", "rope_base": 500.0, "qk_norm": True, "mlp_act": "relu2", "tie_embeddings": False,
        "zero_init": True, "logit_softcap": 20.0}
    assert {k: cfg["train"][k] for k in ("doc_mask", "optimizer", "muon_lr", "muon_momentum", "muon_ns_steps")} == {
        "doc_mask": True, "optimizer": "muon", "muon_lr": 0.03, "muon_momentum": 0.9, "muon_ns_steps": 4}


def test_untied_run_checkpoints_its_head_and_loads_back(tmp_path, tiny_corpus) -> None:
    from safetensors.torch import load_file

    run = tmp_path / "r"
    train_tiny(run, tiny_corpus, max_iters=6, eval_interval=3, **VARIANTS["all"], doc_mask=True, optimizer="muon")
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    weights = load_file(ckpt.path / "model.safetensors")
    assert "lm_head.weight" in weights and "transformer.wpe.weight" not in weights
    assert not torch.equal(weights["lm_head.weight"], weights["transformer.wte.weight"])
    loaded = load_run(run, "latest")
    torch.testing.assert_close(loaded.model.lm_head.weight, weights["lm_head.weight"], atol=0, rtol=0)
    assert loaded.model.lm_head.weight.abs().max() > 0  # trained away from its zero init


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_recipe_trains_on_cuda_in_bfloat16(tmp_path, tiny_corpus) -> None:
    s = train_tiny(tmp_path / "r", tiny_corpus, device="cuda", dtype="bfloat16", max_iters=20, eval_interval=10,
                   **VARIANTS["all"], optimizer="muon", doc_mask=True)
    assert s["steps"] == 20 and s["final_val_loss"] < math.log(s["vocab_size"])
    assert load_run(tmp_path / "r", "latest").model.config.pos_emb == "rope"
