"""Rewards scripted by (step, round) for the zero-variance tests; run as a script, the
recipe as a torchrun rank with that script (tests only; the recipe has no hook for this).

``SIMKO_TEST_REWARDS``: JSON, a list per step (cycled) of a list per sampling round (the last
one repeats) of the rewards of that round's completions. Keyed by step and round, not by
call, so that a resumed run scores as the run it continues."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable

import simko_recipe

Script = Callable[[int, int], list[float]]


def from_table(table: list[list[list[float]]]) -> Script:
    """``table[step][round]``, steps cycled, the last round repeated."""

    def script(step: int, round_: int) -> list[float]:
        rounds = table[step % len(table)]
        return [float(r) for r in rounds[min(round_, len(rounds) - 1)]]

    return script


def scripted_sample(script: Script):
    """A ``SimKORecipe.sample`` whose completions score ``script(step, round_)`` (generation,
    decoding and the rest run as they do)."""
    sample = simko_recipe.SimKORecipe.sample

    def scripted(self, indices, step, version, round_=0):
        pool = self.reward_pool
        pool.score = lambda texts, golds: script(step, round_)
        try:
            return sample(self, indices, step, version, round_)
        finally:
            del pool.score

    return scripted


if __name__ == "__main__":
    table = json.loads(os.environ["SIMKO_TEST_REWARDS"])
    simko_recipe.SimKORecipe.sample = scripted_sample(from_table(table))
    sys.exit(simko_recipe.recipe_main())
