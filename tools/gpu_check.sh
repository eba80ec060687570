#!/usr/bin/env bash
# One-H100 check (fits in 8 minutes): installs nothing beyond this package's own deps that the
# device image lacks, then runs a few bf16 FSDP2 SimKO steps of a Qwen2.5-1.5B-shaped model
# with the compiled loss and prints one JSON line (tokens/s, MFU, peak memory). No vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torchtune" 2>/dev/null || python3 -m pip install -q --no-deps torchtune==0.6.1 torchao==0.15.0 omegaconf
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout 450 torchrun --standalone --nproc_per_node 1 tools/gpu_check.py "$@"
