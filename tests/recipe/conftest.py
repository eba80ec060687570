"""Fixtures of the recipe tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def policy_dir(tmp_path_factory) -> Path:
    """A tiny warm-started Countdown policy, trained until about a tenth of sampled answers
    are right: rollouts of a few groups then carry a learning signal (mixed rewards in a
    group), which the loop tests require. (Modules that need less define their own.)"""
    from simko_tune.demo.warm_start import WarmStartConfig, build_tiny_policy

    out = tmp_path_factory.mktemp("policy") / "tiny_policy"
    return build_tiny_policy(
        out,
        WarmStartConfig(
            max_steps=400, target_success=0.1, eval_every=20, sft_problems=300, eval_problems=64
        ),
    )
