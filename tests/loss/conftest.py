"""Batches for the loss tests: tiny, ragged, with sampled, argmax and clipped tokens."""

from __future__ import annotations

import pytest
import torch

from simko_tune.loss import group_advantages


def make_batch(
    batch: int = 8,
    seq_len: int = 11,
    dim: int = 16,
    vocab: int = 97,
    group_size: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """A rollout batch: row 3 is empty, the others have ragged lengths; targets are sampled
    from the current policy (a third forced to the argmax); old log-probs are perturbed so
    that some ratios clip on both sides; rewards mix correct and incorrect per group."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq_len, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen) * 0.6
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.T, dim=-1)
        sampled = torch.multinomial(logp.exp().view(-1, vocab), 1, generator=gen).view(
            batch, seq_len
        )
        argmax = logp.argmax(-1)
        force = torch.rand(batch, seq_len, generator=gen) < 0.35
        targets = torch.where(force, argmax, sampled)
        current = logp.gather(-1, targets[..., None]).squeeze(-1)
    old = current + 0.3 * torch.randn(batch, seq_len, generator=gen)
    ref = current + 0.2 * torch.randn(batch, seq_len, generator=gen)
    lengths = torch.randint(1, seq_len + 1, (batch,), generator=gen)
    lengths[3] = 0
    lengths[0] = seq_len
    mask = torch.arange(seq_len)[None, :] < lengths[:, None]
    rewards = (torch.rand(batch, generator=gen) < 0.5).float()
    rewards[:2] = torch.tensor([1.0, 0.0])  # the first group is never all-equal
    return {
        "hidden": hidden.to(dtype).requires_grad_(),
        "weight": weight.to(dtype).requires_grad_(),
        "targets": targets,
        "old_logprobs": old,
        "advantages": group_advantages(rewards, group_size),
        "mask": mask,
        "correct": rewards == 1,
        "ref_logprobs": ref,
    }


@pytest.fixture
def batch_factory():
    """``make_batch`` itself (test modules cannot import conftest under importlib mode)."""
    return make_batch
