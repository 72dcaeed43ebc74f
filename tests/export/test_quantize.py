"""Quantised exports (int4 / int8-block through MatMulNBits, int8 through MatMulInteger): both graphs
quantised, checked against the export's own fp32 graphs with the stated tolerances (quant_check.TOLERANCES),
the figures in the manifest, and the artifacts served by a real server."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest

from nextoken.errors import UserError
from nextoken.export import quant_check
from nextoken.export.artifact import load_artifact
from nextoken.export.build import export_run
from nextoken.export.quantize import QuantSpec, gemm_to_matmul, head_node
from tests.conftest import ServerProcess, train_tiny


@pytest.fixture(scope="module")
def qrun(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> Path:
    """64 wide (two int4 blocks of 32 along K), trained enough that its distributions are not flat."""
    out = tmp_path_factory.mktemp("runs") / "q"
    train_tiny(out, tiny_corpus, n_embd=64, n_head=2, block_size=64, max_iters=80, eval_interval=80)
    return out


def _weight_ops(path: Path) -> list[str]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.op_type for n in graph.node if n.op_type in ("MatMulNBits", "MatMulInteger", "MatMul", "Gemm")]


@pytest.mark.parametrize("scheme, op", [("int4", "MatMulNBits"), ("int8-block", "MatMulNBits"),
                                        ("int8", "MatMulInteger")])
def test_quantised_export_is_checked_against_fp32_and_served(qrun: Path, tmp_path: Path, scheme: str, op: str) -> None:
    art = load_artifact(export_run(qrun, tmp_path / scheme, quantize=scheme, name="q", log=None))
    assert art.model_id == "q:1"
    for graph in ("model.onnx", "serving.onnx"):
        ops = _weight_ops(art.path / graph)
        assert ops and set(ops) == {op}, (graph, ops)  # every weight matrix, the head included
    assert not (art.path / ".fp32").exists()  # the fp32 graphs it started from are gone
    q = art.manifest["verification"]["quantization"]
    tol = quant_check.TOLERANCES[scheme]
    assert q["passed"] and q["tolerance"] == {"mean_kl": tol.mean_kl, "perplexity_increase": tol.perplexity_increase}
    for fig in (q["merged"], q["serving"]):  # stated figures, within the stated bounds
        assert fig["finite"] and 0 <= fig["mean_kl"] <= tol.mean_kl and fig["positions"] > 20
        assert 0 < fig["max_abs_diff"] < 5 and fig["top1_agreement"] > 0.5
    assert q["perplexity_tokens"] > 0 and q["perplexity_increase"] <= tol.perplexity_increase
    assert art.manifest["export"]["quantize"] == scheme
    if scheme != "int8":
        assert art.manifest["export"]["quantization"]["block_size"] == 32
    server = ServerProcess(art.path, "--max-batch-size", "2")
    try:
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "the cat", "max_tokens": 8, "temperature": 0,
                                                             "ignore_eos": True}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        assert f"({scheme} weights)" in server.output()  # the start-up line names the weights
    finally:
        server.stop()


def test_the_head_stays_fp32_by_flag_and_the_block_size_is_recorded(qrun: Path, tmp_path: Path) -> None:
    spec = QuantSpec("int4", block_size=16, symmetric=False, quantize_head=False)
    art = load_artifact(export_run(qrun, tmp_path / "nohead", quantize="int4", quant=spec, log=None))
    for graph in ("model.onnx", "serving.onnx"):
        ops = _weight_ops(art.path / graph)
        assert ops[-1] == "MatMul" and set(ops[:-1]) == {"MatMulNBits"}, ops  # the head is the last one
    recorded = art.manifest["export"]["quantization"]
    assert (recorded["block_size"], recorded["symmetric"], recorded["quantize_head"]) == (16, False, False)


def test_a_graph_over_its_tolerance_is_refused_naming_the_flag(qrun: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(quant_check.TOLERANCES, "int4", quant_check.Tolerance(mean_kl=1e-12, perplexity_increase=0))
    with pytest.raises(UserError, match="exceed their tolerance") as e:
        export_run(qrun, tmp_path / "strict", quantize="int4", log=None)
    assert e.value.flag == "--quantize" and not (tmp_path / "strict").exists()


def test_gemm_to_matmul_computes_the_same(tmp_path: Path) -> None:
    """The rewrite the quantiser needs (our serving graph's linears are Gemms) changes no number."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1, b1, w2 = (rng.standard_normal(s).astype(np.float32) for s in ((6, 4), (6,), (5, 6)))
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="g1"),
         helper.make_node("Gemm", ["h", "w2"], ["y"], transB=1, name="head")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((3, 4)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert gemm_to_matmul(model.graph) == 2
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add", "MatMul"]
    assert head_node(model.graph).name == "head"
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_int4_quantisation_prints_nothing_and_leaves_logging_as_it_was(tmp_path: Path) -> None:
    """ONNX Runtime's MatMulNBits quantiser calls logging.basicConfig(level=INFO) when first imported, which
    printed a line per node of every export (~400 at 91M parameters). In a fresh interpreter (the import
    happens once per process) quantising prints nothing and adds no handler to the root logger."""
    import subprocess
    import sys

    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "f.onnx"))
    code = ("import logging\nfrom nextoken.export.quantize import QuantSpec, quantize_file\n"
            f"r = quantize_file({str(tmp_path / 'f.onnx')!r}, {str(tmp_path / 'q.onnx')!r}, QuantSpec('int4'))\n"
            "assert r['weight_ops'] == {'MatMulNBits': 1}, r\nassert not logging.getLogger().handlers\n"
            "logging.getLogger('x').info('an INFO record after quantising')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == "", done.stderr[:2000]


def test_large_weights_are_written_as_external_data_and_quantise_from_there(qrun: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """From onnx.EXTERNAL_DATA_BYTES of weights the graphs keep them in ``.data`` files (written tensor by tensor:
    the export holds no serialised copy); the folder loads, hashes, serves and quantises the same way."""
    from nextoken.export import onnx as onnx_export
    from nextoken.export.runtime import Runner

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    fp32 = load_artifact(export_run(qrun, tmp_path / "ext", name="ext", log=None))
    assert (fp32.path / "model.onnx.data").is_file() and (fp32.path / "serving.onnx.data").is_file()
    assert {"model.onnx.data", "serving.onnx.data"} <= set(fp32.manifest["files"])  # hashed like the rest
    assert fp32.manifest["verification"]["passed"] and fp32.manifest["verification"]["serving"]["passed"]
    assert (fp32.path / "serving.onnx").stat().st_size < 100_000  # the graph alone
    r = Runner(fp32, max_slots=1, threads=1)
    assert r.prefill(0, [1, 2, 3], 0).shape == (3, int(fp32.config["vocab_size"]))
    q = load_artifact(export_run(qrun, tmp_path / "ext4", quantize="int4", log=None))
    assert (q.path / "serving.onnx.data").is_file() and q.manifest["verification"]["quantization"]["passed"]
    assert set(_weight_ops(q.path / "serving.onnx")) == {"MatMulNBits"}
