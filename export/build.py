"""Build an artifact folder from a training run or a Hugging Face model folder: export, optional
quantisation, parity check, manifest.

Everything is written into a hidden temporary folder beside ``--out`` (``fileio.staged_folder``)
and renamed into place only when complete, so a failed or interrupted export leaves the previous artifact (or
nothing) behind, never half a folder. An existing artifact at ``--out`` is replaced; any other
non-empty folder there is refused.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import onnxscript
import torch

from nextoken.errors import UserError
from nextoken.export import ecosystem
from nextoken.export.artifact import FORMAT, write_json, write_manifest
from nextoken.export.onnx import DEFAULT_OPSET, DTYPES, MIN_OPSET, export_onnx, quantize_int8
from nextoken.export.serving import export_serving_onnx, verify_serving
from nextoken.export.source import load_source, name_and_version
from nextoken.export.verify import verify_onnx
from nextoken.fileio import staged_folder

QUANTIZE = ("none", "int8")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _is_artifact(folder: Path) -> bool:
    try:
        return json.loads((folder / "manifest.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder", flag="--out")
    if out.is_dir() and any(out.iterdir()) and not _is_artifact(out):
        raise UserError(f"{out} exists and is not an artifact folder; refusing to replace it", flag="--out")


def export_run(run_dir: str | Path, out_dir: str | Path, *, checkpoint: str = "best", name: str | None = None,
               version: str | None = None, opset: int = DEFAULT_OPSET, dtype: str = "fp32", quantize: str = "none",
               verify: bool = True, log: Callable[[str], None] | None = _stderr) -> Path:
    """Export ``run_dir``'s checkpoint (or a Hugging Face folder's weights) to ``out_dir`` and return its path.

    Raises ``UserError`` (naming the flag) for bad input and when an fp32 export fails the
    parity check (max |delta logit| > 1e-4 or differing greedy tokens); nothing is written then.
    """
    run_dir, out = Path(run_dir), Path(out_dir)
    say = log or (lambda _msg: None)
    if opset < MIN_OPSET:
        raise UserError(f"must be >= {MIN_OPSET}, got {opset}", flag="--opset")
    if dtype not in DTYPES:
        raise UserError(f"must be one of {', '.join(DTYPES)}, got {dtype!r}", flag="--dtype")
    if quantize not in QUANTIZE:
        raise UserError(f"must be one of {', '.join(QUANTIZE)}, got {quantize!r}", flag="--quantize")
    if quantize != "none" and dtype != "fp32":
        raise UserError(f"int8 quantisation starts from an fp32 graph; got --dtype {dtype}", flag="--quantize")
    _check_out(out)

    src = load_source(run_dir, checkpoint)
    model, eos = src.model, src.eos_token_id
    name, version = name_and_version(run_dir, name, version)

    with staged_folder(out) as tmp:
        say(f"exporting {src.describe()} (opset {opset}, {dtype}) ...")
        onnx_path = tmp / "model.onnx"
        graph = export_onnx(model, onnx_path if quantize == "none" else tmp / "fp32.onnx",
                            opset=opset, dtype=dtype)
        model.float()  # the fp16 trace cast it; the parity reference is the fp32 checkpoint
        say("exporting the serving graph (in-place KV cache) ...")
        serving_path = tmp / "serving.onnx"
        graph["serving"] = export_serving_onnx(model, serving_path if quantize == "none" else tmp / "fp32-serving.onnx",
                                               dtype=dtype)
        model.float()
        if quantize == "int8":
            say("quantising MatMul weights to int8 ...")
            quantize_int8(tmp / "fp32.onnx", onnx_path)
            quantize_int8(tmp / "fp32-serving.onnx", serving_path)
            for f in [*tmp.glob("fp32.onnx*"), *tmp.glob("fp32-serving.onnx*")]:
                f.unlink()
        config = src.config_json(name, version, dtype="float16" if dtype == "fp16" else "float32")
        verification: dict[str, Any] = {"skipped": True}
        if verify:
            say("verifying against PyTorch ...")
            verification = verify_onnx(model, str(onnx_path), dtype=dtype, quantized=quantize != "none", pad_id=eos)
            say(f"  prefill max|dlogit| {verification['prefill_max_abs_diff']:.2e}, decode "
                f"{verification['decode_max_abs_diff']:.2e}, greedy identical "
                f"{verification['greedy_identical_steps']}/{verification['greedy_steps']} steps")
            if not verification["passed"] and quantize == "none":
                v = verification
                raise UserError(f"the exported graph disagrees with PyTorch: max |dlogit| prefill "
                                f"{v['prefill_max_abs_diff']:.2e} / decode {v['decode_max_abs_diff']:.2e} "
                                f"(tolerance {v.get('tolerance')}), greedy tokens identical for "
                                f"{v['greedy_identical_steps']}/{v['greedy_steps']} steps; nothing was written "
                                f"(--no-verify skips the check)", flag="--verify")
            sv = verify_serving(model, serving_path, config=config, dtype=dtype)
            verification["serving"] = sv
            say(f"  serving graph under continuous batching: max|dlogit| {sv['max_abs_diff']:.2e}, greedy identical "
                f"{sv['greedy_identical_tokens']}/{sv['greedy_tokens']} tokens")
            if not sv["passed"] and quantize == "none":
                raise UserError(f"the serving graph disagrees with PyTorch under continuous batching: max |dlogit| "
                                f"{sv['max_abs_diff']:.2e} (tolerance {sv['tolerance']}), greedy tokens identical for "
                                f"{sv['greedy_identical_tokens']}/{sv['greedy_tokens']}; nothing was written "
                                f"(--no-verify skips the check)", flag="--verify")
        ecosystem.write_tokenizer_json(run_dir, src.tokenizer, tmp)
        write_json(tmp / "config.json", config)
        write_json(tmp / "generation_config.json", src.generation_config())
        # tokenizer_config.json, special_tokens_map.json, genai_config.json: Optimum, AutoTokenizer and
        # onnxruntime-genai open the folder unchanged (hashed in the manifest like every file)
        ecosystem.write_artifact_extras(tmp, config, src.files.tokenizer_config if src.files else None)
        options = dict(graph, quantize=quantize, torch=torch.__version__, onnx=onnx.__version__,
                       onnxscript=onnxscript.__version__, onnxruntime=onnxruntime.__version__)
        write_manifest(tmp, name=name, version=version, source=src.record(), export=options,
                       verification=verification)
    say(f"wrote {out}")
    return out
