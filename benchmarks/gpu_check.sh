#!/usr/bin/env bash
# The GPU check in one command, for a CUDA machine, within 8 minutes:
#   benchmarks/gpu_check.sh [--out DIR] [--data-root DIR] [--photos DIR] ...
# makes (or reuses) a venv, installs flowae with its train and dev extras and onnxruntime-gpu
# in place of onnxruntime, then runs `python -m benchmarks.gpu_check` (train res32 on cuda,
# torchrun on 2 GPUs when there are two, export --fp16, flowae-infer --provider cuda and
# tensorrt,cuda,cpu on the full-size photos, the CUDA latency rows) with the time left.
# Its report: OUT/gpu_check.json and OUT/gpu_check.md; every step's output: OUT/logs/.
# Without a GPU (no nvidia-smi, none listed, or CUDA_VISIBLE_DEVICES set empty) it prints
# what it skipped and exits 0, installing nothing.
# Environment: VENV (default .venv-gpu), PYTHON (default python3), BUDGET_S (default 480).
set -euo pipefail

started=$(date +%s)
budget_s=${BUDGET_S:-480}
venv=${VENV:-.venv-gpu}
python=${PYTHON:-python3}
cd "$(dirname "${BASH_SOURCE[0]}")/.."

skip() {
    echo "gpu_check: no GPU: $1"
    echo "gpu_check: skipped: venv and install (flowae[train,dev], onnxruntime-gpu);" \
        "flowae-train res32 --device cuda (and torchrun on 2 GPUs); flowae-export --fp16;" \
        "flowae-infer --provider cuda and tensorrt,cuda,cpu; benchmarks.latency CUDA rows"
    exit 0
}

if [[ -n "${CUDA_VISIBLE_DEVICES+set}" && -z "${CUDA_VISIBLE_DEVICES}" ]]; then
    skip "CUDA_VISIBLE_DEVICES is set empty"
fi
if ! command -v nvidia-smi >/dev/null 2>&1; then
    skip "no nvidia-smi on PATH"
fi
if ! nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
    skip "nvidia-smi -L lists no GPU"
fi

if [[ ! -x "$venv/bin/python" ]]; then
    # System packages stay visible: a GPU image's preinstalled torch saves a large download.
    "$python" -m venv --system-site-packages "$venv"
fi
if [[ ! -x "$venv/bin/flowae-train" ]]; then
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q -e '.[train,dev]'
fi
if ! "$venv/bin/python" -c 'import sys, onnxruntime as o
sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' 2>/dev/null; then
    # Both packages install the same `onnxruntime` folder: remove both, then add the GPU one.
    "$venv/bin/pip" uninstall -q -y onnxruntime onnxruntime-gpu || true
    "$venv/bin/pip" install -q 'onnxruntime-gpu[cuda,cudnn]' \
        || "$venv/bin/pip" install -q onnxruntime-gpu
fi

left_s=$((budget_s - ($(date +%s) - started) - 20))  # 20 s for the report itself
if ((left_s < 60)); then
    echo "gpu_check: error: installing took $(($(date +%s) - started)) s of the ${budget_s} s" \
        "budget; run again (the venv is kept) or raise BUDGET_S" >&2
    exit 1
fi
exec "$venv/bin/python" -m benchmarks.gpu_check --budget-s "$left_s" "$@"
