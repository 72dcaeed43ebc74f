"""`nextoken inspect` / `nextoken attention` on a real tiny run, the overfitting check, the loss plot flag.

Every number is checked against an independent computation on the same model (the training
loss, ``GPT.generate``, the fused SDPA path), so a table that merely looks plausible fails.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from nextoken.cli import main
from nextoken.errors import UserError
from nextoken.train import probe as I
from nextoken.train.run import load_run
from nextoken.train.tokenizer import EOT
from nextoken.train.validation import overfit_start
from tests.conftest import train_tiny


@pytest.fixture(scope="module")
def loaded(tiny_run: Path):
    torch.set_num_threads(1)
    return load_run(tiny_run, "latest")


def test_next_token_table_is_the_models_softmax(loaded) -> None:
    model, tok = loaded.model, loaded.tokenizer
    (step,) = I.next_token_steps(model, tok, "the cat sat on the ", top_k=5)
    ids = [tok.token_to_id(EOT)] + tok.encode("the cat sat on the ", add_special_tokens=False).ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    probs = logits.softmax(-1)
    assert [c.rank for c in step.candidates] == [1, 2, 3, 4, 5]
    top = torch.topk(probs, 5)
    assert [c.token_id for c in step.candidates] == top.indices.tolist()
    for c in step.candidates:
        assert c.probability == pytest.approx(float(probs[c.token_id]), rel=1e-5)
        assert c.logit == pytest.approx(float(logits[c.token_id]), rel=1e-5)
        assert c.token == tok.decode([c.token_id])
    # Greedy: the chosen token is the top row; the corpus repeats "the mat" / "the rug" often.
    assert step.chosen_id == step.candidates[0].token_id and step.chosen_rank == 1
    assert step.entropy == pytest.approx(float(-(probs * probs.log()).sum()), rel=1e-4)


def test_greedy_steps_follow_generate(loaded) -> None:
    model, tok = loaded.model, loaded.tokenizer
    steps = I.next_token_steps(model, tok, "hello ", top_k=3, steps=6, temperature=0)
    assert len(steps) == 6 and [s.step for s in steps] == list(range(6))
    assert all(s.chosen_rank == 1 for s in steps)
    ids = [tok.token_to_id(EOT)] + tok.encode("hello ", add_special_tokens=False).ids
    ref = model.generate(torch.tensor([ids]), 6, temperature=0)[0, len(ids):].tolist()
    assert [s.chosen_id for s in steps] == ref
    # Each step's context is the prompt plus what was chosen before it.
    assert steps[3].context == "hello " + "".join(s.chosen for s in steps[:3])


def test_sampled_steps_are_seeded(loaded) -> None:
    model, tok = loaded.model, loaded.tokenizer
    a = I.next_token_steps(model, tok, "the ", steps=8, temperature=1.5, seed=3)
    b = I.next_token_steps(model, tok, "the ", steps=8, temperature=1.5, seed=3)
    assert [s.chosen_id for s in a] == [s.chosen_id for s in b]
    for s in a:  # the reported probability is the untempered one of the token actually taken
        assert 0 < s.chosen_probability <= 1 and s.chosen_rank >= 1


def test_text_loss_matches_training_loss(loaded) -> None:
    model, tok = loaded.model, loaded.tokenizer
    text = "the dog sat on the mat. zzz"
    result = I.text_loss(model, tok, text)
    ids = [tok.token_to_id(EOT)] + tok.encode(text, add_special_tokens=False).ids
    with torch.no_grad():
        ref = model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])).loss.item()
    assert len(result.tokens) == len(ids) - 1
    assert result.mean_loss == pytest.approx(ref, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(ref), rel=1e-5)
    losses = [t.loss for t in result.tokens]
    assert result.most_surprising == losses.index(max(losses))
    for t in result.tokens:
        assert t.probability == pytest.approx(math.exp(-t.loss), rel=1e-6)
    # "zzz" never occurs in the corpus: the model must find it more surprising than "the".
    assert result.tokens[-1].loss > result.tokens[1].loss


def test_text_loss_bad_input(loaded) -> None:
    with pytest.raises(UserError, match="--text"):
        I.text_loss(loaded.model, loaded.tokenizer, "")
    with pytest.raises(UserError, match="--text.*context is 32"):
        I.text_loss(loaded.model, loaded.tokenizer, "a" * 40)
    with pytest.raises(UserError, match="--top-k"):
        I.next_token_steps(loaded.model, loaded.tokenizer, "a", top_k=0)


def test_attention_weights_are_causal_distributions_that_reproduce_sdpa(loaded) -> None:
    model, tok = loaded.model, loaded.tokenizer
    text = "the cat sat on the mat"
    result = I.attention_maps(model, tok, text)
    T = len(text) + 1  # characters plus the separator
    assert result.labels[0] == "<eot>" and result.labels[4] == "\u2423" and len(result.labels) == T
    # Capture each attention module's input and output on the ordinary (fused SDPA) forward.
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [block.attn.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, (args[0], out[0])))
             for i, block in enumerate(model.transformer.h)]
    try:
        ids = [tok.token_to_id(EOT)] + tok.encode(text, add_special_tokens=False).ids
        model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    for layer, w in zip(result.layers, result.maps, strict=True):
        w = torch.from_numpy(w)  # (nh, T, T)
        assert w.shape == (model.config.n_head, T, T)
        assert torch.all(w.triu(1) == 0), "a query attends to a later key"
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:2]), atol=1e-5, rtol=0)
        attn = model.transformer.h[layer].attn
        x_in, y_sdpa = seen[layer]
        _, _, v = attn.qkv(x_in)  # (1, nh, T, hs)
        y = (w[None] @ v).transpose(1, 2).reshape(1, T, -1)  # (1, T, C)
        torch.testing.assert_close(attn.c_proj(y), y_sdpa, atol=1e-5, rtol=1e-4)
        # The check has teeth: uniform causal weights give a different output.
        uniform = torch.ones(T, T).tril()
        uniform = uniform / uniform.sum(-1, keepdim=True)
        y_u = (uniform @ v).transpose(1, 2).reshape(1, T, -1)
        assert (attn.c_proj(y_u) - y_sdpa).abs().max() > 1e-3


def test_attention_cli_writes_png(tiny_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "attn.png"
    assert main(["attention", str(tiny_run), "--text", "the cat sat on the mat", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    small = tmp_path / "one.png"
    assert main(["attention", str(tiny_run), "--text", "the cat", "--out", str(small), "--no-grid",
                 "--layers", "1"]) == 0
    assert 0 < small.stat().st_size < out.stat().st_size


@pytest.mark.parametrize(("argv", "flag"), [
    (["--text", ""], "--text"),
    (["--text", "x" * 40], "--text"),
    (["--text", "the cat", "--layers", "2"], "--layers"),
    (["--text", "the cat", "--out", "attn.jpg"], "--out"),
])
def test_attention_cli_bad_input(tiny_run: Path, tmp_path: Path, capsys, argv: list[str], flag: str) -> None:
    argv = [a if a != "attn.jpg" else str(tmp_path / a) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "a.png")]
    assert main(["attention", str(tiny_run), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag}") and "Traceback" not in err
    assert not (tmp_path / "a.png").exists()


def test_inspect_cli_table_json_and_text(tiny_run: Path, capsys) -> None:
    assert main(["inspect", str(tiny_run), "--prompt", "the ca", "--top-k", "4"]) == 0
    out = capsys.readouterr().out
    assert "next token after 'the ca'" in out and out.count("\n") >= 6
    assert main(["inspect", str(tiny_run), "--prompt", "the ca", "--top-k", "4", "--steps", "3", "--json"]) == 0
    steps = json.loads(capsys.readouterr().out)
    assert len(steps) == 3 and len(steps[0]["candidates"]) == 4
    assert sum(c["probability"] for c in steps[0]["candidates"]) <= 1 + 1e-6
    assert main(["inspect", str(tiny_run), "--text", "the mat"]) == 0
    out = capsys.readouterr().out
    assert "most surprising" in out and "perplexity" in out
    assert main(["inspect", str(tiny_run), "--steps", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --steps")
    assert main(["inspect", str(tiny_run), "--checkpoint", "999"]) == 2
    assert capsys.readouterr().err.startswith("error: --checkpoint")


@pytest.mark.parametrize(("history", "patience", "expected"), [
    ([], 3, None),
    ([(0, 4.0, 4.0), (100, 3.0, 3.1), (200, 2.5, 3.2), (300, 2.0, 3.3)], 3, None),  # only 2 rises
    ([(0, 4.0, 4.0), (100, 3.0, 3.1), (200, 2.5, 3.2), (300, 2.0, 3.3), (400, 1.9, 3.4)], 3, 100),
    ([(0, 4.0, 4.0), (100, 3.0, 3.1), (200, 2.5, 3.2), (300, 2.6, 3.3), (400, 1.9, 3.4)], 3, None),  # train rose
    ([(0, 4.0, 4.0), (100, 3.0, 3.1), (200, 2.5, 3.2), (300, 2.0, 3.2), (400, 1.9, 3.4)], 3, None),  # val flat
    ([(0, 4.0, 3.0), (100, 3.0, 3.1)], 1, 0),
    ([(0, 4.0, 3.0), (100, 3.0, 3.1), (200, 2.9, 3.0)], 1, None),  # recovered
])
def test_overfit_start(history: list[tuple[int, float, float]], patience: int, expected: int | None) -> None:
    assert overfit_start(history, patience) == expected


def test_plot_log_scale_reaches_the_plot(tmp_path: Path, tiny_corpus: Path, monkeypatch) -> None:
    from nextoken.train import plots

    calls: list[dict] = []
    real = plots.plot_loss
    monkeypatch.setattr(plots, "plot_loss", lambda *a, **kw: (calls.append(kw), real(*a, **kw)))
    train_tiny(tmp_path / "run", tiny_corpus, max_iters=2, eval_interval=2, plot_log_scale=True, sample_tokens=0)
    assert calls and all(kw.get("log_scale") is True for kw in calls)
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # A log-scale plot of losses spans the log(vocab) line and stays readable.
    records = [{"event": "train", "step": 1, "loss": 3.0}, {"event": "eval", "step": 2, "val_loss": 2.0}]
    real(records, tmp_path / "log.png", 40, log_scale=True)
    assert (tmp_path / "log.png").stat().st_size > 0


def test_inspect_notes_unknown_characters(tiny_run: Path, capsys) -> None:
    assert main(["inspect", str(tiny_run), "--prompt", "the \u20ac", "--top-k", "2"]) == 0
    assert "never seen in training" in capsys.readouterr().err
