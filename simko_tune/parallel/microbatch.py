"""Which rows of a mini-batch each data-parallel rank runs, in which micro-batches.

Math RL responses range from a few tokens to thousands. A fixed number of rows per
micro-batch pads every row to the longest of its neighbours; a token budget with rows grouped
by length (verl's dynamic batch size) computes little padding and fills each forward.
Grouping rows never changes the result: the loss is a sum over rows divided by the
mini-batch's global normaliser, so only the floating-point summation order moves.

FSDP2 and TP run collectives in every forward and backward, so every data-parallel rank must
run the same NUMBER of micro-batches. Each rank holds the whole rollout, so each computes every
rank's plan locally and identically, and takes the largest count; no communication needed.
"""

from __future__ import annotations

import torch


def row_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Positions each row needs in a forward: up to its last valid target (at least 1)."""
    positions = torch.arange(1, mask.shape[1] + 1)
    return (mask.bool() * positions).amax(dim=1).clamp_min(1)


def micro_batches(
    rows: range,
    lengths: torch.Tensor,
    dp_rank: int,
    dp_size: int,
    *,
    max_rows: int,
    max_tokens: int | None,
) -> list[torch.Tensor]:
    """This rank's micro-batches of the mini-batch ``rows``, as tensors of row indices.

    ``lengths[i]`` is row i's forward length (``row_lengths``), indexed by global row.
    ``max_tokens=None``: fixed ``max_rows`` rows per micro-batch from a contiguous share of
    ``rows`` (the plain scheme). Otherwise rows are dealt to ranks longest first, each to the
    rank with the fewest tokens so far (every rank gets the same number of rows), and each
    rank packs its rows, sorted by length, into the fewest micro-batches whose padded size
    (rows × longest row) stays within ``max_tokens``, with the least padding among those; a
    row longer than the budget runs alone.
    Ranks with fewer micro-batches than the busiest one split their largest until the counts
    agree.
    """
    if len(rows) % dp_size:
        raise ValueError(f"{len(rows)} rows do not split evenly over {dp_size} data-parallel ranks")
    per_rank = len(rows) // dp_size
    if max_tokens is None:
        start = rows.start + dp_rank * per_rank
        return [
            torch.arange(s, min(s + max_rows, start + per_rank))
            for s in range(start, start + per_rank, max_rows)
        ]
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    plans = [_pack(share, lengths, max_tokens) for share in _deal(rows, lengths, dp_size)]
    target = max(len(p) for p in plans)
    mine = plans[dp_rank]
    while len(mine) < target:
        mine = _split_largest(mine, lengths)
    return [torch.tensor(sorted(b), dtype=torch.long) for b in mine]


def _deal(rows: range, lengths: torch.Tensor, dp_size: int) -> list[list[int]]:
    """Rows to ranks, longest first, each to the least-loaded rank with room (equal counts)."""
    per_rank = len(rows) // dp_size
    order = sorted(rows, key=lambda r: (-int(lengths[r]), r))
    shares: list[list[int]] = [[] for _ in range(dp_size)]
    load = [0] * dp_size
    for r in order:
        rank = min(
            (k for k in range(dp_size) if len(shares[k]) < per_rank), key=lambda k: (load[k], k)
        )
        shares[rank].append(r)
        load[rank] += int(lengths[r])
    return shares


def _pack(share: list[int], lengths: torch.Tensor, max_tokens: int) -> list[list[int]]:
    """Rows (longest first) into the fewest consecutive bins of padded size ≤ ``max_tokens``
    and, among those, the least padding.

    Filling bins greedily gives the fewest, but it fills the first bins up to the budget
    with rows far shorter than their first one; a row-count cut placed further on pads
    less with as many bins (fewer padded positions: less compute in every forward and
    backward). Found exactly by dynamic programming over the sorted rows: ``best[i]`` is
    ``(bins, padded positions, end of the first bin)`` for rows ``i:``, minimised in that order.
    """
    order = sorted(share, key=lambda r: (-int(lengths[r]), r))
    sizes = [int(lengths[r]) for r in order]
    n = len(order)
    best: list[tuple[int, int, int]] = [(0, 0, n)] * (n + 1)
    for i in range(n - 1, -1, -1):
        # a bin starting at row i is padded to sizes[i]; a row over the budget runs alone
        most = max(1, max_tokens // sizes[i])
        best[i] = min(
            (best[j][0] + 1, best[j][1] + (j - i) * sizes[i], j)
            for j in range(i + 1, min(i + most, n) + 1)
        )
    bins, i = [], 0
    while i < n:
        bins.append(order[i : best[i][2]])
        i = best[i][2]
    return bins


def _split_largest(bins: list[list[int]], lengths: torch.Tensor) -> list[list[int]]:
    """Split the bin with the largest padded size that has at least two rows in halves."""
    splittable = [i for i, b in enumerate(bins) if len(b) > 1]
    if not splittable:  # cannot happen: every rank holds the same number of rows
        raise RuntimeError("no micro-batch left to split")
    i = max(splittable, key=lambda i: len(bins[i]) * int(lengths[bins[i][0]]))
    b = bins[i]
    half = len(b) // 2
    return bins[:i] + [b[:half], b[half:]] + bins[i + 1 :]
