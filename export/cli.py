"""`nextoken export RUN --out ARTIFACT_DIR`: a run's checkpoint -> a verified ONNX artifact folder."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run folder written by `nextoken train`")
    parser.add_argument("--out", required=True, metavar="ARTIFACT_DIR",
                        help="artifact folder to write (an existing artifact there is replaced)")
    parser.add_argument("--checkpoint", default="best", help="best, latest, a step, or a checkpoint folder")
    parser.add_argument("--name", default=None,
                        help="model name, served as NAME:VERSION (default: the run folder's name)")
    parser.add_argument("--version", default=None, help="model version (default: 1)")
    parser.add_argument("--opset", type=int, default=23,
                        help="ONNX opset; 23 uses the native Attention op, 18 suits older runtimes")
    parser.add_argument("--dtype", default="fp32", help="fp32, or fp16 for ONNX Runtime's CUDA provider")
    parser.add_argument("--quantize", default="none", help="none, or int8 (dynamic quantisation of the MatMuls)")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="check the graph against PyTorch in ONNX Runtime (default: on)")


def run(args: argparse.Namespace) -> int:
    from nextoken.export.build import export_run

    export_run(args.run, args.out, checkpoint=args.checkpoint, name=args.name, version=args.version,
               opset=args.opset, dtype=args.dtype, quantize=args.quantize, verify=args.verify)
    return 0
