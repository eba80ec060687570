"""The recipe as a torchrun rank, with faults injected into rank 0's generation by the
environment (tests only; the recipe itself has no hook for this):

- ``SIMKO_TEST_GENERATE_SLEEP_S``: each generation takes that much longer;
- ``SIMKO_TEST_GENERATE_FAIL``: generation raises ``RuntimeError`` with this message;
- ``SIMKO_TEST_SIGNAL``: ``generate:N`` sends this process SIGTERM during its N-th generate
  call (rank 0 generates), ``update:N:R`` during step N's update on rank R (one rank only:
  the others must learn of it through the agreement, as when a scheduler signals one node).
"""

from __future__ import annotations

import os
import signal
import sys
import time

import simko_recipe

from simko_tune.generation import NativeGenerator
from simko_tune.ppo import PPOUpdate

_generate = NativeGenerator.generate
_update = PPOUpdate.update
_calls = {"generate": 0}
_where, *_at = os.environ.get("SIMKO_TEST_SIGNAL", ":").split(":")


def _faulty_generate(self, *args, **kwargs):
    time.sleep(float(os.environ.get("SIMKO_TEST_GENERATE_SLEEP_S", "0")))
    message = os.environ.get("SIMKO_TEST_GENERATE_FAIL")
    if message:
        raise RuntimeError(message)
    _calls["generate"] += 1
    if _where == "generate" and _calls["generate"] == int(_at[0]):
        os.kill(os.getpid(), signal.SIGTERM)
    return _generate(self, *args, **kwargs)


def _signalled_update(self, rollout, *args, step=None, **kwargs):
    rank = int(os.environ.get("RANK", "0"))
    if _where == "update" and step == int(_at[0]) and rank == int(_at[1]):
        os.kill(os.getpid(), signal.SIGTERM)
    return _update(self, rollout, *args, step=step, **kwargs)


NativeGenerator.generate = _faulty_generate
PPOUpdate.update = _signalled_update

if __name__ == "__main__":
    sys.exit(simko_recipe.recipe_main())
