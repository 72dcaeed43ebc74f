"""Memory planned before loading (serve/memory.py): --kv-cache-mb sizes slots x length, the start-up lines
show weights, caches and threads, and a configuration that does not fit is refused naming its flag."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nextoken.errors import UserError
from nextoken.serve import memory
from nextoken.serve.config import ServeConfig
from tests.conftest import ServerProcess, free_port

GPT2_SMALL = {"n_positions": 1024, "n_layer": 12, "n_head": 12, "head_dim": 64}  # 73,728 bytes a token


def test_the_issue_s_figure_and_a_bound() -> None:
    plan = memory.plan(ServeConfig(max_batch_size=32), GPT2_SMALL, 0)
    assert (plan.slots, plan.max_len, plan.token_bytes) == (32, 1024, 73_728)
    assert plan.kv_cache_bytes == 32 * 1024 * 73_728  # 2.25 GiB (2.4 GB), as the issue counted
    bounded = memory.plan(ServeConfig(max_batch_size=32, kv_cache_mb=576), GPT2_SMALL, 0)
    assert (bounded.slots, bounded.max_len) == (32, 256) and bounded.kv_cache_bytes <= 576 << 20
    by_len = memory.plan(ServeConfig(max_batch_size=32, max_model_len=1024, kv_cache_mb=576), GPT2_SMALL, 0)
    assert (by_len.slots, by_len.max_len) == (8, 1024)  # a fixed length: as many slots as fit
    roomy = memory.plan(ServeConfig(max_batch_size=4, kv_cache_mb=10_000), GPT2_SMALL, 0)
    assert (roomy.slots, roomy.max_len) == (4, 1024)  # never more than the context per slot
    assert memory.apply(ServeConfig(max_batch_size=32, kv_cache_mb=576), by_len).max_batch_size == 8


def test_bounds_that_hold_nothing_and_plans_that_do_not_fit_name_the_flag() -> None:
    with pytest.raises(UserError, match="fewer than one sequence of --max-model-len 1024") as e:
        memory.plan(ServeConfig(max_model_len=1024, kv_cache_mb=1), GPT2_SMALL, 0)
    assert e.value.flag == "--kv-cache-mb"
    for cfg, flag in ((ServeConfig(max_batch_size=32), "--max-batch-size"),
                      (ServeConfig(max_batch_size=32, kv_cache_mb=2048), "--kv-cache-mb")):
        plan = memory.plan(cfg, GPT2_SMALL, 350 << 20)
        with pytest.raises(UserError, match=r"needs [\d,]+ MiB .* but 1,024 MiB is available") as e:
            memory.check_fits(plan, 1 << 30)
        assert e.value.flag == flag
        memory.check_fits(plan, 64 << 30)  # fits: no error
    with pytest.raises(UserError, match="must be >= 0") as e:
        ServeConfig(kv_cache_mb=-1).validate()
    assert e.value.flag == "--kv-cache-mb"


@pytest.mark.parametrize("flags, flag", [
    (["--max-batch-size", "100000000", "--kv-cache-mb", "100000000000"], "--kv-cache-mb"),  # the bound sized it
    (["--max-batch-size", "100000000"], "--max-batch-size")])
def test_the_server_refuses_before_loading(serve_artifact: Path, flags: list[str], flag: str) -> None:
    # Its own session, so a server that wrongly starts is stopped whole (engine and HTTP process too).
    proc = subprocess.Popen([sys.executable, "-m", "nextoken", "serve", str(serve_artifact), "--port",
                             str(free_port()), *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    r = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert r.returncode != 0 and flag in r.stderr and "MiB is available" in r.stderr, r.stderr
    assert "serving" not in r.stdout  # refused before anything started


def test_start_up_lines_show_memory_threads_and_budget(serve_artifact: Path) -> None:
    s = ServerProcess(serve_artifact, "--max-batch-size", "4", "--kv-cache-mb", "1")
    try:
        out = s.output()
    finally:
        s.stop()
    assert "KV cache 1.0 MiB (4 slots x " in out and "prefix cache 64.0 MiB" in out and "(fp32 weights)" in out
    assert "1 ONNX Runtime threads (--threads)" in out
    assert "prompt tokens per step: 2 x decoding rows + " in out and "measured at load" in out


def test_freezing_the_startup_heap_spares_it_from_collections_but_still_collects_later_garbage() -> None:
    # In a child process: freezing is for the rest of a process's life.
    code = textwrap.dedent("""
        import gc, weakref
        from nextoken.serve.memory import freeze_startup_heap

        startup = [[i] for i in range(20_000)]  # what start-up builds and keeps
        frozen = freeze_startup_heap()
        assert frozen >= 20_000, frozen
        assert not any(o is startup for o in gc.get_objects()), "frozen objects are out of the collector's walk"

        class Node:
            pass

        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle made after start-up: only the collector frees it
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None, "garbage made after the freeze is still collected"
        print("ok", frozen)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok ")
