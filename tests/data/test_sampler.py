"""PromptBatches: every epoch a seeded permutation; resuming skips and repeats nothing."""

from __future__ import annotations

import json

import pytest

from simko_tune.data import PromptBatches


def take(sampler: PromptBatches, count: int) -> list[list[int]]:
    return [sampler.next_batch() for _ in range(count)]


def test_without_drop_last_each_epoch_covers_every_item_once():
    sampler = PromptBatches(num_items=10, batch_size=4, seed=3, drop_last=False)
    assert sampler.batches_per_epoch == 3
    epochs = [take(sampler, 3) for _ in range(3)]
    for batches in epochs:
        assert [len(b) for b in batches] == [4, 4, 2]
        assert sorted(i for b in batches for i in b) == list(range(10))
    assert epochs[0] != epochs[1] != epochs[2]  # a new permutation each epoch


def test_drop_last_gives_full_batches_without_repeats_within_an_epoch():
    sampler = PromptBatches(num_items=10, batch_size=4, seed=3, drop_last=True)
    assert sampler.batches_per_epoch == 2
    left_out = set()
    for _ in range(20):
        batches = take(sampler, 2)
        items = [i for b in batches for i in b]
        assert [len(b) for b in batches] == [4, 4]
        assert len(set(items)) == 8
        left_out |= set(range(10)) - set(items)
    assert len(left_out) > 2  # a different remainder is dropped in different epochs


def test_same_seed_same_order_other_seed_other_order():
    def order(seed):
        return take(PromptBatches(100, 10, seed=seed), 25)

    assert order(0) == order(0)
    assert order(0) != order(1)


def test_no_shuffle_is_index_order():
    sampler = PromptBatches(5, 2, seed=0, shuffle=False, drop_last=False)
    assert take(sampler, 4) == [[0, 1], [2, 3], [4], [0, 1]]


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("stop_after", [0, 1, 2, 3, 4, 7])
def test_resume_continues_exactly_where_it_stopped(drop_last, stop_after):
    # 3 batches per epoch (10 items, batch 3): stops fall mid-epoch and on epoch boundaries.
    straight = PromptBatches(10, 3, seed=11, drop_last=drop_last)
    expected = take(straight, stop_after + 8)

    first = PromptBatches(10, 3, seed=11, drop_last=drop_last)
    done = take(first, stop_after)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = PromptBatches(10, 3, seed=11, drop_last=drop_last)
    resumed.load_state_dict(state)
    assert done + take(resumed, 8) == expected


@pytest.mark.parametrize(
    "change",
    [{"num_items": 11}, {"batch_size": 4}, {"seed": 12}, {"shuffle": False}, {"drop_last": False}],
)
def test_resume_with_other_settings_is_refused(change):
    settings = {"num_items": 10, "batch_size": 3, "seed": 11, "shuffle": True, "drop_last": True}
    state = PromptBatches(**settings).state_dict()
    other = PromptBatches(**{**settings, **change})
    key = next(iter(change))
    with pytest.raises(ValueError, match=key):
        other.load_state_dict(state)


def test_invalid_sizes():
    with pytest.raises(ValueError):
        PromptBatches(3, 4, seed=0, drop_last=True)
    with pytest.raises(ValueError):
        PromptBatches(3, 0, seed=0)
    assert PromptBatches(3, 4, seed=0, drop_last=False).next_batch() != []


def test_peek_shows_the_next_batch_without_consuming_it():
    s = PromptBatches(10, 4, seed=3)
    for _ in range(5):  # across epoch boundaries too (10 items, batches of 4, drop_last)
        state = s.state_dict()
        peeked = s.peek_batch()
        assert s.state_dict() == state
        assert s.next_batch() == peeked
