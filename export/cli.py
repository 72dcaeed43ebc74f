"""`nextoken export RUN --out PATH [--format onnx|hf|gguf]`: a run's checkpoint -> a verified artifact.

``RUN`` may also be a Hugging Face model folder (GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM,
MistralForCausalLM): its weights, tokenizer and tokenizer files go into the same formats.

* ``onnx`` (default): the artifact folder our server reads, which Optimum, onnxruntime-genai
  and lm-eval's ``onnxruntime`` backend also open unchanged;
* ``hf``: a Hugging Face ``GPT2LMHeadModel`` folder (transformers, vLLM, TGI, lm-eval ``hf``);
* ``gguf``: one GGUF file for llama.cpp (``f32``, ``f16`` or ``q8_0``).
"""

from __future__ import annotations

import argparse

from nextoken.errors import UserError
from nextoken.export.quantize import ACCURACY_LEVELS, BLOCK_SIZES, SCHEMES, QuantSpec

FORMATS = ("onnx", "hf", "gguf")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run folder written by `nextoken train`, or a Hugging Face model "
                        "folder (gpt2, llama, qwen2, mistral: safetensors, tokenizer.json)")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="artifact folder (onnx, hf; an earlier export there is replaced) or .gguf file (gguf)")
    parser.add_argument("--format", default="onnx", choices=FORMATS,
                        help="onnx: the serving artifact (default); hf: Hugging Face folder (GPT-2 or Llama/Qwen2); "
                             "gguf: llama.cpp")
    parser.add_argument("--checkpoint", default="best", help="best, latest, a step, or a checkpoint folder")
    parser.add_argument("--name", default=None,
                        help="model name, served as NAME:VERSION (default: the run folder's name)")
    parser.add_argument("--version", default=None, help="model version (onnx, hf; default: 1)")
    parser.add_argument("--opset", type=int, default=None,
                        help="onnx only: ONNX opset (default 23, the native Attention op; 18 suits older runtimes)")
    parser.add_argument("--dtype", default=None,
                        help="onnx: fp32 (default) or fp16 for ONNX Runtime's CUDA provider; gguf: f32 (default), "
                             "f16 or q8_0; hf: fp32 only")
    parser.add_argument("--quantize", default=None,
                        help="onnx only: none (default); int8 (dynamic: MatMulInteger); int8-block (8-bit blocks, "
                             "weight-only: MatMulNBits); int4 (4-bit blocks: MatMulNBits). Both graphs; the export "
                             "checks them against its fp32 graphs and records the perplexity cost in the manifest")
    parser.add_argument("--quant-block-size", type=int, default=None,
                        help=f"int4 / int8-block: weights per block along K, one of {BLOCK_SIZES} (default 32)")
    parser.add_argument("--quant-symmetric", action=argparse.BooleanOptionalAction, default=None,
                        help="int4 / int8-block: symmetric blocks (scale only, as llama.cpp's q4_0 / q8_0) or "
                             "asymmetric (scale and zero point) (default: symmetric)")
    parser.add_argument("--quant-accuracy-level", type=int, default=None,
                        help="int4 / int8-block: MatMulNBits' compute type: 4 = int8 activations (the fast CPU path), "
                             "1 = fp32, 0 = the runtime's choice (default 4)")
    parser.add_argument("--quantize-head", action=argparse.BooleanOptionalAction, default=None,
                        help="quantise the LM head too (the last, vocabulary-wide MatMul) (default: yes)")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="check the export by loading it (onnx: ONNX Runtime against PyTorch; hf: transformers; "
                             "gguf: the gguf reader) (default: on)")


QUANT_FLAGS = (("--quant-block-size", "quant_block_size"), ("--quant-symmetric", "quant_symmetric"),
               ("--quant-accuracy-level", "quant_accuracy_level"), ("--quantize-head", "quantize_head"))


def _only_onnx(args: argparse.Namespace) -> None:
    for flag, value in (("--opset", args.opset), ("--quantize", args.quantize),
                        *((f, getattr(args, d)) for f, d in QUANT_FLAGS)):
        if value is not None:
            raise UserError(f"applies to --format onnx only (this export is --format {args.format})", flag=flag)


def quant_spec(args: argparse.Namespace) -> QuantSpec:
    """--quantize and its companions as one QuantSpec; a companion that the scheme would ignore is refused."""
    scheme = args.quantize or "none"
    if scheme not in SCHEMES:
        raise UserError(f"must be one of {', '.join(SCHEMES)}, got {scheme!r}", flag="--quantize")
    given = {d: getattr(args, d) for _f, d in QUANT_FLAGS if getattr(args, d) is not None}
    for flag, dest in QUANT_FLAGS:
        if dest not in given:
            continue
        if scheme == "none":
            raise UserError("applies to a quantised export only; add --quantize int8, int8-block or int4", flag=flag)
        if scheme == "int8" and dest != "quantize_head":
            raise UserError("applies to the block schemes (--quantize int4 or int8-block); int8 is dynamic, "
                            "one scale per tensor", flag=flag)
    if args.quant_block_size is not None and args.quant_block_size not in BLOCK_SIZES:
        raise UserError(f"must be one of {', '.join(map(str, BLOCK_SIZES))}, got {args.quant_block_size}",
                        flag="--quant-block-size")
    if args.quant_accuracy_level is not None and args.quant_accuracy_level not in ACCURACY_LEVELS:
        raise UserError(f"must be one of {', '.join(map(str, ACCURACY_LEVELS))}, got {args.quant_accuracy_level}",
                        flag="--quant-accuracy-level")
    names = {"quant_block_size": "block_size", "quant_symmetric": "symmetric",
             "quant_accuracy_level": "accuracy_level", "quantize_head": "quantize_head"}
    return QuantSpec(scheme, **{names[k]: v for k, v in given.items()})


def run(args: argparse.Namespace) -> int:
    if args.format == "onnx":
        from nextoken.export.build import export_run
        from nextoken.export.onnx import DEFAULT_OPSET

        spec = quant_spec(args)
        export_run(args.run, args.out, checkpoint=args.checkpoint, name=args.name, version=args.version,
                   opset=DEFAULT_OPSET if args.opset is None else args.opset, dtype=args.dtype or "fp32",
                   quantize=spec.scheme, quant=spec, verify=args.verify)
        return 0
    _only_onnx(args)
    if args.format == "hf":
        if args.dtype not in (None, "fp32", "f32", "float32"):
            raise UserError(f"the Hugging Face export writes fp32 weights (cast at load time with transformers' "
                            f"torch_dtype); got {args.dtype!r}", flag="--dtype")
        from nextoken.export.hf import export_hf

        export_hf(args.run, args.out, checkpoint=args.checkpoint, name=args.name, version=args.version,
                  verify=args.verify)
        return 0
    if args.version is not None:
        raise UserError("a GGUF file records no version; applies to --format onnx and hf", flag="--version")
    try:
        from nextoken.export.gguf import export_gguf
    except ImportError as e:
        raise UserError(f"needs the gguf package ({e.name} is not installed): pip install 'nextoken[interop]'",
                        flag="--format") from None

    export_gguf(args.run, args.out, checkpoint=args.checkpoint, dtype=args.dtype or "f32", name=args.name,
                verify=args.verify)
    return 0
