"""Two real torchrun ranks (gloo): data-parallel gradients with a global normaliser and a
vocabulary-sharded DTensor output weight both reproduce the single-process gradient."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("dist_worker.py")


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    out = tmp_path / "errors.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(WORKER), str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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
