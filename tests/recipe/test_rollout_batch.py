"""Packing prompts and completions into next-token tensors, checked position by position."""

from __future__ import annotations

import pytest
import torch

from simko_tune.rollout import build_rollout_batch

PAD = 0


def _reference_rows(prompt, response, logprobs):
    """Plain reference: for each position of the joint sequence but the last, the input,
    the next token, whether that next token belongs to the response, and its logprob."""
    seq = prompt + response
    rows = []
    for t in range(len(seq) - 1):
        j = t + 1 - len(prompt)  # index of the target inside the response
        in_response = j >= 0
        rows.append((seq[t], seq[t + 1], in_response, logprobs[j] if in_response else 0.0))
    return rows


def test_positions_match_reference():
    prompts = [[5, 6, 7], [8], [9, 10]]
    responses = [[11, 12], [13, 14, 15, 16], []]
    logprobs = [[-0.1, -0.2], [-1.0, -2.0, -3.0, -4.0], []]
    batch = build_rollout_batch(
        prompts, responses, logprobs, [1.0, 0.0, 0.0], [False, True, False], PAD
    )
    assert batch.tokens.shape == (3, 4)
    for i, (p, r, lp) in enumerate(zip(prompts, responses, logprobs)):
        ref = _reference_rows(p, r, lp)
        for t, (inp, tgt, valid, old) in enumerate(ref):
            assert batch.tokens[i, t] == inp
            assert batch.targets[i, t] == tgt
            assert bool(batch.mask[i, t]) == valid
            assert batch.worker_logprobs[i, t].item() == pytest.approx(old)
        assert not batch.mask[i, len(ref) :].any()
        assert (batch.tokens[i, len(ref) :] == PAD).all()
    assert batch.response_lens.tolist() == [2, 4, 0]
    assert batch.truncated.tolist() == [False, True, False]
    # the response tokens are recovered exactly from targets under the mask
    for i, r in enumerate(responses):
        assert batch.targets[i][batch.mask[i]].tolist() == r


def test_select_trims_to_rows():
    batch = build_rollout_batch(
        [[1, 2], [3]], [[4], [5, 6, 7, 8, 9]], [[-1.0], [-1.0] * 5], [0.0, 1.0], [False, False], PAD
    )
    first = batch.select(slice(0, 1))
    assert first.tokens.shape == (1, 2) and first.mask.sum() == 1
    both = batch.select(torch.tensor([1, 0]))
    assert both.rewards.tolist() == [1.0, 0.0] and both.tokens.shape[1] == batch.tokens.shape[1]


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="completion 0"):
        build_rollout_batch([[1]], [[2, 3]], [[-1.0]], [0.0], [False], PAD)
