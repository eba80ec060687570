"""Worker for test_loss_distributed.py, run by torchrun with 2 gloo ranks.

Data parallel: rank 0 takes 2 responses, rank 1 the other 6 (uneven token counts); each
uses the all-reduced normaliser, the weight gradients are summed, and the result must equal
the single-process gradient of the whole batch. Tensor parallel: the output weight is a
DTensor sharded over the vocabulary, both ranks see the whole batch, and each rank's
gradient shard must equal its slice of the single-process gradient.
Rank 0 writes the largest relative errors as JSON to argv[1].
"""

from __future__ import annotations

import faulthandler
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from simko_tune.loss import AGGREGATIONS, LossConfig, group_advantages, policy_loss
from simko_tune.parallel import exit_without_teardown, shutdown_distributed

INPUTS = ("targets", "old_logprobs", "advantages", "mask", "correct")


def make_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    batch, seq_len, dim, vocab = 8, 12, 16, 64
    hidden = torch.randn(batch, seq_len, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen) * 0.6
    targets = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[..., None])[..., 0]
    lengths = torch.tensor([12, 2, 9, 0, 12, 5, 11, 7])
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    return {
        "hidden": hidden,
        "weight": weight,
        "targets": targets,
        "old_logprobs": logp + 0.3 * torch.randn(batch, seq_len, generator=gen),
        "advantages": group_advantages(rewards, 4),
        "mask": torch.arange(seq_len)[None, :] < lengths[:, None],
        "correct": rewards == 1,
    }


def grads(b, weight, cfg, normalizer=None):
    hidden = b["hidden"].clone().requires_grad_()
    loss, _ = policy_loss(hidden, weight, *(b[k] for k in INPUTS), cfg, normalizer=normalizer)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, "this worker splits the batch for exactly 2 ranks"
    b = make_batch()
    rows = slice(0, 2) if rank == 0 else slice(2, 8)
    errors = {}
    for agg in AGGREGATIONS:
        cfg = LossConfig(
            mode="simko", agg=agg, chunk_size=7, compile=False, alpha=0.2, max_response_len=13
        )
        full_loss, full_gh, full_gw = grads(b, b["weight"].clone().requires_grad_(), cfg)

        local = {k: v[rows] for k, v in b.items() if k != "weight"}
        counts = local["mask"].sum(1)
        norm = counts.sum() if agg == "token_mean" else (counts > 0).sum()
        norm = norm.float()
        dist.all_reduce(norm)
        loss, gh, gw = grads(local, b["weight"].clone().requires_grad_(), cfg, normalizer=norm)
        dist.all_reduce(loss)
        dist.all_reduce(gw)
        all_gh = torch.zeros_like(full_gh)
        all_gh[rows] = gh
        dist.all_reduce(all_gh)
        errors[f"dp_{agg}"] = max(
            rel_err(loss, full_loss), rel_err(gw, full_gw), rel_err(all_gh, full_gh)
        )

    mesh = init_device_mesh("cpu", (world,))
    cfg = LossConfig(mode="simko", chunk_size=7, compile=False, alpha=0.2)
    full_loss, full_gh, full_gw = grads(b, b["weight"].clone().requires_grad_(), cfg)
    sharded = distribute_tensor(b["weight"].clone(), mesh, [Shard(0)]).requires_grad_()
    loss, gh, gw = grads(b, sharded, cfg)
    rows_per_rank = b["weight"].shape[0] // world
    my_rows = slice(rank * rows_per_rank, (rank + 1) * rows_per_rank)
    errors["tp_dtensor"] = max(
        rel_err(loss, full_loss), rel_err(gh, full_gh), rel_err(gw.to_local(), full_gw[my_rows])
    )

    gathered = [None] * world
    dist.all_gather_object(gathered, errors)
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(gathered, f)
    shutdown_distributed()


if __name__ == "__main__":
    faulthandler.enable()  # a native abort prints every thread's Python stack
    main()
    exit_without_teardown(0)  # everything is checked and written by now
