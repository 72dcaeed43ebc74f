"""Training beyond one machine: two torchrun "nodes" meeting through c10d rendezvous.

Two separate `torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d` launches on 127.0.0.1
(each one node with one process, as two machines would run them) train into one run folder, the
stand-in for shared storage, and must reach exactly the weights of `--standalone
--nproc_per_node 2` on one node: the same two ranks, the same data, the same all-reduce.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nextoken.train.checkpoint import list_checkpoints
from tests.conftest import REPO, free_port
from tests.train.test_distributed import TINY_FLAGS, torchrun


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
               GLOO_SOCKET_IFNAME="lo")  # gloo's own connections stay on loopback too
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(var, None)
    return env


def two_nodes(out_dir: Path, corpus: Path, log_dir: Path, timeout: float = 300) -> list[str]:
    """Launch both nodes at once and wait for both; returns their combined output, node by node."""
    endpoint = f"127.0.0.1:{free_port()}"
    rdzv_id = f"nextoken-test-{uuid.uuid4().hex[:8]}"
    procs, logs = [], []
    for node in range(2):
        log = open(log_dir / f"node{node}.log", "w+")  # noqa: SIM115 (closed below)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id,
               "--local-addr", "127.0.0.1", "--max-restarts", "0",
               "-m", "nextoken", "train", "--data", str(corpus), "--out-dir", str(out_dir), *TINY_FLAGS]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    try:
        codes = [p.wait(timeout) for p in procs]
    finally:
        for p in procs:  # never leave a node behind, even when the other failed
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    assert codes == [0, 0], "\n".join(f"node {i} exited {c}:\n{o[-3000:]}" for i, (c, o) in
                                      enumerate(zip(codes, outputs, strict=True)))
    return outputs


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> dict[str, Path | list[str]]:
    root = tmp_path_factory.mktemp("multinode")
    shared = root / "shared-storage" / "run"
    outputs = two_nodes(shared, tiny_corpus, root)
    one_node = root / "one-node" / "run"
    torchrun("-m", "nextoken", "train", "--data", str(tiny_corpus), "--out-dir", str(one_node), *TINY_FLAGS)
    return {"two_nodes": shared, "one_node": one_node, "outputs": outputs}


def test_two_nodes_train_one_run_on_shared_storage(runs: dict) -> None:
    run = runs["two_nodes"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    assert summary["tokens_seen"] == 6 * 8 * 32 * 2  # both nodes' windows count
    # Only global rank 0 (on whichever node the rendezvous made it) logs and writes.
    assert sum(o.count("done: 6 steps") for o in runs["outputs"]) == 1
    ckpts = list_checkpoints(run / "checkpoints")
    assert [c.step for c in ckpts] == [0, 3, 6] and ckpts[-1].meta["world_size"] == 2
    state = torch.load(ckpts[-1].path / "state.pt", weights_only=True)
    assert len(state["sampler"]) == 2 and len(state["rng"]) == 2  # one data stream per rank, both saved


def test_two_nodes_reach_the_weights_of_two_processes_on_one_node(runs: dict) -> None:
    final = {k: load_file(list_checkpoints(runs[k] / "checkpoints")[-1].path / "model.safetensors")
             for k in ("two_nodes", "one_node")}
    assert final["two_nodes"].keys() == final["one_node"].keys()
    for name, w in final["one_node"].items():
        torch.testing.assert_close(final["two_nodes"][name], w, atol=1e-6, rtol=0, msg=name)
    init = load_file(list_checkpoints(runs["one_node"] / "checkpoints")[0].path / "model.safetensors")
    # The comparison means something: six steps moved the weights far more than the tolerance.
    assert max((w - init[n]).abs().max().item() for n, w in final["one_node"].items()) > 1e-3
    losses = [json.loads(line)["val_loss"] for k in ("two_nodes", "one_node")
              for line in (runs[k] / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["event"] == "eval"]
    assert losses[:3] == pytest.approx(losses[3:], abs=1e-6)  # the same evaluations, step by step
