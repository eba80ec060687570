"""One-step-off rollouts and the skipped old-log-prob pass, on the real recipe in process
(native generator, real reward pool, a quickly warm-started Countdown policy so rewards and
advantages are not all zero)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from simko_tune.config import check_schema, resolve_config_path
from simko_tune.generation import StaleWeightsError

pytestmark = pytest.mark.slow


def make_recipe(out: Path, policy: Path, **overrides):
    import simko_recipe

    cfg = OmegaConf.load(resolve_config_path("tiny_cpu"))
    settings = {
        "output_dir": str(out),
        "model_dir": str(policy),
        "prepare_model": None,
        "generation.backend": "native",
        "generation.weight_transfer": "files",  # publications, as the workers read
        "generation.sync_dir": str(out / "sync"),
        "dataset.n": 32,
        "rollout.prompts_per_step": 4,
        "ppo.mini_batch_prompts": 2,
        "ppo.micro_batch_size": 8,
        "rollout.samples_per_prompt": 4,
        "rewards.num_workers": 1,
        "eval.before_training": False,
        "eval.every_n_steps": 0,
        "checkpoint.every_n_steps": 1000,
        "log.samples_every_n_steps": 0,
        "max_steps": 2,
        **overrides,
    }
    for key, value in settings.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    recipe = simko_recipe.SimKORecipe(check_schema(cfg))
    recipe.setup()
    return recipe


def _weights(recipe) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in recipe.model.state_dict().items()}


def _spy_updates(recipe) -> list[dict]:
    """Record every update's rollout, the trainer's weight version and its wall-clock span."""
    seen, update, old_logprobs = [], recipe.ppo.update, recipe.ppo.old_logprobs

    def spy(rollout, old, ref=None, is_cap=None, step=None):
        t0 = time.perf_counter()
        # every row's log-probs under the weights before the update, for the checks
        proximal, _ = old_logprobs(rollout)
        stats = update(rollout, old, ref, is_cap, step)
        seen.append(
            {
                "rollout": rollout,
                "version": recipe.weight_version,
                "old": old,
                "proximal": proximal,
                "is_cap": is_cap,
                "stats": stats,
                "span": (t0, time.perf_counter()),
            }
        )
        return stats

    recipe.ppo.update = spy
    return seen


def _update_twice(recipe, rollout, first: dict, second: dict) -> tuple[dict, dict, list[dict]]:
    """Two updates of ``rollout`` from the same weights and optimizer state (``first``,
    ``second``: keyword arguments of ``_update``): their stats, and the gradients each one
    stepped with."""
    start_model, start_optim = _weights(recipe), recipe.optimizer.state_dict()
    grads: list[dict[str, torch.Tensor]] = []
    step = recipe.optimizer.step

    def capture(*args, **kwargs):
        grads.append({n: p.grad.clone() for n, p in recipe.model.named_parameters()})
        return step(*args, **kwargs)

    recipe.optimizer.step = capture
    try:
        a = recipe.ppo.update(rollout, **first)
        recipe.model.load_state_dict(start_model)
        recipe.optimizer.load_state_dict(start_optim)
        b = recipe.ppo.update(rollout, **second)
    finally:
        recipe.optimizer.step = step
    return a, b, grads


def _prompts(rollout) -> list[tuple[int, ...]]:
    """Each row's prompt tokens: the inputs up to and including the position whose target
    is the first response token."""
    out = []
    for i in range(len(rollout)):
        start = int(rollout.mask[i].nonzero()[0])
        out.append(tuple(rollout.tokens[i, : start + 1].tolist()))
    return out


def test_staleness_zero_is_the_synchronous_loop(tmp_path, policy_dir):
    """train() at max_staleness 0 equals the synchronous loop written out plainly here:
    draw, sample + score with the current weights, old log-probs, update, publish."""
    ref = make_recipe(tmp_path / "ref", policy_dir)
    try:
        initial = _weights(ref)
        ref_rollouts = []
        for _ in range(2):
            rollout, _ = ref.get_rollout(ref.batches.next_batch(), {})
            assert bool((rollout.weight_versions == ref.weight_version).all())
            old = ref.ppo.old_logprobs(rollout, policy_rows=ref.ppo.old_logprob_rows(rollout))
            ref.ppo.update(rollout, *old)
            ref._publish(ref.weight_version + 1)
            ref.step += 1
            ref_rollouts.append(rollout)
        expected = _weights(ref)
    finally:
        ref.cleanup()

    run = make_recipe(
        tmp_path / "run",
        policy_dir,
        **{"rollout.max_staleness": 0, "checkpoint.every_n_steps": 0},  # 0: the final save only
    )
    try:
        seen = _spy_updates(run)
        saved, save = [], run.save_checkpoint
        run.save_checkpoint = lambda: (saved.append(run.step), save())
        run.train()
        got = _weights(run)
    finally:
        run.cleanup()
    assert len(seen) == 2 and all(s["is_cap"] is None for s in seen)
    assert saved == [2]
    assert any(float(r.rewards.std()) > 0 for r in ref_rollouts), "no learning signal"
    for s, r in zip(seen, ref_rollouts):
        assert torch.equal(s["rollout"].tokens, r.tokens)
        assert torch.equal(s["rollout"].rewards, r.rewards)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert any(not torch.equal(got[k], initial[k]) for k in got)


def test_one_update_per_rollout_skips_the_old_logprob_pass(tmp_path, policy_dir):
    """Mini-batch = whole batch, one epoch, on-policy: no separate pass, and the loss and the
    gradients equal those computed with the pass."""
    recipe = make_recipe(tmp_path / "out", policy_dir, **{"ppo.mini_batch_prompts": 4})
    try:
        rollout, _ = recipe.get_rollout(recipe.batches.next_batch(), {})
        assert len(recipe.ppo.old_logprob_rows(rollout)) == 0
        assert recipe.ppo.old_logprobs(rollout, recipe.ppo.old_logprob_rows(rollout)) == (
            None,
            None,
        )
        rollout.rewards[:] = torch.tensor([1.0, 0.0] * (len(rollout) // 2))  # non-zero advantages
        # a visible generator-vs-trainer mismatch (the native generator's is ~0)
        gen = torch.Generator().manual_seed(0)
        rollout.worker_logprobs += 0.3 * torch.randn(rollout.mask.shape, generator=gen)
        old, _ = recipe.ppo.old_logprobs(rollout)
        with_pass, without_pass, grads = _update_twice(
            recipe, rollout, {"old_logprobs": old}, {"old_logprobs": None}
        )
    finally:
        recipe.cleanup()
    assert len(grads) == 2
    assert with_pass["loss"] == pytest.approx(without_pass["loss"], rel=1e-6, abs=1e-9)
    assert without_pass["ratio_mean"] == 1.0
    # the mismatch diagnostic, measured in the update instead of the skipped pass, equals
    # the pass's, written out plainly here
    m = rollout.mask
    diff = (old - rollout.worker_logprobs).abs()[m]
    assert with_pass["logprob_mismatch/mean_abs"] == pytest.approx(
        without_pass["logprob_mismatch/mean_abs"]
    )
    assert without_pass["logprob_mismatch/mean_abs"] == pytest.approx(float(diff.mean()), rel=1e-5)
    assert without_pass["logprob_mismatch/max_abs"] == pytest.approx(float(diff.max()), rel=1e-5)
    assert any(g.abs().max() > 0 for g in grads[0].values())
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_the_train_loop_passes_only_the_rows_after_the_first_optimizer_step(tmp_path, policy_dir):
    """The separate old-log-prob pass covers every row but the first mini-batch's (NaN
    there: the loss takes the current ones), all rows with two epochs, none with one
    update; off-policy, the importance weights are always the loss's (``is_cap``)."""
    g = 4  # rollout.samples_per_prompt in make_recipe
    for name, overrides, skipped_rows in (
        ("one_update", {"ppo.mini_batch_prompts": 4, "max_steps": 1}, None),
        ("two_updates", {"ppo.mini_batch_prompts": 2, "max_steps": 1}, 2 * g),
        ("four_updates", {"ppo.mini_batch_prompts": 1, "max_steps": 1}, g),
        ("two_epochs", {"ppo.mini_batch_prompts": 4, "ppo.epochs": 2, "max_steps": 1}, 0),
        (
            "off_policy_two_updates",
            {"ppo.mini_batch_prompts": 2, "rollout.max_staleness": 1},
            2 * g,
        ),
        ("off_policy_one_update", {"ppo.mini_batch_prompts": 4, "rollout.max_staleness": 1}, None),
    ):
        recipe = make_recipe(tmp_path / name, policy_dir, **overrides)
        try:
            seen = _spy_updates(recipe)
            recipe.train()
        finally:
            recipe.cleanup()
        assert seen, name
        for s in seen:
            if skipped_rows is None:
                assert s["old"] is None, name
                continue
            nan_rows = s["old"].isnan().all(dim=1)
            assert nan_rows[:skipped_rows].all() and not nan_rows[skipped_rows:].any(), name
            # the rows that were passed hold the pre-update policy's log-probs
            m = s["rollout"].mask[skipped_rows:]
            torch.testing.assert_close(
                s["old"][skipped_rows:][m], s["proximal"][skipped_rows:][m], rtol=0, atol=1e-5
            )
            assert "logprob_mismatch/mean_abs" in s["stats"], name
        caps = [s["is_cap"] for s in seen]
        assert caps == [2.0 if name.startswith("off_policy") else None] * len(seen), name
        assert all("is_weight/mean" in s["stats"] for s in seen if s["is_cap"]), name


