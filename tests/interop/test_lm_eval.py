"""lm-evaluation-harness scores our model the way ``nextoken eval`` does.

Three of lm-eval's own backends, each on the form of the model it loads, run local task files
(``tasks/*.yaml``) over texts shipped in ``data/``: rolling log-likelihood (perplexity),
multiple choice (log-likelihood) and greedy generation. Their rolling figures (bits per byte,
byte and word perplexity) must equal ``nextoken eval``'s for the same windows within 1e-4
relative; the windows are lm-eval's, so this fails if either side scores a token differently,
drops one, or counts bytes or words differently.

* ``hf`` on the Hugging Face export, ``max_length=W``: documents span several windows of ``W``.
* ``onnxruntime`` on the ONNX artifact as it is (it finds the graph and tensor names through
  genai_config.json): documents shorter than the context only, because that backend keeps the
  last ``max_length`` tokens of a ``max_length + 1``-token window and so drops the first
  scored token of every full window (lm-eval 0.4.13 ``_onnx_base``); for a single window per
  document it scores what ``hf`` does.
* ``local-completions`` against the real server, ``max_length=W+2`` (lm-eval's API backends keep
  one position for the token they ask to generate and send a window's ``W + 1`` tokens as one
  echoed prompt, so ``W = max_length - 2``). It needs the server's ``echo`` + ``logprobs``,
  which the test checks first, so a server that lost them fails with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from nextoken.cli import main
from tests.conftest import ServerProcess
from tests.interop.conftest import DATA, HELDOUT

pytest.importorskip("lm_eval")

TASKS = Path(__file__).parent / "tasks"
WINDOW = 32  # tokens per window; the interop model's context is 64, so documents take several
REL = 1e-4
ROLLING_METRICS = ("bits_per_byte", "byte_perplexity", "word_perplexity")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped task files, pointed at the shipped data (lm-eval resolves data_files from the cwd)."""
    out = tmp_path_factory.mktemp("lm-eval-tasks")
    for f in TASKS.glob("*.yaml"):
        (out / f.name).write_text(f.read_text().replace("DATA_DIR", str(DATA)))
    return out


def lm_eval_results(model: str, model_args: dict, tasks: list[str], task_dir: Path,
                    limit: int | None = None) -> dict[str, dict]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, batch_size=1, limit=limit,
                                  task_manager=TaskManager(include_path=str(task_dir)), log_samples=False,
                                  bootstrap_iters=0, random_seed=0)
    return {task: {k.split(",")[0]: v for k, v in res.items()} for task, res in out["results"].items()}


def nextoken_eval(model: Path, data: Path, capsys: pytest.CaptureFixture[str], window: int | None = None) -> dict:
    capsys.readouterr()
    argv = ["eval", str(model), "--data", str(data), "--json"] + (["--window", str(window)] if window else [])
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def assert_same_rolling(lm: dict, ours: dict) -> None:
    for metric in ROLLING_METRICS:
        assert abs(lm[metric] - ours[metric]) <= REL * abs(ours[metric]), (metric, lm[metric], ours[metric])


@pytest.fixture(scope="module")
def hf_results(interop_hf: Path, task_dir: Path) -> dict[str, dict]:
    return lm_eval_results("hf", {"pretrained": str(interop_hf), "max_length": WINDOW, "dtype": "float32",
                                  "device": "cpu"}, ["nextoken_rolling", "nextoken_choice", "nextoken_generate"],
                           task_dir)


def test_hf_backend_on_hf_export(hf_results: dict[str, dict], interop_run: Path, interop_artifact: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    res = hf_results
    for model in (interop_run, interop_artifact):  # PyTorch and ONNX Runtime agree with lm-eval alike
        ours = nextoken_eval(model, HELDOUT, capsys, WINDOW)
        assert ours["windows"] > ours["documents"]  # some documents really span several windows
        assert_same_rolling(res["nextoken_rolling"], ours)
    assert 0.0 <= res["nextoken_choice"]["acc"] <= 1.0  # the log-likelihood and generation tasks ran
    assert 0.0 <= res["nextoken_generate"]["exact_match"] <= 1.0


def test_onnxruntime_backend_on_artifact(interop_artifact: Path, task_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    limit = 3  # the first three documents are shorter than the context (one window each)
    res = lm_eval_results("onnxruntime", {"pretrained": str(interop_artifact)}, ["nextoken_rolling"], task_dir,
                          limit=limit)
    short = tmp_path / "short.jsonl"
    short.write_text("".join(HELDOUT.read_text().splitlines(keepends=True)[:limit]))
    ours = nextoken_eval(interop_artifact, short, capsys)
    assert ours["documents"] == limit and ours["windows"] == limit
    assert_same_rolling(res["nextoken_rolling"], ours)


def _echo_supported(server: ServerProcess) -> str | None:
    """None when the server scores prompt tokens (echo + logprobs); otherwise what it answered."""
    try:
        r = httpx.post(server.url + "/v1/completions", timeout=30,
                       json={"prompt": "a", "max_tokens": 0, "echo": True, "logprobs": 1})
    except httpx.HTTPError as e:
        return f"request failed: {e}"
    if r.status_code != 200:
        return f"{r.status_code} {r.text[:200]}"
    lp = (r.json().get("choices") or [{}])[0].get("logprobs") or {}
    return None if lp.get("token_logprobs") else f"no token_logprobs in {r.text[:200]}"


def test_local_completions_against_server(interop_server: ServerProcess, interop_artifact: Path, task_dir: Path,
                                          hf_results: dict[str, dict], capsys: pytest.CaptureFixture[str]) -> None:
    """Through the server lm-eval gets the same perplexity as nextoken eval and, on the other two
    tasks, the same accuracy and exact-match as its hf backend on the same weights."""
    missing = _echo_supported(interop_server)
    assert missing is None, f"the server does not score prompts (echo + logprobs): {missing}"
    res = lm_eval_results("local-completions", {
        "model": "interop", "base_url": interop_server.url + "/v1/completions", "tokenizer": str(interop_artifact),
        "tokenizer_backend": "huggingface", "max_length": WINDOW + 2, "num_concurrent": 1, "max_retries": 1,
    }, ["nextoken_rolling", "nextoken_choice", "nextoken_generate"], task_dir)
    ours = nextoken_eval(interop_artifact, HELDOUT, capsys, WINDOW)
    assert ours["windows"] > ours["documents"]
    assert_same_rolling(res["nextoken_rolling"], ours)
    assert res["nextoken_choice"]["acc"] == hf_results["nextoken_choice"]["acc"]
    assert res["nextoken_generate"]["exact_match"] == hf_results["nextoken_generate"]["exact_match"]
