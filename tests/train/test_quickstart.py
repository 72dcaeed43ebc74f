"""The README's main command: `nextoken quickstart` on the built-in corpus, shortened for CI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quickstart_trains_on_the_stdlib_and_generates(tmp_path) -> None:
    out = tmp_path / "qs"
    r = subprocess.run([sys.executable, "-m", "nextoken", "quickstart", "--out-dir", str(out), "--max-iters", "12",
                        "--max-new-tokens", "30"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "built-in corpus" in r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["final_val_loss"] < 8.0  # log(2048) = 7.62 at the start
    assert (out / "loss.png").is_file()
    text = r.stdout.split("===")[-1]
    assert text.strip().startswith("def"), r.stdout  # the generated continuation of the default prompt
    assert "nextoken generate" in r.stdout
