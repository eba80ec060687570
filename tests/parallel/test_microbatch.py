"""Token-budget micro-batches: every row exactly once, equal counts over data-parallel ranks,
budgets kept, and the plain fixed-size scheme unchanged."""

from __future__ import annotations

import pytest
import torch

from simko_tune.parallel.microbatch import micro_batches, row_lengths


def test_row_lengths_reach_the_last_valid_target():
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert row_lengths(mask).tolist() == [3, 5, 1]


def test_fixed_rows_are_contiguous_shares():
    lengths = torch.full((12,), 10)
    got = [
        mb.tolist()
        for mb in micro_batches(range(4, 12), lengths, 1, 2, max_rows=3, max_tokens=None)
    ]
    assert got == [[8, 9, 10], [11]]


@pytest.mark.parametrize("dp_size", [1, 2, 4])
@pytest.mark.parametrize("budget", [1, 50, 400, 1000, 10**6])
def test_budget_plans_cover_every_row_once_with_equal_counts(dp_size, budget):
    gen = torch.Generator().manual_seed(dp_size * 7 + budget)
    lengths = torch.randint(20, 400, (40,), generator=gen)
    rows = range(8, 40)
    plans = [
        micro_batches(rows, lengths, r, dp_size, max_rows=1, max_tokens=budget)
        for r in range(dp_size)
    ]
    assert len({len(p) for p in plans}) == 1, "ranks must run the same number of micro-batches"
    flat = sorted(i for p in plans for mb in p for i in mb.tolist())
    assert flat == list(rows)
    for p in plans:
        assert sum(len(mb) for mb in p) == len(rows) // dp_size
        for mb in p:
            padded = len(mb) * int(lengths[mb].max())
            assert len(mb) == 1 or padded <= budget


def test_budget_groups_rows_by_length_and_keeps_the_budget():
    lengths = torch.tensor([400, 20, 390, 25, 30, 410, 22, 380])
    plan = micro_batches(range(8), lengths, 0, 1, max_rows=1, max_tokens=820)
    groups = [sorted(lengths[mb].tolist()) for mb in plan]
    assert groups == [[400, 410], [380, 390], [20, 22, 25, 30]]
    # the fixed scheme pads two short rows to 400 in every pair
    fixed = micro_batches(range(8), lengths, 0, 1, max_rows=2, max_tokens=None)
    padded = lambda p: sum(len(mb) * int(lengths[mb].max()) for mb in p)  # noqa: E731
    assert padded(plan) < 0.75 * padded(fixed)


def test_uneven_ranks_split_until_counts_agree():
    # rank 0 gets the two long rows (2 micro-batches), rank 1 the short ones (1 by budget)
    lengths = torch.tensor([100, 100, 10, 10])
    plans = [micro_batches(range(4), lengths, r, 2, max_rows=1, max_tokens=100) for r in (0, 1)]
    assert [len(p) for p in plans] == [2, 2]


def test_rows_must_split_over_ranks():
    with pytest.raises(ValueError, match="5 rows do not split evenly over 2"):
        micro_batches(range(5), torch.ones(5), 0, 2, max_rows=1, max_tokens=10)


def _naive_best_packing(sizes: list[int], budget: int) -> tuple[int, int]:
    """(bins, padded positions) of the best split of the sorted rows into consecutive bins,
    by trying every split: fewest bins first, then least padding."""
    sizes = sorted(sizes, reverse=True)
    best = None
    for cuts in range(2 ** (len(sizes) - 1)):  # bit k set: a bin ends after row k
        bins, start = [], 0
        for k in range(len(sizes)):
            if k == len(sizes) - 1 or cuts >> k & 1:
                bins.append(sizes[start : k + 1])
                start = k + 1
        if all(len(b) == 1 or len(b) * b[0] <= budget for b in bins):
            cost = (len(bins), sum(len(b) * b[0] for b in bins))
            best = cost if best is None else min(best, cost)
    return best


def test_packing_pads_less_than_greedy_filling_with_as_many_bins():
    # greedy fills [100, 60] then [59, 58]: 318 positions; [100] + [60, 59, 58] pads 280
    lengths = torch.tensor([100, 60, 59, 58])
    plan = micro_batches(range(4), lengths, 0, 1, max_rows=1, max_tokens=200)
    assert [sorted(lengths[mb].tolist()) for mb in plan] == [[100], [58, 59, 60]]


@pytest.mark.parametrize("seed", range(6))
def test_packing_matches_exhaustive_search(seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(10, 300, (10,), generator=gen)
    budget = int(torch.randint(250, 1200, (1,), generator=gen))
    plan = micro_batches(range(10), lengths, 0, 1, max_rows=1, max_tokens=budget)
    padded = sum(len(mb) * int(lengths[mb].max()) for mb in plan)
    assert (len(plan), padded) == _naive_best_packing(lengths.tolist(), budget)
