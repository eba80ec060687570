"""Make this interpreter look like the GPU check machine (tests/tools/test_gpu_check.py).

Put this folder first on PYTHONPATH: every top-level module that is installed here but whose
distribution is neither in the GPU machine's package list nor among the wheels
tools/gpu_check.sh carries raises ImportError, in this process and in every child
(torchrun ranks inherit PYTHONPATH). The list is the machine's image as
/work/.library/device/KINDS.md recorded it on 2026-11-17.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys

GPU_MACHINE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn
einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx humanize huggingface-hub hypothesis idna imageio
iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml
markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda
numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo
pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov
pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests
rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions
typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
"""
# What tools/gpu_check.sh installs from .whl/ (keep in step with its WHEELS list), and this
# checkout (on PYTHONPATH there).
CARRIED = """
torchtune torchao omegaconf antlr4-python3-runtime datasets dill multiprocess pyzmq
math-verify latex2sympy2-extended zstandard simko-tune
"""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _with_requirements(names: set[str]) -> set[str]:
    """``names`` and, transitively, what their versions here require: the machine has its
    packages' own dependencies, in versions of its own (this checkout's huggingface_hub needs
    httpx2, that machine's needs httpx). Carried wheels get no such allowance: they are
    installed with --no-deps, so what they need must be on the machine or carried too."""
    from packaging.requirements import Requirement

    todo, seen = list(names), set(names)
    while todo:
        try:
            requires = importlib.metadata.requires(todo.pop()) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for spec in requires:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = _norm(req.name)
            if name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


_ALLOWED = _with_requirements({_norm(n) for n in GPU_MACHINE_PACKAGES.split()}) | {
    _norm(n) for n in CARRIED.split()
}
_BLOCKED = {
    module
    for module, dists in importlib.metadata.packages_distributions().items()
    if not any(_norm(d) in _ALLOWED for d in dists) and module not in sys.stdlib_module_names
}
# None in sys.modules: `import x` raises ModuleNotFoundError, importlib.util.find_spec("x")
# returns None (torchtune probes optional packages that way).
for _module in _BLOCKED:
    sys.modules.setdefault(_module, None)
