#!/usr/bin/env bash
# One prepared GPU check for the serving engine (issue 11): on a machine with an NVIDIA GPU and CUDA 12,
# install onnxruntime-gpu, run the serving graph on the CUDA provider with the KV cache resident on the
# device (IOBinding in place), check parity with the CPU path, print decode tok/s at batch 1/8/32 and a
# short HTTP sweep. Prints everything; exit status 0 = parity held.
#
#   bash benchmarks/gpu_check.sh [ARTIFACT_DIR]
#
# ARTIFACT_DIR: an artifact exported beforehand (e.g. on a CPU machine: `nextoken export RUN --out art`;
# serving.onnx must be in it). Without one, a GPT-2-shaped bench model (4 layers, 256 wide, context 256,
# BPE 2000) is trained for a few steps and exported here, which needs PyTorch (the CPU build is enough).
# Offline machines: put the onnxruntime-gpu wheel and its dependencies in .whl/ and they are used instead.
set -euo pipefail
cd "$(dirname "$0")/.."
ART=${1:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi not found"
if ! python3 -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/nextoken-site .whl/*.whl
    export PYTHONPATH=/tmp/nextoken-site${PYTHONPATH:+:$PYTHONPATH}
  else
    python3 -m pip install -q "onnxruntime-gpu>=1.20" numpy tokenizers
  fi
fi
# nextoken itself (package-dir maps serve/ -> nextoken.serve), without fetching anything
python3 -c "import nextoken.export.runtime" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e .
if [ -z "$ART" ]; then
  ART=$(mktemp -d)/bench-art
  python3 - "$ART" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from bench_engine import build_artifact
work = Path(sys.argv[1]).parent
art = build_artifact(work)
art.rename(sys.argv[1])
PY
fi
HTTP=""
python3 -c "import litserve, fastapi, nextoken_client" 2>/dev/null && HTTP="--http"
python3 benchmarks/gpu_check.py --artifact "$ART" $HTTP
