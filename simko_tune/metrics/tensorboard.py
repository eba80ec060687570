"""Reading a run's TensorBoard scalars back (studies, benchmarks and tests share it)."""

from __future__ import annotations

import os
from pathlib import Path


def read_scalars(tb_dir: str | Path) -> dict[str, dict[int, float]]:
    """Every scalar under ``tb_dir``: tag -> {step: value}.

    torch's ``SummaryWriter`` stores scalars as v2 tensor summaries, which the accumulator
    drops unless asked to keep every tensor; old-style scalars are read too."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    out: dict[str, dict[int, float]] = {}
    runs = sorted(  # os.walk, unlike Path.rglob before 3.13, follows linked run folders
        Path(root)
        for root, _, files in os.walk(tb_dir, followlinks=True)
        if any(f.startswith("events.out.tfevents.") for f in files)
    )
    for run in runs:
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            for event in acc.Tensors(tag):
                value = tensor_util.make_ndarray(event.tensor_proto)
                if value.dtype.kind in "fiu" and value.size == 1:
                    out.setdefault(tag, {})[event.step] = float(value)
        for tag in acc.Tags()["scalars"]:
            for event in acc.Scalars(tag):
                out.setdefault(tag, {})[event.step] = event.value
    return out
