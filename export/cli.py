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
                        help="onnx only: none (default), or int8 (dynamic quantisation of the MatMuls)")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="check the export by loading it (onnx: ONNX Runtime against PyTorch; hf: transformers; "
                             "gguf: the gguf reader) (default: on)")


def _only_onnx(args: argparse.Namespace) -> None:
    for flag, value in (("--opset", args.opset), ("--quantize", args.quantize)):
        if value is not None:
            raise UserError(f"applies to --format onnx only (this export is --format {args.format})", flag=flag)


def run(args: argparse.Namespace) -> int:
    if args.format == "onnx":
        from nextoken.export.build import export_run
        from nextoken.export.onnx import DEFAULT_OPSET

        export_run(args.run, args.out, checkpoint=args.checkpoint, name=args.name, version=args.version,
                   opset=DEFAULT_OPSET if args.opset is None else args.opset, dtype=args.dtype or "fp32",
                   quantize=args.quantize or "none", verify=args.verify)
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
