"""Build an artifact folder from a training run or a Hugging Face model folder: export, optional
quantisation, parity check, manifest.

Everything is written into a hidden temporary folder beside ``--out`` (``fileio.staged_folder``)
and renamed into place only when complete, so a failed or interrupted export leaves the previous artifact (or
nothing) behind, never half a folder. An existing artifact at ``--out`` is replaced; any other
non-empty folder there is refused.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import onnxscript
import torch

from nextoken.errors import UserError
from nextoken.export import ecosystem
from nextoken.export.artifact import FORMAT, write_json, write_manifest
from nextoken.export.onnx import DEFAULT_OPSET, DTYPES, MIN_OPSET, export_onnx
from nextoken.export.quantize import SCHEMES, QuantSpec, quantize_file
from nextoken.export.serving import export_serving_onnx, verify_serving
from nextoken.export.source import load_source, name_and_version
from nextoken.export.verify import verify_onnx
from nextoken.fileio import staged_folder

QUANTIZE = SCHEMES
FP32_DIR = ".fp32"  # inside the staged folder: the fp32 graphs a quantised export starts from (then removed)


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
               verify: bool = True, quant: QuantSpec | None = None,
               log: Callable[[str], None] | None = _stderr) -> Path:
    """Export ``run_dir``'s checkpoint (or a Hugging Face folder's weights) to ``out_dir`` and return its path.

    Raises ``UserError`` (naming the flag) for bad input and when an fp32 export fails the
    parity check (max |delta logit| > 1e-4 or differing greedy tokens), or when a quantised export
    exceeds ``quant_check.TOLERANCES`` against its own fp32 graphs; nothing is written then.
    ``quant`` carries the quantisation settings (block size, symmetry, accuracy level, head);
    ``quantize`` alone takes their defaults.
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
        raise UserError(f"quantisation starts from an fp32 graph; got --dtype {dtype}", flag="--quantize")
    spec = quant if quant is not None else QuantSpec(quantize)
    if spec.scheme != quantize:
        raise ValueError(f"quantize={quantize!r} but quant.scheme={spec.scheme!r}")
    _check_out(out)

    src = load_source(run_dir, checkpoint)
    model, eos = src.model, src.eos_token_id
    name, version = name_and_version(run_dir, name, version)

    with staged_folder(out) as tmp:
        say(f"exporting {src.describe()} (opset {opset}, {dtype}) ...")
        onnx_path, serving_path = tmp / "model.onnx", tmp / "serving.onnx"
        fp32_dir = tmp / FP32_DIR if quantize != "none" else tmp
        fp32_dir.mkdir(exist_ok=True)
        graph = export_onnx(model, fp32_dir / "model.onnx", opset=opset, dtype=dtype)
        model.float()  # the fp16 trace cast it; the parity reference is the fp32 checkpoint
        say("exporting the serving graph (in-place KV cache) ...")
        graph["serving"] = export_serving_onnx(model, fp32_dir / "serving.onnx", dtype=dtype)
        model.float()
        if quantize != "none":
            say(f"quantising the weights: {quantize} ...")
            graph["quantization"] = spec.to_dict()
            for graph_file in ("model.onnx", "serving.onnx"):
                graph["quantization"][graph_file] = quantize_file(fp32_dir / graph_file, tmp / graph_file, spec)
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
            if quantize != "none":
                say("comparing the quantised graphs with the fp32 ones ...")
                q = verification["quantization"] = quantized_parity(src, run_dir, fp32_dir, tmp, config, quantize)
                say(f"  KL to fp32 {q['merged']['mean_kl']:.2e} / {q['serving']['mean_kl']:.2e} nats (model / serving) "
                    f"top-1 agreement {q['merged']['top1_agreement']:.1%} / {q['serving']['top1_agreement']:.1%}, "
                    + (f"validation perplexity {q['perplexity']:.3f} vs {q['perplexity_fp32']:.3f} fp32 "
                       f"({q['perplexity_increase']:+.2%})" if q["perplexity"] is not None else "no validation data"))
                if not q["passed"]:
                    raise UserError(f"the {quantize} graphs exceed their tolerance against fp32 "
                                    f"({'; '.join(q['failures'])}); nothing was written (a larger block size loses "
                                    f"less: --quant-block-size; --no-verify skips the check)", flag="--quantize")
        if fp32_dir != tmp:
            shutil.rmtree(fp32_dir)
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


def quantized_parity(src: Any, run_dir: Path, fp32_dir: Path, quant_dir: Path, config: dict[str, Any],
                     scheme: str) -> dict[str, Any]:
    """``quant_check``'s figures for both graphs and the validation perplexity (see quant_check.py)."""
    from nextoken.export import quant_check
    from nextoken.export.verify import default_prompts

    c = src.config
    shape = {"n_layer": c.n_layer, "n_kv_head": c.n_kv_head, "head_dim": c.head_dim}
    prompts = default_prompts(c.vocab_size, c.block_size, batch=4, seed=1)
    merged = quant_check.compare_merged(fp32_dir / "model.onnx", quant_dir / "model.onnx", prompts,
                                        pad_id=src.eos_token_id, **shape)
    serving = quant_check.compare_serving(fp32_dir, quant_dir, config, prompts)
    ppl_fp32 = ppl = None
    tokens = 0
    window = min(c.block_size, quant_check.QUALITY_WINDOW)
    try:
        from nextoken.train.data import TokenData

        val = np.asarray(TokenData(run_dir / "data").val[: quant_check.QUALITY_TOKENS + 1])
    except (OSError, ValueError, TypeError):  # a run without its data folder (e.g. --init-from a HF model)
        val = np.zeros(0, dtype=np.int64)
    if len(val) > window:
        tokens = ((len(val) - 1) // window) * window
        ppl_fp32 = quant_check.perplexity(fp32_dir / "model.onnx", val, window=window, **shape)
        ppl = quant_check.perplexity(quant_dir / "model.onnx", val, window=window, **shape)
    return quant_check.check(scheme, merged, serving, ppl_fp32, ppl, tokens)
