"""Checkpoint round trip under FSDP2, run as torchrun ranks in two separate launches.

``--mode save``: first an uninterrupted run (``SAVED_AT + 1`` steps, no checkpoint); then
``SAVED_AT`` training steps, save, and record what a resumed run must reproduce: the
optimizer's state at the save, each rank's next random draws, and the parameters and
optimizer state after one more step. ``--mode load``: fresh ranks build a differently
initialised model, resume with ``resolve_resume("auto")`` and record the same quantities.
Rank 0 writes them to ``--out``.
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torchtune.models.qwen2 import qwen2

from simko_tune.checkpoint import CheckpointManager, resolve_resume
from simko_tune.parallel import (
    ParallelDims,
    exit_without_teardown,
    hidden_states,
    init_distributed,
    parallelize_model,
    shutdown_distributed,
)


def tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return qwen2(
        vocab_size=64, num_layers=2, num_heads=2, num_kv_heads=1, embed_dim=16,
        intermediate_dim=32, max_seq_len=32, tie_word_embeddings=True,
    )  # fmt: skip


def setup(seed: int):
    """Model (FSDP2 over all ranks under torchrun, plain in one process), AdamW, scheduler."""
    model = tiny_model(seed)
    parallelize_model(
        model, ParallelDims().build_mesh("cpu"), model_family="qwen2",
        activation_checkpointing=False, compile_blocks=False, mixed_precision=None,
    )  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return model, optimizer, scheduler


SAVED_AT = 2  # steps before the save: AdamW's step count then differs from a fresh state's


def train_step(model, optimizer, scheduler, rank: int, step: int) -> None:
    gen = torch.Generator().manual_seed(10 * step + rank)
    tokens = torch.randint(0, 64, (2, 9), generator=gen)
    hidden_states(model, tokens).float().pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (collective for an FSDP2 shard), detached from the run."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def full_params(model) -> dict[str, torch.Tensor]:
    return {n: _full(p) for n, p in model.named_parameters()}


def optimizer_state(model, optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's optimizer state by parameter name, read from ``optimizer.state``
    itself (not through the state-dict API the checkpoint uses): whatever keys it holds."""
    return {
        n: {k: _full(v) for k, v in sorted(optimizer.state.get(p, {}).items())}
        for n, p in model.named_parameters()
    }


def uninterrupted(rank: int) -> dict:
    """Parameters and optimizer state after ``SAVED_AT + 1`` steps with no checkpoint."""
    model, optimizer, scheduler = setup(seed=0)
    for step in range(1, SAVED_AT + 2):
        train_step(model, optimizer, scheduler, rank, step)
    return {"params": full_params(model), "optim": optimizer_state(model, optimizer)}


def draws() -> list:
    return [torch.rand(3), np.random.rand(2).tolist(), random.random()]


def run(mode: str, ckpt_dir: str) -> dict | None:
    rank, world = init_distributed()
    manager = CheckpointManager(ckpt_dir)
    reference = None
    if mode == "save":
        reference = uninterrupted(rank)
        model, optimizer, scheduler = setup(seed=0)
        for step in range(1, SAVED_AT + 1):
            train_step(model, optimizer, scheduler, rank, step)
        optim_at_save = optimizer_state(model, optimizer)
        torch.manual_seed(100 + rank)
        np.random.seed(200 + rank)
        random.seed(300 + rank)
        extra = {"data_position": 17, "weight_version": 3, "metrics": {"reward": 0.25}}
        manager.save(
            SAVED_AT, model=model, optimizer=optimizer, lr_scheduler=scheduler, extra=extra
        )
    else:
        model, optimizer, scheduler = setup(seed=1)
        path = resolve_resume("auto", ckpt_dir)
        extra = manager.load(path, model=model, optimizer=optimizer, lr_scheduler=scheduler)
        optim_at_save = optimizer_state(model, optimizer)
    at_save = full_params(model)
    rank_draws = [draws()]
    if world > 1:
        rank_draws = [None] * world
        dist.all_gather_object(rank_draws, draws())
    lr = scheduler.get_last_lr()
    train_step(model, optimizer, scheduler, rank, step=SAVED_AT + 1)
    after_next_step = full_params(model)
    optim_after_next_step = optimizer_state(model, optimizer)
    if rank != 0:
        return None
    return {
        "extra": extra, "at_save": at_save, "draws": rank_draws, "lr": lr,
        "optim_at_save": optim_at_save, "after_next_step": after_next_step,
        "optim_after_next_step": optim_after_next_step, "uninterrupted": reference,
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=("save", "load"), required=True)
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    result = run(args.mode, args.ckpt_dir)
    shutdown_distributed()
    if result is not None:
        torch.save(result, args.out)


if __name__ == "__main__":
    main()
    exit_without_teardown(0)  # everything is checked and written by now
