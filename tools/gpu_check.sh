#!/usr/bin/env bash
# GPU check (tools/gpu_check.py: the recipe end to end, a 1.5B-shaped training step, the loss
# against full logits), for a CUDA machine that has torch but no network: one NVIDIA H200,
# Python 3.12, torch 2.11 (CUDA 13), without torchtune, torchao, omegaconf, datasets or pyzmq.
# Prints ONE JSON line; under 8 minutes. Run from anywhere: bash tools/gpu_check.sh [ARGS]
# (ARGS go to tools/gpu_check.py, e.g. --parts a,c).
#
# The missing pure-Python wheels (and pyzmq's cp312 build) travel in .whl/ (git-ignored).
# Fetch them on a machine with network, in the repository root:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux1_x86_64 -d .whl \
#     torchtune==0.6.1 torchao==0.15.0 omegaconf==2.4.0 antlr4-python3-runtime==4.11.1 \
#     datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pyzmq==27.3.0 \
#     math-verify==0.9.0 latex2sympy2_extended==1.11.0 zstandard==0.25.0
#
# (or `bash tools/gpu_check.sh --download`, which runs exactly that). About 11 MB.
# Why each: torchtune, torchao (0.16+ break torchtune 0.6.1's imports) and omegaconf (2.4 has
# no antlr pin) for the recipe; datasets, dill, multiprocess because torchtune imports
# `datasets` at module level; pyzmq for simko_tune.generation's client; antlr4 4.11.1 for
# sympy's LaTeX parser; math-verify for the verifier; zstandard for weight deltas.
# Everything else the project imports is in that machine's image
# (tests/tools/gpu_machine_site lists it).
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  torchtune==0.6.1 torchao==0.15.0 omegaconf==2.4.0 antlr4-python3-runtime==4.11.1
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pyzmq==27.3.0
  math-verify==0.9.0 latex2sympy2_extended==1.11.0 zstandard==0.25.0
)
WHEEL_DIR=${GPU_CHECK_WHEELS:-.whl}
SITE=${GPU_CHECK_SITE:-/tmp/site}

if [[ "${1:-}" == "--download" ]]; then
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$WHEEL_DIR" "${WHEELS[@]}"
fi

if compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEEL_DIR"/*.whl || { echo "gpu_check: installing $WHEEL_DIR/*.whl failed" >&2; exit 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "gpu_check: no wheels in $WHEEL_DIR; using what is installed" >&2
fi
# This checkout, whether or not it is installed: the package and the recipe modules.
export PYTHONPATH="$PWD:$PWD/recipes${PYTHONPATH:+:$PYTHONPATH}"

# torchtune imports `datasets` at module level but the check never loads a dataset with it: if
# the carried build does not import against this machine's pyarrow/fsspec, a stub stands in
# (recorded in the JSON as env.datasets_stub).
if ! python3 -c "import datasets" 2>/dev/null; then
  STUB=$(mktemp -d /tmp/gpu_check_stub.XXXX)
  mkdir -p "$STUB/datasets"
  for f in __init__ distributed; do
    printf 'def __getattr__(name):\n    raise ImportError(f"datasets stub (tools/gpu_check.sh): no {name}")\n' \
      >"$STUB/datasets/$f.py"
  done
  printf 'def load_dataset(*a, **k):\n    raise RuntimeError("datasets stub")\n' >>"$STUB/datasets/__init__.py"
  printf 'def split_dataset_by_node(*a, **k):\n    raise RuntimeError("datasets stub")\n' >>"$STUB/datasets/distributed.py"
  export PYTHONPATH="$STUB:$PYTHONPATH" GPU_CHECK_DATASETS_STUB=1
  echo "gpu_check: 'import datasets' failed; a stub stands in for torchtune's import" >&2
fi
# Name a missing import early; the parts still run and each records its own error.
python3 -c "import torch, torchtune, omegaconf, zmq, simko_tune.generation, simko_recipe" \
  || echo "gpu_check: imports failed (above); PYTHONPATH=$PYTHONPATH" >&2

# tools/gpu_check.py keeps its own budget (--budget-s, 420 s); this is the backstop: with
# the install and the import check before it, the whole script stays under 8 minutes.
exec timeout --kill-after 10 440 python3 tools/gpu_check.py "$@"
