"""The recipe as a torchrun rank, with faults injected into rank 0's generation by the
environment (tests only; the recipe itself has no hook for this):

- ``SIMKO_TEST_GENERATE_SLEEP_S``: each generation takes that much longer;
- ``SIMKO_TEST_GENERATE_FAIL``: generation raises ``RuntimeError`` with this message.
"""

from __future__ import annotations

import os
import sys
import time

import simko_recipe

from simko_tune.generation import NativeGenerator

_generate = NativeGenerator.generate


def _faulty_generate(self, *args, **kwargs):
    time.sleep(float(os.environ.get("SIMKO_TEST_GENERATE_SLEEP_S", "0")))
    message = os.environ.get("SIMKO_TEST_GENERATE_FAIL")
    if message:
        raise RuntimeError(message)
    return _generate(self, *args, **kwargs)


NativeGenerator.generate = _faulty_generate

if __name__ == "__main__":
    sys.exit(simko_recipe.recipe_main())
