"""Weight quantisation of the exported graphs: 4-bit and 8-bit blocks (MatMulNBits), or dynamic int8.

``--quantize`` picks a scheme; the same one is applied to both graphs (``model.onnx`` and
``serving.onnx``), so every runtime reading the folder runs the same weights:

* ``int4``: ONNX Runtime's ``MatMulNBitsQuantizer`` (round to nearest, per block of
  ``block_size`` weights along K, one scale per block; symmetric by default, as llama.cpp's
  q4_0) turns each MatMul/Gemm with a constant weight into ``com.microsoft.MatMulNBits``.
* ``int8``: ``quantize_dynamic``: ``DynamicQuantizeLinear`` + ``MatMulInteger`` (per-tensor weight
  scales, activations quantised per call).
* ``int8-block``: MatMulNBits with 8-bit blocks (weight-only, like llama.cpp's q8_0): finer scales
  than ``int8``, but slower on the CPUs measured (1.5x per decode step at batch 1 and 32, 2x per
  prefill on the 91M-parameter model, ONNX Runtime 1.32, AVX-512 VNNI: benchmarks/RESULTS.md,
  issue 22), so ``int8`` stays the dynamic path.

``accuracy_level`` is MatMulNBits' compute type (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8
activations); 4 is the fast CPU path (activations quantised per block, as llama.cpp's q8 dot
products do). The LM head (the last MatMul, vocabulary wide) is quantised unless
``quantize_head`` is False; the token embedding (a Gather) never is.

This module knows nothing about the model or the artifact folder: it rewrites one ONNX file
into another. The parity figures (quantised against fp32) are ``quant_check.py``'s.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

SCHEMES = ("none", "int8", "int8-block", "int4")
BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class QuantSpec:
    """What ``--quantize`` and its companions ask for (recorded in the manifest as it is)."""

    scheme: str = "none"
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4
    quantize_head: bool = True

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {self.block_size}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise ValueError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {self.accuracy_level}")

    @property
    def bits(self) -> int:
        return {"int4": 4, "int8": 8, "int8-block": 8}.get(self.scheme, 32)

    @property
    def nbits(self) -> bool:
        """Blockwise weight-only (MatMulNBits) rather than dynamic int8 or none."""
        return self.scheme in ("int4", "int8-block")

    def to_dict(self) -> dict[str, Any]:
        if self.scheme == "none":
            return {"scheme": "none"}
        if self.scheme == "int8":
            return {"scheme": self.scheme, "operator": "MatMulInteger", "quantize_head": self.quantize_head}
        return {**asdict(self), "bits": self.bits, "operator": "MatMulNBits"}


def _quiet_root() -> tuple[logging.Logger, int]:
    # The quantizers log hints ("consider pre-processing") on the root logger: noise for a CLI user.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    return root, level


def _nbits_quantizer() -> Any:
    """ONNX Runtime's MatMulNBitsQuantizer class, imported without its side effect: the module calls
    ``logging.basicConfig(level=INFO)`` on import, which would print a line per node (~400 at 91M parameters)
    and every later INFO record of the process. A handler on the root logger makes that call a no-op."""
    root = logging.getLogger()
    placeholder = None if root.handlers else logging.NullHandler()
    if placeholder is not None:
        root.addHandler(placeholder)
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    finally:
        if placeholder is not None:
            root.removeHandler(placeholder)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    return MatMulNBitsQuantizer


def _initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def weight_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """MatMul / Gemm nodes whose second input is a constant 2-D weight, in graph order."""
    inits = _initializers(graph)
    return [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) >= 2
            and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]


def head_node(graph: onnx.GraphProto) -> onnx.NodeProto | None:
    """The LM head: the last weight MatMul/Gemm (the one whose output becomes the logits)."""
    nodes = weight_nodes(graph)
    return nodes[-1] if nodes else None


def gemm_to_matmul(graph: onnx.GraphProto) -> int:
    """Rewrite ``Gemm(A, W, b, transB=1)`` with a constant W as ``MatMul(A, W^T)`` (+ ``Add(b)``).

    The serving graph keeps its residual stream 2-D, so its linears are Gemms; MatMulNBitsQuantizer
    reads MatMuls only. Returns how many were rewritten. Each weight is transposed once (K, N).
    """
    inits = _initializers(graph)
    users: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    out: list[onnx.NodeProto] = []
    done = 0
    for n in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if (n.op_type != "Gemm" or n.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            out.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]])  # (N, K) with transB=1, else (K, N)
        if attrs.get("transB", 0):
            w = np.ascontiguousarray(w.T)  # (K, N)
            name = n.input[1] + "_kn"
            if users[n.input[1]] == 1:  # nobody else reads it: replace it in place
                graph.initializer.remove(inits[n.input[1]])
            graph.initializer.append(numpy_helper.from_array(w, name))
        else:
            name = n.input[1]
        has_bias = len(n.input) > 2 and n.input[2]
        mm_out = n.output[0] + "_mm" if has_bias else n.output[0]
        out.append(helper.make_node("MatMul", [n.input[0], name], [mm_out], name=n.name))
        if has_bias:
            out.append(helper.make_node("Add", [mm_out, n.input[2]], [n.output[0]], name=n.name + "_bias"))
        done += 1
    del graph.node[:]
    graph.node.extend(out)
    return done


def _fuse_bias(graph: onnx.GraphProto) -> int:
    """``MatMulNBits -> Add(constant bias)`` becomes one MatMulNBits with its bias input (input 5)."""
    inits = _initializers(graph)
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    drop: list[onnx.NodeProto] = []
    for add in graph.node:
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        mm = producer.get(add.input[0])
        bias = inits.get(add.input[1])
        if mm is None or mm.op_type != "MatMulNBits" or bias is None or readers.get(add.input[0]) != 1:
            continue
        n_out = next(a.i for a in mm.attribute if a.name == "N")
        if list(bias.dims) != [n_out]:
            continue
        inputs = list(mm.input) + [""] * (6 - len(mm.input))
        inputs[5] = add.input[1]
        del mm.input[:]
        mm.input.extend(inputs)
        mm.output[0] = add.output[0]
        drop.append(add)
    for n in drop:
        graph.node.remove(n)
    return len(drop)


def quantize_file(src: str | Path, dst: str | Path, spec: QuantSpec) -> dict[str, Any]:
    """Write ``src`` quantised by ``spec`` to ``dst``; returns facts for the manifest (ops, sizes)."""
    src, dst = Path(src), Path(dst)
    external = Path(f"{src}.data").exists()
    root, level = _quiet_root()
    try:
        if spec.scheme == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            exclude = []
            if not spec.quantize_head:
                head = head_node(onnx.load(str(src), load_external_data=False).graph)
                exclude = [head.name] if head is not None else []
            quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul", "Gemm"],
                             weight_type=QuantType.QInt8, nodes_to_exclude=exclude, use_external_data_format=external)
        elif spec.nbits:
            MatMulNBitsQuantizer = _nbits_quantizer()  # noqa: N806 (a class)
            model = onnx.load(str(src))
            gemm_to_matmul(model.graph)
            head = head_node(model.graph)
            exclude = [head.name] if head is not None and not spec.quantize_head else []
            q = MatMulNBitsQuantizer(model, bits=spec.bits, block_size=spec.block_size,
                                     is_symmetric=spec.symmetric, accuracy_level=spec.accuracy_level or None,
                                     nodes_to_exclude=exclude, op_types_to_quantize=("MatMul",))
            q.process()
            model = q.model.model
            _fuse_bias(model.graph)
            del q
            onnx.save(model, str(dst), save_as_external_data=external,
                      location=dst.name + ".data" if external else None)
        else:
            raise ValueError(f"nothing to quantise for scheme {spec.scheme!r}")
    finally:
        root.setLevel(level)
    graph = onnx.load(str(dst), load_external_data=False).graph
    ops: dict[str, int] = {}
    for n in graph.node:
        if n.op_type in ("MatMulNBits", "MatMulInteger", "MatMul", "Gemm"):
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"weight_ops": ops, "bytes": _size(dst), "fp32_bytes": _size(src)}


def _size(path: Path) -> int:
    data = Path(f"{path}.data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)
