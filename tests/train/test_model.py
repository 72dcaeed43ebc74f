"""The GPT: cached decoding equals the full forward pass, left padding included; loss and init."""

from __future__ import annotations

import math

import pytest
import torch

from nextoken.train.config import GPTConfig
from nextoken.train.model import GPT, build_attention_mask, position_ids_from_mask
from nextoken.train.optim import build_optimizer


@pytest.fixture()
def model() -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=16))
    return m.eval()


def test_fresh_model_loss_is_near_log_vocab(model: GPT) -> None:
    x = torch.randint(0, 50, (4, 16))
    loss = model(x, torch.roll(x, -1, 1)).loss
    assert abs(loss.item() - math.log(50)) < 0.3


def test_lm_head_is_tied(model: GPT) -> None:
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


@torch.no_grad()
def test_cached_decode_equals_full_forward(model: GPT) -> None:
    x = torch.randint(0, 50, (3, 12))
    full = model(x).logits  # (B, T, V), the training path (is_causal SDPA)
    out = model(x[:, :5], use_cache=True)
    steps = [out.logits]
    cache = out.present_key_values
    for t in range(5, 12):
        out = model(x[:, t: t + 1], past_key_values=cache, use_cache=True)
        cache = out.present_key_values
        steps.append(out.logits)
    cached = torch.cat(steps, dim=1)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_left_padded_batch_matches_each_row_alone(model: GPT) -> None:
    prompts = [[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model(ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True)
    assert torch.isfinite(out.logits).all()  # padded query rows are never fully masked
    # one decode step for the whole batch
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    mask2 = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
    pos2 = mask2.sum(1, keepdim=True) - 1
    step = model(nxt, attention_mask=mask2, position_ids=pos2, past_key_values=out.present_key_values,
                 use_cache=True)
    for b, p in enumerate(prompts):
        alone = model(torch.tensor([p + [nxt[b].item()]])).logits
        torch.testing.assert_close(out.logits[b, -1], alone[0, len(p) - 1], atol=1e-5, rtol=0)
        torch.testing.assert_close(step.logits[b, -1], alone[0, -1], atol=1e-5, rtol=0)


def test_mask_is_built_in_cache_slot_space() -> None:
    mask = torch.tensor([[0, 1, 1, 1]])
    m = build_attention_mask(mask, q_len=1, past_len=3)[0, 0]  # one query behind a cache of 3
    assert m.tolist() == [[False, True, True, True]]
    prefill = build_attention_mask(mask, q_len=4, past_len=0)[0, 0]
    assert prefill[0].tolist() == [True, False, False, False]  # the pad row sees only itself
    assert prefill[2].tolist() == [False, True, True, False]


def test_too_long_input_is_refused(model: GPT) -> None:
    with pytest.raises(ValueError, match="block_size 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_activation_checkpointing_gives_the_same_gradients(model: GPT) -> None:
    x = torch.randint(0, 50, (2, 16))
    model.train()
    model(x, x).loss.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = True
    model(x, x).loss.backward()
    for a, p in zip(ref, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a)


def test_generate_extends_past_the_context_window(model: GPT) -> None:
    out = model.generate(torch.tensor([[1, 2, 3]]), 60, temperature=0)
    assert out.shape == (1, 63)


def test_optimizer_decays_matrices_only(model: GPT) -> None:
    opt = build_optimizer(model, optimizer="adamw", learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.95),
                          device_type="cpu")
    decay, no_decay = opt.param_groups
    assert all(p.dim() == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0


def test_config_counts_parameters(model: GPT) -> None:
    assert model.config.num_params() == model.num_params()
