"""`nextoken eval`: lm-eval's rolling windows, figures against a hand computation, both backends, errors."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nextoken.cli import main
from nextoken.evaluate import rolling_windows
from nextoken.train.run import load_run

TEXTS = ["the cat sat on the mat. the dog lay on the rug.", "hello there.\nHOW ARE YOU? i love the lazy dog."]


def test_rolling_windows_by_hand() -> None:
    # 10 tokens, windows of 4 inputs: the first predicts 4 from the prefix, the next 4 take one
    # token of context, the last 2 take as much context as fits (window + 1 tokens in all).
    assert rolling_windows(list(range(1, 11)), 0, 4) == [([0], [1, 2, 3, 4]), ([4], [5, 6, 7, 8]),
                                                         ([6, 7, 8], [9, 10])]
    assert rolling_windows([5, 6, 7], 0, 8) == [([0], [5, 6, 7])]
    assert rolling_windows([5, 6, 7], 0, 1) == [([0], [5]), ([5], [6]), ([6], [7])]
    assert rolling_windows([], 0, 4) == []


def test_rolling_windows_equal_lm_evals() -> None:
    utils = pytest.importorskip("lm_eval.utils")
    rng = random.Random(0)
    for _ in range(200):
        n, w = rng.randint(1, 60), rng.randint(1, 20)
        tokens = [rng.randint(1, 99) for _ in range(n)]
        theirs = [utils.make_disjoint_window(p) for p in utils.get_rolling_token_windows(tokens, 0, w, 1)]
        ours = rolling_windows(tokens, 0, w)
        assert ours == theirs, (n, w)
        assert [t for _, cont in ours for t in cont] == tokens  # every token predicted once
        assert all(len(ctx) + len(cont) <= w + 1 for ctx, cont in ours)


def _eval_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@torch.no_grad()
def _logprob(model: torch.nn.Module, context: list[int], target: int) -> float:
    logits = model(torch.tensor([context])).logits[0, -1].double()  # (vocab,)
    return float(torch.log_softmax(logits, -1)[target])


def test_figures_equal_a_hand_computation(tiny_bpe_run: Path, tiny_bpe_artifact: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    run = load_run(tiny_bpe_run)
    model, tok = run.model, run.tokenizer
    eos = tok.token_to_id("<|endoftext|>")
    docs = [tok.encode(t).ids for t in TEXTS]
    n_tokens = sum(map(len, docs))
    n_bytes = sum(len(t.encode()) for t in TEXTS)
    n_words = sum(len(t.split()) for t in TEXTS)  # no leading/trailing whitespace here: same as re.split

    # Window 1: every token is predicted from the one before it alone (the first from <|endoftext|>).
    bigram = sum(_logprob(model, [([eos] + d)[i]], d[i]) for d in docs for i in range(len(d)))
    # Window >= every document: one pass over <|endoftext|> + the document, every position scored.
    full = sum(_logprob(model, [eos] + d[:i], d[i]) for d in docs for i in range(len(d)))

    assert max(map(len, docs)) <= 32 == model.config.block_size  # one window of 32 holds each document
    for window, want in ((1, bigram), (32, full)):
        for model_path in (tiny_bpe_run, tiny_bpe_artifact):  # PyTorch and ONNX Runtime
            got = _eval_json(capsys, [str(model_path), "--data", str(data), "--window", str(window)])
            assert (got["documents"], got["tokens"], got["bytes"], got["words"]) == (2, n_tokens, n_bytes, n_words)
            assert got["windows"] == (n_tokens if window == 1 else 2)
            assert got["sum_logprob"] == pytest.approx(want, rel=1e-5)
            assert got["loss"] == pytest.approx(-want / n_tokens, rel=1e-5)
            assert got["perplexity"] == pytest.approx(math.exp(-want / n_tokens), rel=1e-5)
            assert got["bits_per_byte"] == pytest.approx(-want / n_bytes / math.log(2), rel=1e-5)
            assert got["word_perplexity"] == pytest.approx(math.exp(-want / n_words), rel=1e-5)


def test_middle_windows_agree_between_backends(tiny_bpe_run: Path, tiny_bpe_artifact: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "doc.txt"
    data.write_text(" ".join(TEXTS) * 3)  # about 150 tokens: many windows of 7, batched by length
    a = _eval_json(capsys, [str(tiny_bpe_run), "--data", str(data), "--window", "7", "--batch-size", "3"])
    b = _eval_json(capsys, [str(tiny_bpe_artifact), "--data", str(data), "--window", "7"])
    assert a["windows"] == b["windows"] > 10
    assert a["sum_logprob"] == pytest.approx(b["sum_logprob"], rel=1e-5)


def test_artifact_eval_needs_no_torch(tiny_bpe_artifact: Path, tmp_path: Path) -> None:
    data = tmp_path / "a.txt"
    data.write_text(TEXTS[0])
    code = ("import sys; sys.modules['torch'] = None; from nextoken.cli import main; "
            f"sys.exit(main(['eval', {str(tiny_bpe_artifact)!r}, '--data', {str(data)!r}, '--json']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["source"] == "artifact"


def test_eval_errors_name_the_flag(tiny_bpe_run: Path, tiny_bpe_artifact: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "a.txt"
    good.write_text(TEXTS[0])
    bad_json = tmp_path / "b.jsonl"
    bad_json.write_text('{"body": "no text field"}\n')
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    art, run = str(tiny_bpe_artifact), str(tiny_bpe_run)
    cases = [([art, "--data", str(good), "--window", "0"], "--window"),
             ([art, "--data", str(good), "--window", "33"], "--window"),  # the context is 32
             ([art, "--data", str(good), "--checkpoint", "latest"], "--checkpoint"),
             ([run, "--data", str(good), "--checkpoint", "999"], "--checkpoint"),
             ([art, "--data", str(tmp_path / "missing.txt")], "--data"),
             ([art, "--data", str(bad_json)], "--text-field"),
             ([art, "--data", str(empty)], "--data"),
             ([str(tmp_path), "--data", str(good)], "RUN_OR_ARTIFACT"),
             ([art, "--data", str(good), "--batch-size", "0"], "--batch-size")]
    for argv, flag in cases:
        capsys.readouterr()
        assert main(["eval", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and flag in err and "Traceback" not in err, (argv, err)


def test_a_hugging_face_folder_is_named_as_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (tmp_path / "a.txt").write_text(TEXTS[0])
    assert main(["eval", str(hf), "--data", str(tmp_path / "a.txt")]) == 2
    err = capsys.readouterr().err
    # eval reads a Hugging Face folder as it reads a run (export.source); this one's config.json is incomplete
    assert "hf/config.json is not a usable gpt2 config" in err and "Traceback" not in err, err


def test_a_quantised_artifact_reports_its_cost_against_the_fp32_reference(tiny_bpe_run: Path, tiny_bpe_artifact: Path,
                                                                           tiny_run: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from nextoken.export.build import export_run

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    q = export_run(tiny_bpe_run, tmp_path / "int8", quantize="int8", log=None)
    got = _eval_json(capsys, [str(q), "--data", str(data), "--reference", str(tiny_bpe_artifact)])
    fp32 = _eval_json(capsys, [str(tiny_bpe_artifact), "--data", str(data)])
    ref = got["reference"]
    assert ref["perplexity"] == pytest.approx(fp32["perplexity"], rel=1e-9)
    assert ref["perplexity_increase"] == pytest.approx(got["perplexity"] / fp32["perplexity"] - 1, rel=1e-9)
    assert got["quantization_at_export"]["scheme"] == "int8" and got["quantization_at_export"]["passed"]
    capsys.readouterr()
    assert main(["eval", str(q), "--data", str(data), "--reference", str(tiny_bpe_artifact)]) == 0
    out = capsys.readouterr().out
    assert "against artifact" in out and "recorded at export (int8" in out
    assert main(["eval", str(q), "--data", str(data), "--reference", str(tiny_run)]) == 2  # char vs BPE
    err = capsys.readouterr().err
    assert "--reference" in err and "tokenizes text differently" in err