def test_the_first_mini_batch_without_its_pass_equals_the_full_pass(tmp_path, policy_dir):
    """Several optimizer steps per rollout, on- and off-policy: skipping the first
    mini-batch's rows in the old-log-prob pass (the loss takes their current log-probs)
    gives every step's loss and gradients, and the importance weights' statistics, of the
    pass over every row."""
    for staleness in (0, 1):
        recipe = make_recipe(
            tmp_path / f"s{staleness}",
            policy_dir,
            **{"ppo.mini_batch_prompts": 2, "rollout.max_staleness": staleness},
        )
        try:
            rollout, _ = recipe.get_rollout(recipe.batches.next_batch(), {})
            rollout.rewards[:] = torch.tensor([1.0, 0.0] * (len(rollout) // 2))
            gen = torch.Generator().manual_seed(0)
            rollout.worker_logprobs += 0.8 * torch.randn(rollout.mask.shape, generator=gen)
            full, _ = recipe.ppo.old_logprobs(rollout)
            skipped, _ = recipe.ppo.old_logprobs(rollout, recipe.ppo.old_logprob_rows(rollout))
            assert int(skipped.isnan().all(dim=1).sum()) == len(rollout) // 2
            is_cap = 2.0 if staleness else None
            with_pass, without, grads = _update_twice(
                recipe,
                rollout,
                {"old_logprobs": full, "is_cap": is_cap},
                {"old_logprobs": skipped, "is_cap": is_cap},
            )
            with pytest.raises(ValueError, match="old log-probs are missing"):
                late = full.clone()
                late[-1] = float("nan")  # a row past the first optimizer step
                recipe.ppo.update(rollout, late, None, is_cap)
            with pytest.raises(ValueError, match="old log-probs are missing"):
                recipe.ppo.update(rollout, None, None, is_cap)  # two mini-batches need a pass
        finally:
            recipe.cleanup()
        assert with_pass["loss"] == pytest.approx(without["loss"], rel=1e-5, abs=1e-9)
        if staleness:  # the weights' statistics, against the pass's, written out plainly
            m = rollout.mask
            raw = torch.exp(full - rollout.worker_logprobs)[m]
            assert 0 < float((raw > 2.0).float().mean()) < 1
            assert without["is_weight/mean"] == pytest.approx(
                float(raw.clamp(max=2.0).mean()), rel=1e-5
            )
            assert without["is_weight/capped_frac"] == pytest.approx(
                float((raw > 2.0).float().mean())
            )
        assert len(grads) == 4 and any(g.abs().max() > 0 for g in grads[0].values())
        for name, g in grads[0].items():  # the first step of each, then the second
            torch.testing.assert_close(grads[2][name], g, rtol=1e-5, atol=1e-7, msg=name)
        for name, g in grads[1].items():
            torch.testing.assert_close(grads[3][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_one_step_off_overlaps_generation_with_the_update(tmp_path, policy_dir):
    small_eval = {"_component_": "simko_tune.demo.countdown.load_countdown", "split": "test"}
    recipe = make_recipe(
        tmp_path / "out",
        policy_dir,
        **{
            "rollout.max_staleness": 1,
            "max_steps": 3,
            "eval.every_n_steps": 2,
            "eval.n": 2,
            "eval.max_tokens": 8,
            "eval.sets": {"countdown_test": {**small_eval, "n": 2, "seed": 0}},
        },
    )
    try:
        seen = _spy_updates(recipe)
        spans, generate = [], recipe.generator.generate
        loads, load_weights = [], recipe.generator.load_weights

        def timed_generate(*args, **kwargs):
            t0 = time.perf_counter()
            out = generate(*args, **kwargs)
            spans.append((t0, time.perf_counter(), threading.current_thread().name))
            return out

        def timed_load(version, *args, **kwargs):
            t0 = time.perf_counter()
            load_weights(version, *args, **kwargs)
            loads.append((version, t0, threading.current_thread().name))

        recipe.generator.generate = timed_generate
        recipe.generator.load_weights = timed_load
        proximal_starts, old_logprobs = [], recipe.ppo.old_logprobs

        def timed_old_logprobs(rollout, **kwargs):
            proximal_starts.append(time.perf_counter())
            return old_logprobs(rollout, **kwargs)

        recipe.ppo.old_logprobs = timed_old_logprobs
        recipe.train()
    finally:
        recipe.cleanup()
    # step 1 samples with the starting weights; steps 2, 3 train on rollouts one version old
    staleness = [int((s["version"] - s["rollout"].weight_versions).max()) for s in seen]
    assert staleness == [0, 1, 1]
    for s, st in zip(seen, staleness):  # every row, not just one
        assert int((s["version"] - s["rollout"].weight_versions).min()) == st
    # the importance weights are the truncated proximal/behaviour ratios
    for s in seen:
        m = s["rollout"].mask
        expected = torch.exp(s["proximal"] - s["rollout"].worker_logprobs).clamp(max=2.0)
        assert s["stats"]["is_weight/mean"] == pytest.approx(float(expected[m].mean()), rel=1e-4)
    # generation of step t+1 ran in the background thread, overlapping step t's trainer work
    # (the proximal log-prob pass, then the update); the evaluation after step 2 generated
    # in the main thread
    assert len(spans) == 4 and spans[0][2] == "MainThread" and spans[3][2] == "MainThread"
    for (g0, g1, thread), start, update in zip(spans[1:3], proximal_starts, seen[:2]):
        assert thread != "MainThread"
        assert g0 < update["span"][1] and g1 > start, "generation did not overlap the trainer"
    # Deliveries: v1 by the rollout thread just before it sampled step 3's rollout, while
    # step 2 updated (the trainer itself only wrote it); v2 by the evaluation after step
    # 2, which must see the trainer's weights; v3, the last, at once (nothing prefetches).
    assert [(v, thread == "MainThread") for v, _, thread in loads] == [
        (1, False),
        (2, True),
        (3, True),
    ]
    assert spans[1][1] <= loads[0][1] <= spans[2][0], "v1 not loaded between the rollouts"
    assert loads[0][1] < seen[1]["span"][1], "the reload did not overlap the update"
    assert spans[3][0] > loads[1][1]  # the evaluation generated with v2


@pytest.mark.parametrize("staleness", [0, 1])
def test_in_memory_weight_transfer_trains_as_the_publication_path(tmp_path, policy_dir, staleness):
    """``generation.weight_transfer=memory`` (snapshots handed to the native generator) gives
    the same rollouts and weights as publishing through files, synchronous and one-step-off,
    and leaves no sync dir behind."""
    runs = {}
    for transfer in ("files", "memory"):
        recipe = make_recipe(
            tmp_path / transfer,
            policy_dir,
            **{
                "generation.weight_transfer": transfer,
                "rollout.max_staleness": staleness,
                "max_steps": 3,
            },
        )
        try:
            seen = _spy_updates(recipe)
            loads = []
            recipe.weight_sync.consumer = _Recording(recipe.generator, loads)
            recipe.train()
            runs[transfer] = (seen, _weights(recipe), loads)
        finally:
            recipe.cleanup()
    (files, files_weights, file_loads), (memory, memory_weights, memory_loads) = (
        runs["files"],
        runs["memory"],
    )
    # one-step-off never serves v2: step 3 sampled with v1, and v3 came after the last step
    delivered = [1, 2, 3] if staleness == 0 else [1, 3]
    assert file_loads == [(v, "load_weights") for v in delivered]
    assert memory_loads == [(v, "load_state") for v in delivered]
    assert not (tmp_path / "memory" / "sync").exists()
    assert any(float(s["rollout"].rewards.std()) > 0 for s in files), "no learning signal"
    for a, b in zip(files, memory, strict=True):
        assert a["version"] == b["version"]
        assert torch.equal(a["rollout"].tokens, b["rollout"].tokens)
        assert torch.equal(a["rollout"].weight_versions, b["rollout"].weight_versions)
        assert torch.equal(a["rollout"].worker_logprobs, b["rollout"].worker_logprobs)
    for k in files_weights:
        assert torch.equal(files_weights[k], memory_weights[k]), k


class _Recording:
    """A generator wrapper for WeightSync that records which way each version came in."""

    def __init__(self, generator, loads: list) -> None:
        self.generator, self.loads = generator, loads
        if hasattr(generator, "load_state"):
            self.load_state = self._load_state

    def load_weights(self, version, *args, **kwargs):
        self.loads.append((version, "load_weights"))
        return self.generator.load_weights(version, *args, **kwargs)

    def _load_state(self, version, state):
        self.loads.append((version, "load_state"))
        return self.generator.load_state(version, state)


def test_version_window_is_enforced(tmp_path, policy_dir):
    import simko_recipe

    for staleness in (0, 1):
        recipe = make_recipe(
            tmp_path / f"s{staleness}", policy_dir, **{"rollout.max_staleness": staleness}
        )
        try:
            recipe.weight_version = 5  # as after five publications
            indices = recipe.batches.next_batch()
            for version in (6, 5, 4, 3):
                sampled = recipe.sample(indices, recipe.step, recipe.generator.weight_version)
                sampled.batch.weight_versions[:] = version
                sampled.batch.weight_versions[0] = 5  # one row in the window is not enough
                allowed = 5 - staleness <= version <= 5
                if allowed:
                    recipe.get_rollout(indices, {}, sampled)
                else:
                    with pytest.raises(StaleWeightsError, match=f"{5 - staleness}..5"):
                        recipe.get_rollout(indices, {}, sampled)
            with pytest.raises(RuntimeError, match="prefetched rollout is for prompts"):
                recipe.get_rollout(recipe.batches.peek_batch(), {}, sampled)
        finally:
            recipe.cleanup()
    assert simko_recipe.SampledRollout  # the type the prefetcher hands over


def test_kill_and_resume_neither_loses_nor_repeats_a_prompt(tmp_path, policy_dir):
    """At staleness 1 a checkpoint is taken while the next step's rollout is already
    sampled. Killed right after it and resumed, the run trains on exactly the prompts an
    uninterrupted run trains on."""
    common = {"rollout.max_staleness": 1, "max_steps": 4, "checkpoint.every_n_steps": 2}

    def trained(seen) -> Counter:
        return Counter(p for s in seen for p in _prompts(s["rollout"]))

    full = make_recipe(tmp_path / "full", policy_dir, **common)
    try:
        seen = _spy_updates(full)
        full.train()
        expected = trained(seen)
    finally:
        full.cleanup()

    out = tmp_path / "killed"
    first = make_recipe(out, policy_dir, **common)
    try:
        seen_first = _spy_updates(first)
        save = first.save_checkpoint
        prefetched = []

        def save_then_die():
            save()
            prefetched.append(first.batches.peek_batch())
            raise KeyboardInterrupt  # killed right after the step-2 checkpoint

        first.save_checkpoint = save_then_die
        with pytest.raises(KeyboardInterrupt):
            first.train()
    finally:
        first.cleanup()
    assert first.step == 2 and len(seen_first) == 2

    second = make_recipe(out, policy_dir, **common, resume="auto")
    try:
        assert second.step == 2
        assert second.batches.peek_batch() == prefetched[0]  # the prefetched batch comes again
        seen_second = _spy_updates(second)
        second.train()
    finally:
        second.cleanup()
    assert len(seen_second) == 2
    got = trained(seen_first) + trained(seen_second)
    assert sum(expected.values()) == 4 * 4 * 4  # steps x prompts x samples
    assert got == expected


def test_one_step_off_on_cpu_gives_trainer_and_workers_disjoint_cores(monkeypatch):
    """Overlapped on CPU, trainer and workers get disjoint halves of the cores (as GPUs are
    disjoint); when they take turns (staleness 0), or the user placed the workers, or the
    workers are remote, native or on GPUs, nothing is split."""
    import simko_recipe

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    cfg = OmegaConf.load(resolve_config_path("tiny_cpu"))
    OmegaConf.update(cfg, "generation.backend", "vllm")
    OmegaConf.update(cfg, "generation.weight_transfer", "files")
    recipe = simko_recipe.SimKORecipe.__new__(simko_recipe.SimKORecipe)
    recipe.cfg, recipe.device, recipe.world_size = check_schema(cfg), torch.device("cpu"), 1
    assert recipe._trainer_cpu_cores() is None  # tiny_cpu: max_staleness 0
    recipe.cfg.rollout.max_staleness = 1
    assert recipe._trainer_cpu_cores() == [0, 1]
    for key, value in (
        ("generation.devices", ["3"]),
        ("generation.addresses", ["tcp://127.0.0.1:5555"]),
        ("generation.backend", "native"),
    ):
        changed = check_schema(OmegaConf.merge(recipe.cfg, OmegaConf.from_dotlist([])))
        OmegaConf.update(changed, key, value)
        other = simko_recipe.SimKORecipe.__new__(simko_recipe.SimKORecipe)
        other.cfg, other.device, other.world_size = changed, torch.device("cpu"), 1
        assert other._trainer_cpu_cores() is None, key
    recipe.world_size = 2
    assert recipe._trainer_cpu_cores() is None
    recipe.world_size, recipe.device = 1, torch.device("meta")  # any accelerator
    assert recipe._trainer_cpu_cores() is None
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    recipe.device = torch.device("cpu")
    assert recipe._trainer_cpu_cores() is None


@pytest.mark.parametrize("staleness", [0, 1])
def test_weight_deltas_train_as_full_publications(tmp_path, policy_dir, staleness):
    """``generation.weight_delta=true``: the generator rebuilds each delta into the very
    weights a full publication carries, so rollouts and trained weights are identical to the
    run without deltas, synchronous and one-step-off; the metrics say which were deltas. (lr
    1e-6 in bf16 publications: most weights keep their bits, so deltas are used.)"""
    runs = {}
    for name, delta in (("full", False), ("delta", True)):
        recipe = make_recipe(
            tmp_path / name,
            policy_dir,
            **{
                "generation.weight_delta": delta,
                "generation.full_every": 3,
                "generation.weight_dtype": "bfloat16",
                "optimizer.lr": 1e-6,
                "rollout.max_staleness": staleness,
                "max_steps": 4,
            },
        )
        try:
            seen = _spy_updates(recipe)
            stats: list[dict] = []
            publish = recipe.weight_sync.publish

            def spy_publish(*args, _publish=publish, _sync=recipe.weight_sync, **kwargs):
                out = _publish(*args, **kwargs)
                stats.append(dict(_sync.last_stats))
                return out

            recipe.weight_sync.publish = spy_publish
            recipe.train()
            runs[name] = (seen, _weights(recipe), stats)
        finally:
            recipe.cleanup()
    (full, full_weights, full_stats), (delta, delta_weights, delta_stats) = (
        runs["full"],
        runs["delta"],
    )
    assert [s["delta"] for s in full_stats] == [0.0] * len(full_stats)
    # versions 1..4: 1 full, 2 and 3 deltas, 4 full again (full_every 3)
    assert [s["delta"] for s in delta_stats] == [0.0, 1.0, 1.0, 0.0], delta_stats
    assert all(s["bytes_frac"] < 0.5 for s in delta_stats if s["delta"])
    for a, b in zip(full, delta, strict=True):
        assert a["version"] == b["version"]
        assert torch.equal(a["rollout"].tokens, b["rollout"].tokens)
        assert torch.equal(a["rollout"].worker_logprobs, b["rollout"].worker_logprobs)
    for k in full_weights:
        assert torch.equal(full_weights[k], delta_weights[k]), k
