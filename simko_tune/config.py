"""Config loading for the recipes: bare config names and schema checks on top of torchtune's.

``tune run simko_recipe --config qwen2_5_7b`` passes ``qwen2_5_7b`` through untouched
(it is not one of torchtune's built-in configs), so the recipe maps bare names to the YAML
files packaged as ``simko_tune.configs`` before torchtune's ``config.parse`` reads them.
"""

from __future__ import annotations

import functools
import importlib.resources
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torchtune import config as tt_config


def packaged_configs() -> list[str]:
    """Names of the YAML configs shipped with the package."""
    root = importlib.resources.files("simko_tune.configs")
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """An existing file path is taken as is; otherwise a bare name (``qwen2_5_7b`` or
    ``qwen2_5_7b.yaml``) is looked up among the packaged configs."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    candidate = Path(str(importlib.resources.files("simko_tune.configs") / f"{name}.yaml"))
    if path.parent == Path(".") and candidate.is_file():
        return candidate
    raise FileNotFoundError(
        f"--config {name_or_path!r}: no such file, and not a packaged config "
        f"(available: {', '.join(packaged_configs())})"
    )


def _rewrite_config_arg(argv: list[str]) -> list[str]:
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            argv[i + 1] = str(resolve_config_path(argv[i + 1]))
        elif arg.startswith("--config="):
            argv[i] = "--config=" + str(resolve_config_path(arg.split("=", 1)[1]))
    return argv


def parse(recipe_main: Callable[[DictConfig], Any]) -> Callable[[], Any]:
    """``torchtune.config.parse`` that also accepts bare packaged config names."""

    @functools.wraps(recipe_main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        sys.argv = _rewrite_config_arg(sys.argv)
        return tt_config.parse(recipe_main)(*args, **kwargs)

    return wrapper
