#!/usr/bin/env bash
# The GPU check of the real path, in one command, on a machine with an NVIDIA GPU:
#   bash bench/gpu_check.sh [OUT_JSON] [bench/gpu_check.py options]
# The doctor on full-size SD1.5 + a LLaMA-13B-architecture teacher in bf16 (50 real training
# steps: throughput, peak memory), then ONNX Runtime's CUDA and TensorRT providers' parity
# and latency for the exported text path. Every figure goes to OUT_JSON (default
# $OUT/gpu_check.json when $OUT is set, else outputs/gpu_check.json).
# Python: $PYTHON, else the project's .venv (make install TORCH_INDEX=...), else python3 with
# the project's sources on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-outputs}/gpu_check.json}
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
    ORT_DISABLE_TELEMETRY=1 TRANSFORMERS_VERBOSITY=error
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$python" bench/gpu_check.py --out "$out" "${@:2}"
