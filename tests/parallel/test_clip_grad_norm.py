"""clip_grad_norm_ across mesh groups equals torch's on plain tensors (the multi-mesh case
runs in the recipe's TP=2 test against one process)."""

from __future__ import annotations

import torch

from simko_tune.parallel import clip_grad_norm_


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(5, 3, generator=g)) for _ in range(3)]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 3
    ps.append(torch.nn.Parameter(torch.randn(2)))  # no grad: ignored
    return ps


def test_matches_torch_clip():
    mine, ref = _params(0), _params(0)
    total = clip_grad_norm_(mine, 1.0)
    ref_total = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    plain = torch.sqrt(sum((p.grad**2).sum() for p in _params(0)[:3]))
    torch.testing.assert_close(total, plain)
    torch.testing.assert_close(total, ref_total)
    for a, b in zip(mine[:3], ref[:3]):
        torch.testing.assert_close(a.grad, b.grad)
    assert torch.sqrt(sum((p.grad**2).sum() for p in mine[:3])) <= 1.0 + 1e-5


def test_no_clipping_below_the_limit():
    ps = _params(1)
    before = [p.grad.clone() for p in ps[:3]]
    total = clip_grad_norm_(ps, 1e6)
    assert total > 1
    for a, b in zip(ps[:3], before):
        torch.testing.assert_close(a.grad, b)
