"""The shared artifact fixtures other areas build on: complete, hash-checked, loadable."""

from __future__ import annotations

from pathlib import Path

from nextoken.export.artifact import load_artifact


def test_tiny_artifacts_load(tiny_artifact: Path, tiny_bpe_artifact: Path) -> None:
    for folder, kind in ((tiny_artifact, "char"), (tiny_bpe_artifact, "bpe")):
        art = load_artifact(folder)
        assert art.config["tokenizer_kind"] == kind
        assert art.manifest["verification"]["passed"] is True
        assert art.manifest["export"]["opset"] == 23
        assert art.generation_config["eos_token_id"] == art.config["eos_token_id"]
