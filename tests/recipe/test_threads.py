"""A CPU trainer rank uses the cores it may run on, shared among the ranks on its node,
unless OMP_NUM_THREADS says otherwise: the rule, then real `tune run` launches. Its malloc
keeps what it frees for the next step."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import sys
from pathlib import Path

import pytest
from harness import TUNE_RUN, child_env, run_process, run_torchrun

from simko_tune.parallel import cpu_threads


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})


def test_every_core_of_the_mask_for_one_rank(four_cores):
    threads, source = cpu_threads({})
    assert threads == 4 and "4 cores in this process's affinity mask / 1 local rank" in source


def test_local_ranks_split_the_mask(four_cores):
    assert cpu_threads({"LOCAL_WORLD_SIZE": "2"})[0] == 2
    assert cpu_threads({"LOCAL_WORLD_SIZE": "3"})[0] == 1  # 4 // 3
    assert cpu_threads({"LOCAL_WORLD_SIZE": "8"})[0] == 1  # never zero


def test_an_explicit_variable_wins(four_cores):
    assert cpu_threads({"OMP_NUM_THREADS": "3"}) == (3, "OMP_NUM_THREADS")
    threads, source = cpu_threads({"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"})
    assert threads == 1 and "or by torchrun" in source
    for bad in ("0", "two", "-1"):
        with pytest.raises(ValueError, match=f"OMP_NUM_THREADS={bad!r}"):
            cpu_threads({"OMP_NUM_THREADS": bad})


# Steps' worth of freeing and allocating again, in a fresh process: the minor page faults of
# each 64 MiB block (over glibc's largest mmap threshold, 32 MiB), one block per "step".
# torch allocates with posix_memalign(64), which asks glibc for the block plus the alignment
# and a minimal chunk: a freed block fits its successor only once merged with a neighbour.
# Before glibc 2.39 (bug 30723) memalign puts the slivers it trims into the thread's tcache,
# where nothing merges; each such sliver strands one freed block until the tcache bin of its
# size is full (7 chunks; the slivers come in 7 sizes, 32 to 128 bytes). How full those bins
# are depends on what ran before, so the child empties them after its first block: every run
# starts from the worst case, which must still end within the bound.
_REFAULTS = """
import ctypes, json, resource, sys, torch
torch.set_num_threads(1)
if sys.argv[1] == "keep":
    from simko_tune.parallel import keep_freed_memory
    print(keep_freed_memory(), file=sys.stderr)
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(64 << 20, dtype=torch.uint8)
    block.fill_(1)
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
counts = [faults()]
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
held = [libc.malloc(size) for size in range(24, 121, 16) for _ in range(7)]
counts += [faults() for _ in range(int(sys.argv[2]) - 1)]
print(json.dumps(counts))
"""
_SLIVER_SLOTS = 7 * 7  # tcache slots of the sliver sizes: at most this many stranded blocks
_STEADY = 12  # trailing iterations that must fault nothing


def _refaults(mode: str, iterations: int) -> tuple[list[int], str]:
    run = run_process([sys.executable, "-c", _REFAULTS, mode, str(iterations)], env=child_env())
    return json.loads(run.stdout.splitlines()[-1]), run.stderr


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc"
)
def test_freed_memory_is_kept_for_the_next_step():
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    default, _ = _refaults("default", 8)
    # every block is faulted in again, page by page
    assert min(default) >= pages * 0.9, default
    # the first block, a first-use allocation of torch's that may strand the second, the
    # stranded ones, then the steady state
    kept, stderr = _refaults("keep", 2 + _SLIVER_SLOTS + _STEADY)
    assert "keeps freed memory" in stderr, stderr
    # once the freed blocks merge, the same pages are reused: no fault at all
    assert max(kept[-_STEADY:]) < pages * 0.05, kept


# --------------------------------------------------------------------------- real launches


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    from simko_tune.demo.warm_start import WarmStartConfig, build_tiny_policy

    out = tmp_path_factory.mktemp("policy") / "tiny_policy"
    return build_tiny_policy(
        out, WarmStartConfig(max_steps=5, target_success=None, sft_problems=64, eval_problems=8)
    )


def _args(out: Path, policy: Path, transfer: str = "memory") -> list[str]:
    return [
        "--config", "tiny_cpu", f"output_dir={out}", f"model_dir={policy}", "prepare_model=null",
        "max_steps=1", "rollout.prompts_per_step=2", "ppo.mini_batch_prompts=2",
        "dataset.n=16", "eval.every_n_steps=0", "eval.before_training=false",
        "generation.backend=native", f"generation.weight_transfer={transfer}",
        f"generation.sync_dir={out}/sync",
        "checkpoint.every_n_steps=0",
    ]  # fmt: skip


def _threads_line(text: str) -> tuple[int, str]:
    match = re.search(r"trainer threads: (\d+) \((.*)\)", text)
    assert match, text[-3000:]
    return int(match.group(1)), match.group(2)


def _user_env() -> dict[str, str]:
    """What a user's shell has: no thread variable."""
    env = child_env()
    env.pop("OMP_NUM_THREADS")
    return env


@pytest.mark.slow
def test_tune_run_uses_every_core_in_its_mask(tmp_path, policy_dir):
    cores = sorted(os.sched_getaffinity(0))
    run = run_process([*TUNE_RUN, "simko_recipe", *_args(tmp_path / "all", policy_dir)],
                      env=_user_env(), cwd=tmp_path)  # fmt: skip
    assert _threads_line(run.stderr) == (
        len(cores),
        f"{len(cores)} cores in this process's affinity mask / 1 local rank(s)",
    )
    assert "trainer heap: glibc" in run.stderr and "keeps freed memory" in run.stderr
    if shutil.which("taskset") is None:
        pytest.skip("taskset is not installed: the narrowed mask cannot be checked")
    narrow = run_process(
        ["taskset", "-c", str(cores[0]), *TUNE_RUN, "simko_recipe",
         *_args(tmp_path / "one", policy_dir)],
        env=_user_env(), cwd=tmp_path,
    )  # fmt: skip
    assert _threads_line(narrow.stderr)[0] == 1


@pytest.mark.slow
def test_an_explicit_variable_wins_in_a_real_run(tmp_path, policy_dir):
    run = run_process([*TUNE_RUN, "simko_recipe", *_args(tmp_path / "out", policy_dir)],
                      env={**_user_env(), "OMP_NUM_THREADS": "3"}, cwd=tmp_path)  # fmt: skip
    assert _threads_line(run.stderr) == (3, "OMP_NUM_THREADS")


@pytest.mark.slow
def test_two_local_ranks_each_take_one_share(tmp_path, policy_dir):
    """Under torchrun with several ranks the variable is always set: torchrun sets it to 1
    when the user did not, and the rank says where it may come from. (Without it, the rule
    would give each rank its share: ``test_local_ranks_split_the_mask``.)"""
    args = _args(tmp_path / "out", policy_dir, transfer="files")  # memory: one rank only
    run = run_torchrun(2, "simko_recipe", args, launcher=TUNE_RUN,
                       cwd=tmp_path, env=_user_env())  # fmt: skip
    assert _threads_line(run.stderr) == (
        1,
        "OMP_NUM_THREADS (set by you, or by torchrun for several local ranks)",
    )
