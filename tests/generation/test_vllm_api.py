"""The list of what the worker uses of vLLM (simko_tune/generation/vllm_api.py) matches the
code, and the installed vLLM (the CPU stack) has all of it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from simko_tune.generation import vllm_api

GENERATION = Path(vllm_api.__file__).parent


def _trees() -> dict[str, ast.Module]:
    """The generation modules that call vLLM (the checker itself introspects it)."""
    return {
        p.name: ast.parse(p.read_text())
        for p in sorted(GENERATION.glob("*.py"))
        if p.name != "vllm_api.py"
    }


def _calls(tree: ast.Module, name: str) -> list[ast.Call]:
    """Calls of ``name(...)`` or ``anything.name(...)``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Name) and f.id == name) or (
                isinstance(f, ast.Attribute) and f.attr == name
            ):
                out.append(node)
    return out


def test_every_vllm_import_is_listed():
    used: dict[str, set[str]] = {}
    for file, tree in _trees().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vllm"):
                used.setdefault(node.module, set()).update(a.name for a in node.names)
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("vllm") for a in node.names), file
    assert used, "no vLLM import found: the scan is broken"
    for module, names in used.items():
        assert module in vllm_api.NAMES, f"{module} is used but not listed"
        assert names <= set(vllm_api.NAMES[module]), (module, names)


def test_engine_sampling_and_method_arguments_are_listed():
    server = _trees()["server.py"]
    (llm,) = _calls(server, "LLM")
    engine = {k.arg for k in llm.keywords if k.arg} - {"model"}
    assert engine <= set(vllm_api.ENGINE_KWARGS), engine
    for call in _calls(server, "SamplingParams"):
        assert {k.arg for k in call.keywords} <= set(vllm_api.SAMPLING_KWARGS)
    for node in ast.walk(server):  # self.llm.<method>(...)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Attribute)
            and node.func.value.attr == "llm"
        ):
            method = node.func.attr
            assert method in vllm_api.LLM_METHODS, f"LLM.{method} is used but not listed"
            assert {k.arg for k in node.keywords} <= set(vllm_api.LLM_METHODS[method]), method
    reload_calls = _calls(server, "reload_weights")
    assert (
        reload_calls
        and "reload_weights" in vllm_api.WORKER_METHODS["vllm.v1.worker.gpu_worker.Worker"]
    )


@pytest.mark.slow
def test_the_installed_vllm_has_everything_listed():
    found = vllm_api.check()
    assert found["differs"] == [], found["differs"]
    assert len(found["matched"]) >= 20
