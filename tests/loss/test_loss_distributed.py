"""Two real torchrun ranks (gloo): data-parallel gradients with a global normaliser and a
vocabulary-sharded DTensor output weight both reproduce the single-process gradient."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from harness import run_torchrun

WORKER = Path(__file__).with_name("dist_worker.py")


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    out = tmp_path / "errors.json"
    run_torchrun(2, WORKER, [str(out)], timeout_s=300)
    per_rank = json.loads(out.read_text())
    assert len(per_rank) == 2
    for errors in per_rank:
        assert set(errors) == {
            "dp_token_mean",
            "dp_seq_mean_token_mean",
            "dp_seq_mean_token_sum_norm",
            "tp_dtensor",
        }
        for name, err in errors.items():
            assert err < 1e-5, (name, err)
