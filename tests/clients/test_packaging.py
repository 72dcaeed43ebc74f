"""The client distribution stays light: httpx is its only runtime dependency, and importing the
SDK or the load tester pulls in nothing heavy (matplotlib only when plots are asked for)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import nextoken_client

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the SDK itself supports 3.10

CLIENT_DIR = Path(__file__).resolve().parents[2] / "clients" / "python"


def test_only_runtime_dependency_is_httpx() -> None:
    meta = tomllib.loads((CLIENT_DIR / "pyproject.toml").read_text())["project"]
    assert [d.split(">")[0].split("=")[0] for d in meta["dependencies"]] == ["httpx"]
    assert meta["scripts"]["nextoken-loadtest"] == "nextoken_client.loadtest.cli:main"
    assert (CLIENT_DIR / "nextoken_client" / "py.typed").is_file()


def test_import_pulls_in_nothing_heavy() -> None:
    code = ("import sys, nextoken_client, nextoken_client.loadtest.cli\n"
            "heavy = {'torch', 'numpy', 'onnxruntime', 'matplotlib', 'nextoken', 'litserve'} & set(sys.modules)\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_public_surface() -> None:
    for name in nextoken_client.__all__:
        assert hasattr(nextoken_client, name), name
    assert nextoken_client.__version__ == tomllib.loads((CLIENT_DIR / "pyproject.toml").read_text())["project"][
        "version"]
