"""Every training-recipe option through the real export (``export_run``): ONNX graphs, parity, serving.

Each option alone, and the whole recipe together (trained with Muon and document masking, which
change training only), is trained briefly, exported with the parity check on, and must pass it:
greedy tokens identical for every step on a left-padded batch and max |delta logit| within the fp32
tolerance, for the merged (Optimum-style) graph and, where the export builds it, the serving graph.
The whole recipe is then served by the real server, whose greedy tokens must be PyTorch's.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from nextoken.export.artifact import load_artifact
from nextoken.export.build import export_run
from nextoken.export.verify import FP32_TOLERANCE
from nextoken.train.run import load_run
from tests.conftest import ServerProcess, train_tiny

OPTIONS: dict[str, dict] = {
    "rope": {"pos_emb": "rope"},
    "qk_norm": {"qk_norm": True},
    "relu2": {"mlp_act": "relu2"},
    "untied": {"tie_embeddings": False},
    "zero_init": {"zero_init": True},
    "softcap": {"logit_softcap": 8.0},
}
RECIPE = {k: v for opts in OPTIONS.values() for k, v in opts.items()} | {"optimizer": "muon", "doc_mask": True}


def _train_and_export(root: Path, name: str, options: dict) -> tuple[Path, Path]:
    run = root / f"run-{name}"
    # block 48: a 12-token prompt leaves 36 greedy steps; 40 steps of training make the argmax vary
    train_tiny(run, _corpus(root), block_size=48, max_iters=40, eval_interval=40, **options)
    return run, export_run(run, root / f"art-{name}", name=name, log=None)


def _corpus(root: Path) -> Path:
    from tests.conftest import TINY_TEXT

    d = root / "corpus"
    if not d.is_dir():
        d.mkdir()
        (d / "a.txt").write_text(TINY_TEXT, encoding="utf-8")
        (d / "b.txt").write_text(TINY_TEXT.upper(), encoding="utf-8")
    return d


def _check_parity(artifact: Path) -> dict:
    ver = load_artifact(artifact).manifest["verification"]
    assert ver["passed"] and ver["greedy_identical"] and ver["greedy_steps"] >= 30, ver
    assert max(ver["prefill_max_abs_diff"], ver["decode_max_abs_diff"]) <= FP32_TOLERANCE, ver
    assert len(set(ver["prompt_lengths"])) > 1  # a left-padded batch
    if "serving" in ver:  # the in-place-cache serving graph, when the export builds it
        assert ver["serving"]["passed"] and ver["serving"]["max_abs_diff"] <= FP32_TOLERANCE, ver["serving"]
    return ver


@pytest.fixture(scope="module")
def recipe_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _train_and_export(tmp_path_factory.mktemp("recipe"), "recipe", RECIPE)


def test_the_whole_recipe_exports_and_passes_parity(recipe_export: tuple[Path, Path]) -> None:
    run, artifact = recipe_export
    _check_parity(artifact)
    model = load_run(run).model
    assert model.config.non_gpt2_options() and "wpe" not in model.transformer and not model.tied


# The serving graph takes one of two paths: packed QKV straight into GroupQueryAttention when
# nothing touches q and k, or q, k and v apart when rotary or QK-norm do. Rotary and QK-norm alone
# each take the second path without the other; the options that leave q and k alone are checked
# together on the packed path (the whole recipe checks every op on the other). Each export is
# ~10-20 s on CI's two cores, so this is three of them, not one per option.
SEPARATE: dict[str, dict] = {
    "rope": OPTIONS["rope"],
    "qk_norm": OPTIONS["qk_norm"],
    "packed-qkv": {k: v for name in ("relu2", "untied", "zero_init", "softcap") for k, v in OPTIONS[name].items()},
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(SEPARATE))
def test_options_export_and_pass_parity_on_both_attention_paths(tmp_path: Path, variant: str) -> None:
    _, artifact = _train_and_export(tmp_path, variant, SEPARATE[variant])
    _check_parity(artifact)


def test_the_whole_recipe_is_served_with_pytorchs_greedy_tokens(recipe_export: tuple[Path, Path]) -> None:
    """The real server (ONNX Runtime, continuous batching) on the recipe's artifact: several
    prompts at once, greedy, each equal to PyTorch's own cached greedy decode of the same ids."""
    run, artifact = recipe_export
    loaded = load_run(run)
    tok, model = loaded.tokenizer, loaded.model
    eot = tok.token_to_id("<|endoftext|>")
    prompts = ["the cat sat", "hello", "a quick brown fox jumps"]
    server = ServerProcess(artifact)
    try:
        with httpx.Client(timeout=120) as client:
            replies = [client.post(server.url + "/v1/completions",
                                   json={"prompt": p, "max_tokens": 16, "temperature": 0, "ignore_eos": True})
                       for p in prompts]
    finally:
        server.stop()
    varied = set()
    for prompt, reply in zip(prompts, replies, strict=True):
        assert reply.status_code == 200, reply.text
        served = reply.json()["choices"][0]["token_ids"]
        ids = torch.tensor([[eot] + tok.encode(prompt, add_special_tokens=False).ids])  # served prompts start with it
        expected = model.generate(ids, 16, temperature=0)[0, ids.shape[1]:].tolist()
        assert served == expected, prompt
        varied.update(served)
    assert len(varied) > 3  # greedy text that varies: not a constant that agrees by accident
