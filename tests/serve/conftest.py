"""A real `nextoken serve` process on 127.0.0.1 with a free port, always stopped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ServerProcess


@pytest.fixture(scope="module")
def server(serve_artifact: Path) -> Iterator[ServerProcess]:
    s = ServerProcess(serve_artifact, "--max-batch-size", "8", "--max-queue", "16")
    yield s
    s.stop()
