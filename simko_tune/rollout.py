"""From prompts and sampled completions to the padded tensors the policy loss consumes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch


@dataclass
class RolloutBatch:
    """One rollout, row per completion, rows of a prompt's group adjacent.

    Row i holds ``prompt + response`` shifted for next-token prediction: ``tokens[i, t]`` is
    the input at position t and ``targets[i, t]`` the token that follows it, so
    ``mask[i, t]`` is true exactly where ``targets[i, t]`` is a response token. Rows are
    right-padded, which causal attention keeps out of the valid positions.
    """

    tokens: torch.Tensor  # [B, S] long
    targets: torch.Tensor  # [B, S] long
    mask: torch.Tensor  # [B, S] bool
    worker_logprobs: torch.Tensor  # [B, S] float32, the generator's sampled-token log-probs
    rewards: torch.Tensor  # [B] float32
    response_lens: torch.Tensor  # [B] long
    truncated: torch.Tensor  # [B] bool: stopped by the length limit
    weight_versions: torch.Tensor  # [B] long: the weight version that sampled each row

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, rows: slice | torch.Tensor) -> RolloutBatch:
        """Rows of this batch (a mini- or micro-batch), trimmed to their own longest row."""
        picked = {f.name: getattr(self, f.name)[rows] for f in fields(self)}
        width = int(picked["mask"].any(0).nonzero().max()) + 1 if picked["mask"].any() else 1
        for name in ("tokens", "targets", "mask", "worker_logprobs"):
            picked[name] = picked[name][:, :width]
        return RolloutBatch(**picked)


def concat_rollouts(batches: Sequence[RolloutBatch], pad_id: int) -> RolloutBatch:
    """Rows of several rollouts in one batch, each padded to the widest (the padding is
    masked out, as :func:`build_rollout_batch` pads)."""
    width = max(b.tokens.shape[1] for b in batches)
    fill = {"tokens": pad_id, "targets": pad_id, "mask": False, "worker_logprobs": 0.0}
    out = {}
    for f in fields(RolloutBatch):
        parts = [getattr(b, f.name) for b in batches]
        if f.name in fill:
            parts = [
                torch.nn.functional.pad(p, (0, width - p.shape[1]), value=fill[f.name])
                for p in parts
            ]
        out[f.name] = torch.cat(parts)
    return RolloutBatch(**out)


def build_rollout_batch(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    worker_logprobs: Sequence[Sequence[float]],
    rewards: Sequence[float],
    truncated: Sequence[bool],
    pad_id: int,
    weight_versions: Sequence[int] | None = None,
) -> RolloutBatch:
    """Pack ``prompts[i] + responses[i]`` rows (one per completion; the caller repeats each
    prompt for its samples). ``weight_versions`` (default: all 0) says which published
    weights sampled each completion, for the staleness the trainer logs."""
    if not (
        len(prompts) == len(responses) == len(worker_logprobs) == len(rewards) == len(truncated)
    ):
        raise ValueError("prompts, responses, logprobs, rewards and truncated differ in length")
    if weight_versions is None:
        weight_versions = [0] * len(prompts)
    if len(weight_versions) != len(prompts):
        raise ValueError(f"{len(weight_versions)} weight versions for {len(prompts)} completions")
    width = max(len(p) + len(r) for p, r in zip(prompts, responses)) - 1
    n = len(prompts)
    tokens = torch.full((n, width), pad_id, dtype=torch.long)
    targets = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.bool)
    old = torch.zeros((n, width), dtype=torch.float32)
    for i, (p, r, lp) in enumerate(zip(prompts, responses, worker_logprobs)):
        if len(lp) != len(r):
            raise ValueError(f"completion {i}: {len(r)} tokens but {len(lp)} logprobs")
        if not p:
            raise ValueError(f"completion {i}: empty prompt")
        seq = torch.tensor(list(p) + list(r), dtype=torch.long)
        tokens[i, : len(seq) - 1] = seq[:-1]
        targets[i, : len(seq) - 1] = seq[1:]
        start = len(p) - 1  # position whose target is the first response token
        mask[i, start : start + len(r)] = True
        old[i, start : start + len(r)] = torch.tensor(lp, dtype=torch.float32)
    return RolloutBatch(
        tokens=tokens,
        targets=targets,
        mask=mask,
        worker_logprobs=old,
        rewards=torch.tensor(rewards, dtype=torch.float32),
        response_lens=torch.tensor([len(r) for r in responses], dtype=torch.long),
        truncated=torch.tensor(truncated, dtype=torch.bool),
        weight_versions=torch.tensor(weight_versions, dtype=torch.long),
    )
