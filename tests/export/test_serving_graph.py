"""The serving graph (serving.onnx): its contract, and parity with PyTorch under continuous batching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from nextoken.export.artifact import load_artifact
from nextoken.export.runtime import Runner
from nextoken.export.serving import verify_serving
from nextoken.train.run import load_run


def _dims(value: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_contract_and_recorded_parity(tiny_artifact: Path) -> None:
    art = load_artifact(tiny_artifact)
    graph = onnx.load(str(tiny_artifact / "serving.onnx")).graph
    L, nh, hs = art.config["n_layer"], art.config["n_head"], art.config["head_dim"]
    ins, outs = {v.name: v for v in graph.input}, {v.name: v for v in graph.output}
    assert list(ins)[:4] == ["input_ids", "position_ids", "seqlens_k", "total_sequence_length"]
    assert _dims(ins["seqlens_k"]) == ["batch"] and _dims(ins["total_sequence_length"]) == []
    assert _dims(outs["logits"]) == ["batch", "sequence_length", art.config["vocab_size"]]
    for i in range(L):
        for kv in ("key", "value"):  # the same shape in and out: the buffer is bound as both
            assert _dims(ins[f"past_key_values.{i}.{kv}"]) == ["batch", nh, "max_cache_len", hs]
            assert _dims(outs[f"present.{i}.{kv}"]) == ["batch", nh, "max_cache_len", hs]
    assert sum(n.op_type == "GroupQueryAttention" for n in graph.node) == L
    sv = art.manifest["verification"]["serving"]
    assert sv["passed"] and sv["greedy_identical_tokens"] == sv["greedy_tokens"] > 0


def test_parity_with_pytorch_on_other_prompts_and_chunks(tiny_artifact: Path, tiny_run: Path) -> None:
    """Chunk sizes 1 (every prompt token its own prefill call) and 7, other prompts than the export's."""
    model = load_run(tiny_run).model
    art = load_artifact(tiny_artifact)
    for chunk, seed in ((1, 3), (7, 4)):
        r = verify_serving(model, tiny_artifact / "serving.onnx", config=art.config, chunk=chunk, seed=seed,
                           max_new=12)
        assert r["passed"], r
        assert r["max_abs_diff"] < 1e-4 and r["greedy_identical_tokens"] == r["greedy_tokens"] == 6 * 12


def test_cache_is_written_in_place_and_only_at_new_positions(tiny_artifact: Path) -> None:
    """A decode writes one column per decoding row; other slots' caches are untouched, byte for byte."""
    runner = Runner(load_artifact(tiny_artifact), max_slots=3, max_len=32, threads=1)
    runner.prefill(0, [1, 2, 3, 4], 0)
    runner.prefill(2, [5, 6], 0)
    before = [buf.copy() for buf in runner.host_cache]
    lengths = np.array([4, 0, 2])
    runner.decode(np.array([2]), np.array([7]), np.array([2]), lengths)
    for old, new in zip(before, runner.host_cache, strict=True):
        # slot 0 is in the call's range but not decoding: its 4 tokens are intact, and the padding
        # column goes at its length (4), where its next real token will overwrite it
        assert np.array_equal(old[0, :, :4], new[0, :, :4]) and np.array_equal(old[0, :, 5:], new[0, :, 5:])
        assert np.array_equal(old[1, :, 1:], new[1, :, 1:])  # a free slot: at most its column 0 changes
        assert not np.array_equal(old[2, :, 2], new[2, :, 2])  # slot 2's new token at position 2
        assert np.array_equal(old[2, :, :2], new[2, :, :2])
    assert runner.spec.nbytes == 2 * runner.n_layer * 3 * runner.n_head * 32 * runner.head_dim * 4
