"""SimKO / GRPO-family RL with verifiable rewards, as a torchtune recipe.

    tune run simko_recipe --config qwen2_5_math_7b [key=value ...]
    tune run --nproc_per_node 4 simko_recipe --config qwen2_5_math_7b
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_endpoint HOST:PORT -m simko_recipe --config ...

One step of the loop (``SimKORecipe.train``):
  1. draw ``prompts_per_step`` prompts (resumable order),
  2. sample ``samples_per_prompt`` completions each from the generation workers (rank 0),
     every completion tagged with the weight version that produced it,
  3. score them in the verifier process pool. With ``rollout.max_staleness=1`` steps 2-3
     for the NEXT step's prompts run in a background thread on rank 0 with the current
     weights while 4-5 run (one-step-off); that thread first delivers those weights to the
     workers (their reload, step 6's second half, then hides behind the update too),
  4. old (proximal) log-probs from the policy before the update (or the workers'; mismatch
     logged), skipped when the rollout feeds one optimizer step (then they are the current
     ones, detached); off-policy rows get truncated importance weights against them,
  5. the update (``simko_tune.ppo``): group advantages by the loss mode's rule, then PPO
     updates over mini-batches: micro-batches on every data-parallel rank, the loss
     normalised by the mini-batch's global token (or sequence) count, gradients summed,
     clipped, a NaN/inf guard, AdamW + lr schedule,
  6. publish the new weights (safetensors + manifest), then deliver them: every worker
     reloads and acknowledges,
  7. log, evaluate pass@K and checkpoint (DCP, atomic, last N kept) at their cadences.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import sys
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torchtune import config as tt_config
from torchtune import training
from tqdm import tqdm

from simko_tune.checkpoint import CheckpointManager, rng_states, set_rng_states
from simko_tune.config import ConfigError, check_schema, parse, resolve_weight_transfer
from simko_tune.data import PromptBatches, decode_responses, stop_token_ids, tokenize_prompt
from simko_tune.export import export_hf
from simko_tune.generation import (
    SamplingConfig,
    StaleWeightsError,
    WeightSync,
    build_generator,
    check_versions,
)
from simko_tune.generation.client import trainer_cuda_devices
from simko_tune.generation.deltas import DeltaSettings
from simko_tune.generation.shards import publication_bytes
from simko_tune.generation.sync_dir import default_sync_dir
from simko_tune.generation.weights import parse_weight_dtype
from simko_tune.loss import LossConfig
from simko_tune.memory_plan import check_weight_space
from simko_tune.metrics import pass_at_k_curve, powers_of_two_up_to
from simko_tune.metrics.throughput import (
    PEAK_SOURCE,
    matmul_params,
    peak_tflops,
    phase_shares,
    training_flops,
)
from simko_tune.models import model_family, read_hf_config
from simko_tune.parallel import (
    ParallelDims,
    barrier,
    broadcast_object,
    cpu_threads,
    dp_coords,
    dp_group,
    exit_without_teardown,
    init_distributed,
    keep_freed_memory,
    load_rank0_state_dict,
    materialize,
    parallelize_model,
    rank,
    row_lengths,
    shutdown_distributed,
)
from simko_tune.plan import dry_run, validate
from simko_tune.ppo import PPOSettings, PPOUpdate
from simko_tune.preemption import EXIT_CODE as PREEMPTED_EXIT_CODE
from simko_tune.preemption import Preempted, PreemptionWatch
from simko_tune.rewards import RewardPool
from simko_tune.rollout import RolloutBatch, build_rollout_batch, concat_rollouts

# The step's phases, in order (nested timings such as generate, score or publish_write
# are parts of these): their shares of the step are logged as time_share/<phase>.
STEP_PHASES = ("wait_rollout", "old_logprobs", "update", "publish")


@dataclass
class SampledRollout:
    """Rank 0's scored rollout for one step, before it is shared with the other ranks."""

    indices: list[int]
    batch: RolloutBatch | None  # None: zero-variance filtering kept no group (no update)
    texts: list[str]
    timings: dict[str, float]
    # over every group generated for the step (before any filtering): see _group_stats
    stats: dict[str, float] = field(default_factory=dict)

    def state_dict(self) -> dict:
        """Tensors and plain values (a checkpoint's ``extra``, loadable ``weights_only``)."""
        batch = {f.name: getattr(self.batch, f.name) for f in fields(self.batch)}
        return {"indices": self.indices, "batch": batch, "texts": self.texts, "stats": self.stats}

    @classmethod
    def from_state_dict(cls, state: dict) -> SampledRollout:
        return cls(
            state["indices"], RolloutBatch(**state["batch"]), state["texts"], {}, state["stats"]
        )


class SimKORecipe:
    """Builds everything from the config in ``setup``, runs the RL loop in ``train``."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        # validate() has checked that loss.temperature is the rollout's: nothing is overwritten
        self.loss_cfg = LossConfig(**cfg.loss)
        self.step = 0
        self.weight_version = 0  # 0 = the checkpoint in model_dir, as the workers load it
        self.generator = None
        self.ref_model = None  # the KL penalty's frozen reference policy, if any
        self.prefetcher: ThreadPoolExecutor | None = None  # rank 0, one-step-off rollouts
        self.weight_sync = None
        self.reward_pool = None
        self.metric_logger = None
        self._eval_cache = None
        self.eval_history: dict[str, dict[int, dict[int, float]]] = {}  # set -> step -> K -> pass@K
        self.pending_rollout: SampledRollout | None = None  # a preempted run's next rollout
        self.last_rollout_stats: dict[str, float] = {}  # rank 0: the last rollout's groups
        self.last_rollout_indices: list[int] = []
        self.preemption: PreemptionWatch | None = None
        self.skipped_steps = 0  # steps without an update (no learning signal), run-wide
        self._checkpointed_step: int | None = None  # of the last checkpoint this process wrote

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.setup_parallel()
        transfer, why = resolve_weight_transfer(cfg.generation, self.world_size)
        _log(
            f"weight transfer: {transfer} ({why})"
            + (
                f"; a weight load may take {cfg.generation.load_timeout_s:g} s "
                "(generation.load_timeout_s)"
                if transfer == "files"
                else ""
            )
        )
        self.output_dir = Path(cfg.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)

        if _configured(cfg.prepare_model) and self.is_rank_zero:
            _log(f"prepare_model: {cfg.prepare_model._component_} -> {cfg.model_dir}")
            tt_config.instantiate(cfg.prepare_model)  # builds model_dir once, if missing
        barrier()
        self.hf_config = read_hf_config(cfg.model_dir)

        self.model = self.build_model()
        self.ref_model = self._setup_reference_model()
        self.tokenizer = tt_config.instantiate(cfg.tokenizer)
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.problems = tt_config.instantiate(cfg.dataset)
        self.prompt_ids = self._tokenize_all(self.problems)
        self.batches = PromptBatches(
            len(self.problems), cfg.rollout.prompts_per_step, seed=cfg.seed, shuffle=True
        )

        self.setup_update()
        self.flops_shape = (
            matmul_params(self.model, self.hf_config.get("tie_word_embeddings", False)),
            self.hf_config["num_hidden_layers"],
            self.hf_config["hidden_size"],
        )
        peak = peak_tflops(self.device)
        if self.device.type == "cuda":
            _log(
                f"perf/mfu: over {peak} TFLOP/s per device ({PEAK_SOURCE})"
                if peak
                else "perf/mfu: not logged, this GPU is not in the peak table"
            )
        self.checkpoints = CheckpointManager(
            self.output_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last
        )
        self.weight_sync = WeightSync(
            None
            if transfer == "memory"
            else cfg.generation.sync_dir or default_sync_dir(_run_name(self.output_dir)),
            self.hf_config,
            dtype=self._weight_dtype(),
            remove_on_close=not cfg.generation.sync_dir,
            delta=(
                DeltaSettings(full_every=cfg.generation.full_every)
                if cfg.generation.weight_delta
                else None
            ),
            timeout_s=cfg.generation.load_timeout_s,
        )
        if self.weight_sync.sync_dir is not None:  # before any publication or worker start
            publication = publication_bytes(self.model, self._weight_dtype())
            check_weight_space(cfg, publication, self.world_size, self.weight_sync.sync_dir)
        resumed = self.checkpoints.resume(
            cfg.resume, model=self.model, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler
        )
        if resumed is not None:
            resume_from, extra = resumed
            self.step = extra["step"]
            self.weight_version = extra["weight_version"]
            self.batches.load_state_dict(extra["data"])
            self.skipped_steps = extra.get("skipped_steps", 0)
            if "pending_rollout" in extra and self.is_rank_zero:
                self.pending_rollout = SampledRollout.from_state_dict(extra["pending_rollout"])
            _log(f"resumed from {resume_from} at step {self.step}")
        self._first_step, self._step_seconds = self.step, 0.0

        if self.is_rank_zero:
            self.metric_logger = tt_config.instantiate(cfg.metric_logger)
            self.metric_logger.log_config(cfg)
            self.reward_pool = RewardPool.from_config(cfg.rewards)
            self.generator = self._setup_generator()
            self.weight_sync.attach(self.generator)
        if resumed is not None:
            # the workers start from model_dir: give them the resumed weights
            self._publish(self.weight_version)
        self.preemption = PreemptionWatch(cfg.checkpoint.preempt_signals)

    def setup_parallel(self) -> None:
        """Process groups (the main one for collectives, a CPU one for waits), the mesh."""
        cfg = self.cfg
        self.rank, self.world_size = init_distributed(
            timeout_s=cfg.parallel.collective_timeout_s,
            wait_timeout_s=cfg.parallel.wait_timeout_s,
        )
        self.is_rank_zero = self.rank == 0
        if self.device.type == "cpu":
            threads, source = cpu_threads()
            torch.set_num_threads(threads)
            _log(f"trainer threads: {threads} ({source})")
            if cfg.parallel.cpu_keep_freed_memory:
                _log(f"trainer heap: {keep_freed_memory()}")
        training.set_seed(cfg.seed + self.rank)
        self.mesh = ParallelDims(dp_shard=cfg.parallel.dp_shard, tp=cfg.parallel.tp).build_mesh(
            self.device.type
        )
        self.dp_rank, self.dp_size = dp_coords(self.mesh)
        self.dp_group = dp_group(self.mesh)

    def build_model(self) -> torch.nn.Module:
        """Build on the meta device, parallelize, allocate on ``cfg.device``, load the
        checkpoint (rank 0 reads it, every rank keeps its shard)."""
        cfg = self.cfg
        with training.set_default_dtype(torch.float32), torch.device("meta"):
            model = tt_config.instantiate(cfg.model)
        model = parallelize_model(
            model,
            self.mesh,
            model_family=model_family(self.hf_config).tp_plan,
            activation_checkpointing=cfg.parallel.activation_checkpointing,
            compile_blocks=cfg.parallel.compile_model,
            mixed_precision=cfg.parallel.mixed_precision,
            reshard_after_forward=cfg.parallel.reshard_after_forward,
        )
        materialize(model, self.device)
        state = {}  # only rank 0 reads the checkpoint: one full copy per node, not per rank
        if self.is_rank_zero:
            state = tt_config.instantiate(cfg.checkpointer).load_checkpoint()[training.MODEL_KEY]
        if self.mesh is None:
            model.load_state_dict(state, strict=True)
        else:
            barrier()  # the other ranks wait for the read on the CPU group, not in a broadcast
            load_rank0_state_dict(model, state)
        del state
        return model

    def setup_update(self) -> None:
        """The optimizer, its lr schedule and the update (:class:`PPOUpdate`) from the
        config, for the model built. Tests and benchmarks that change ``ppo`` settings
        between updates call it again."""
        cfg = self.cfg
        self.optimizer = tt_config.instantiate(cfg.optimizer, self.model.parameters())
        self.lr_scheduler = (
            tt_config.instantiate(cfg.lr_scheduler, self.optimizer)
            if _configured(cfg.lr_scheduler)
            else None
        )
        self.ppo = PPOUpdate(
            self.model,
            self.optimizer,
            self.lr_scheduler,
            self.loss_cfg,
            PPOSettings.from_config(cfg),
            device=self.device,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            dp_group=self.dp_group,
            ref_model=self.ref_model,
            log=_log,
        )

    def _weight_dtype(self) -> torch.dtype:
        """Publications are written in the generation engine's dtype (bf16 on GPU: half the
        bytes of the fp32 master weights); the native generator computes in fp32."""
        g = self.cfg.generation
        if g.backend == "native":
            return parse_weight_dtype(g.weight_dtype or "float32", {}, self.hf_config)
        engine_kwargs = OmegaConf.to_container(g.engine_kwargs, resolve=True)
        return parse_weight_dtype(g.weight_dtype, engine_kwargs, self.hf_config)

    def _setup_reference_model(self) -> torch.nn.Module | None:
        """The frozen reference policy of the KL penalty (only when ``loss.kl_coef > 0``):
        the initial checkpoint, also after a resume, built and sharded like the policy."""
        if self.loss_cfg.kl_coef <= 0:
            return None
        return self.build_model().requires_grad_(False).eval()

    def _trainer_cpu_cores(self) -> list[int] | None:
        """The cores the trainer keeps when one-step-off generation runs beside it on CPU.

        Overlapped, trainer and vLLM workers run at once: sharing every core they would
        oversubscribe them (each sizes its thread pool to all of them). So, as on GPUs, they
        get disjoint devices: the trainer the first half of this process's cores, the
        workers the rest. On few cores that halves each side's threads, which a large
        model's update feels (README: the 0.5B shape on 2 cores); ``generation.devices``
        turns the split off. Synchronous (``max_staleness`` 0) they take turns, and each
        uses every core. None: no split (GPU, explicit ``generation.devices``, remote or
        native generation, several ranks, one core)."""
        cfg, g = self.cfg, self.cfg.generation
        cores = sorted(os.sched_getaffinity(0))
        if (
            self.device.type != "cpu"
            or not cfg.rollout.max_staleness
            or g.backend != "vllm"
            or g.devices
            or g.addresses
            or self.world_size > 1
            or len(cores) < 2
        ):
            return None
        return cores[: len(cores) // 2]

    def _setup_generator(self):
        """The generator, as ``build_generator`` builds it; on CPU at staleness 1 the
        trainer then keeps its half of the cores (``_trainer_cpu_cores``)."""
        trainer_devices = trainer_cuda_devices() if self.device.type == "cuda" else None
        trainer_cores = self._trainer_cpu_cores()
        if trainer_cores is not None:
            trainer_devices = [str(c) for c in trainer_cores]
        generator = build_generator(
            self.cfg.generation,
            self.cfg.model_dir,
            device=str(self.device),
            sync_dir=self.weight_sync.sync_dir,
            log_dir=self.output_dir / "worker_logs",
            trainer_devices=trainer_devices,
        )
        if trainer_cores is not None:  # after the start: the workers inherit no narrow mask
            os.sched_setaffinity(0, trainer_cores)
            torch.set_num_threads(len(trainer_cores))
            _log(
                f"one-step-off on CPU: trainer on cores {trainer_cores} "
                f"({len(trainer_cores)} threads), workers on the rest"
            )
        return generator

    def _tokenize_all(self, problems) -> list[list[int]]:
        limit = self.cfg.rollout.max_prompt_tokens
        ids = [
            tokenize_prompt(self.tokenizer, self.cfg.prompt_template, p.problem) for p in problems
        ]
        too_long = [(problems[i].id, len(x)) for i, x in enumerate(ids) if len(x) > limit]
        if too_long:
            raise ConfigError(
                f"rollout.max_prompt_tokens={limit}: {len(too_long)} prompts are longer, e.g. "
                f"{too_long[:3]} (raise the limit or filter the dataset)"
            )
        return ids

    # ------------------------------------------------------------------ the loop
    def train(self) -> None:
        cfg = self.cfg
        progress = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            disable=not self.is_rank_zero,
            dynamic_ncols=True,
        )
        if cfg.eval.before_training and self.step == 0:
            self.evaluate()
        # One-step-off: rank 0 samples and scores the next step's rollout in this thread while
        # the trainer updates. The prefetched prompts are only peeked at, never drawn, until
        # their step comes: a checkpoint taken meanwhile still counts them as unseen.
        if self.is_rank_zero and cfg.rollout.max_staleness:
            self.prefetcher = ThreadPoolExecutor(1, "rollout")
        next_rollout: Future | None = None
        if self.pending_rollout is not None:  # a preempted run's, sampled with older weights
            next_rollout = Future()
            next_rollout.set_result(self.pending_rollout)
            self.pending_rollout = None
        while self.step < cfg.max_steps:
            if self.preemption.agreed():  # between steps: every rank is here
                self._stop_for_preemption(next_rollout.result() if next_rollout else None)
            timings: dict[str, float] = {}
            t_step = time.perf_counter()
            step_start = (self.batches.state_dict(), rng_states())
            indices = self.batches.next_batch()

            with _timed(timings, "wait_rollout"):  # the time generation did NOT hide
                sampled = next_rollout.result() if next_rollout is not None else None
                rollout, texts = self.get_rollout(indices, timings, sampled)
            next_rollout = None
            if self.preemption.agreed():  # after the rollout, before the update: abandon it
                self.batches.load_state_dict(step_start[0])
                set_rng_states(step_start[1])
                self._stop_for_preemption(sampled if cfg.rollout.max_staleness else None)
            if self.prefetcher is not None and self.step + 1 < cfg.max_steps:
                self.weight_sync.reserve(self.weight_version)  # the thread delivers it
                next_rollout = self.prefetcher.submit(
                    self.sample, self.batches.peek_batch(), self.step + 1, self.weight_version
                )
            stats = None
            if rollout is None:  # no group with a learning signal: no update, no publication
                self.skipped_steps += 1
            else:
                stats = self._train_on(rollout, timings, deliver=next_rollout is None)
            self.step += 1

            if self.is_rank_zero:
                self._log_step(stats, timings, rollout, t_step, progress)
                if rollout is not None:
                    self._log_samples(texts, rollout)
            if self._due(cfg.eval.every_n_steps):
                if next_rollout is not None:  # evaluation needs the workers, idle
                    next_rollout.exception()
                self.evaluate()
            if self._due(cfg.checkpoint.every_n_steps) or self.step == cfg.max_steps:
                self.save_checkpoint()
        progress.close()
        if self.is_rank_zero:
            for line in _eval_summary(self.eval_history):
                tqdm.write(line)

    def _train_on(
        self, rollout: RolloutBatch, timings: dict[str, float], deliver: bool
    ) -> dict[str, float]:
        """Old log-probs, the update, the publication of the new weights (delivered to the
        workers with ``deliver``); returns the update's metrics."""
        cfg = self.cfg
        with _timed(timings, "old_logprobs"):
            old_logprobs, ref_logprobs = self.ppo.old_logprobs(
                rollout, policy_rows=self.ppo.old_logprob_rows(rollout)
            )
        # off-policy: the loss weighs each token by min(proximal / behaviour, is_cap)
        is_cap = cfg.rollout.is_cap if cfg.rollout.max_staleness else None
        with _timed(timings, "update"):
            stats = self.ppo.update(rollout, old_logprobs, ref_logprobs, is_cap, step=self.step)
        # One-step-off, this only writes the files: the rollout thread delivers them
        # before it samples the next rollout, once the workers are idle.
        with _timed(timings, "publish"):
            self._publish(self.weight_version + 1, deliver=deliver)
        timings.update(_prefixed("publish_", self.weight_sync.last_timings))
        return stats

    def _stop_for_preemption(self, pending: SampledRollout | None) -> NoReturn:
        """Write a checkpoint of the state at this point (collective), then stop the run
        (:class:`Preempted`). One-step-off, ``pending`` is the rollout the next step trains
        on, sampled with older weights: it goes into the checkpoint, so that the resumed run
        trains on the very same completions. Without one, a checkpoint of this step that
        this run wrote already (a periodic one, the signal came while it was written) holds
        this very state: it is not written twice within the grace period. (Only rank 0
        holds a rollout: it tells the others, so that all or none of them save.)"""
        reason = self.preemption.signal_name or "another rank's signal"
        pending_anywhere = broadcast_object(pending is not None)
        if not pending_anywhere and self._checkpointed_step == self.step:
            _log(f"step {self.step}: preempted ({reason}), its checkpoint is written already")
        else:
            _log(f"step {self.step}: preempted ({reason}), writing a checkpoint")
            self.save_checkpoint(pending=pending)
        elapsed = self.preemption.seconds_since_request()
        if elapsed is not None and elapsed > self.cfg.checkpoint.preempt_grace_s:
            _log(
                f"the preemption stop took {elapsed:.0f} s, more than checkpoint.preempt_grace_s"
                f"={self.cfg.checkpoint.preempt_grace_s:.0f} s"
            )
        raise Preempted(f"preempted at step {self.step} ({reason})")

    def _due(self, every: int) -> bool:
        """A cadence of ``every`` steps is due after this step (0: never)."""
        return bool(every) and self.step % every == 0

    def _log_step(
        self,
        stats: dict[str, float] | None,
        timings: dict[str, float],
        rollout: RolloutBatch | None,
        t_step: float,
        progress: tqdm,
    ) -> None:
        """Rank 0: the step's metrics (update, rollout, timings, resources) to the metric
        logger every ``log.every_n_steps``, and its line to the console. A step that skipped
        its update (``rollout`` None: no group with a learning signal) logs its sampling's
        counts, the skip, timings and resources."""
        cfg = self.cfg
        skipped = rollout is None
        stats = {} if stats is None else stats
        if not skipped:
            stats.update(_rollout_stats(rollout, cfg.rollout.samples_per_prompt))
        stats.update({k: v for k, v in self.last_rollout_stats.items() if k != "groups"})
        if cfg.rollout.filter_zero_variance:
            stats["rollout/skipped"] = float(skipped)
            stats["rollout/skipped_steps_total"] = self.skipped_steps  # run-wide
        if not skipped:
            staleness = (self.weight_version - 1 - rollout.weight_versions).float()
            stats["rollout/staleness_mean"] = float(staleness.mean())
            stats["rollout/staleness_max"] = float(staleness.max())
            stats.update({f"weights/{k}": v for k, v in self.weight_sync.last_stats.items()})
        stats.update({f"time/{k}": v for k, v in timings.items()})
        elapsed = time.perf_counter() - t_step
        stats["time/step"] = elapsed
        stats.update(phase_shares({k: timings[k] for k in STEP_PHASES if k in timings}, elapsed))
        self._step_seconds += elapsed
        stats["eta_s"] = (cfg.max_steps - self.step) * self._step_seconds / self._steps_timed()
        if not skipped:
            stats.update(self._throughput(rollout, timings, elapsed))
        stats["weight_version"] = self.weight_version
        stats["lr"] = self.optimizer.param_groups[0]["lr"]
        stats["memory/peak_gib"] = _peak_memory_gib(self.device)
        pool = self.reward_pool.stats  # counts since this process started
        stats["reward/timeouts_total"] = pool.timeouts
        stats["reward/crashes_total"] = pool.crashes  # checks that killed their worker twice
        stats["reward/rescored_total"] = pool.rescored  # their worker died, scored again
        if self._due(cfg.log.every_n_steps):
            self.metric_logger.log_dict(stats, step=self.step)
        progress.update(1)
        if skipped:
            tqdm.write(f"step {self.step:>5} skipped: no update, no learning signal {elapsed:.1f}s")
            return
        progress.set_postfix(
            reward=f"{stats['reward/mean']:.3f}",
            loss=f"{stats['loss']:.4f}",
            ent=f"{stats['policy/entropy_all']:.2f}",
            tok_s=f"{stats['throughput/trained_tokens_per_s']:.0f}",
            **({"mfu": f"{stats['perf/mfu']:.1%}"} if "perf/mfu" in stats else {}),
            refresh=False,
        )
        tqdm.write(_step_line(self.step, stats, elapsed))

    def get_rollout(
        self, indices: list[int], timings: dict[str, float], sampled: SampledRollout | None = None
    ) -> tuple[RolloutBatch | None, list[str]]:
        """This step's rollout: the prefetched one (``sampled``, rank 0) or one sampled now,
        checked against the allowed weight-version window, then shared with every rank.
        None on every rank when zero-variance filtering kept no group: the step skips its
        update (the prompts it drew stay used, as in a step that trains)."""
        batch, texts = None, []
        if self.is_rank_zero:
            if sampled is None:
                sampled = self.sample(indices, self.step, self.weight_version)
            elif sampled.indices != indices:
                raise RuntimeError(
                    f"step {self.step}: the prefetched rollout is for prompts "
                    f"{sampled.indices[:4]}..., the sampler drew {indices[:4]}..."
                )
            versions = sampled.batch.weight_versions
            oldest = self.weight_version - self.cfg.rollout.max_staleness
            if not bool(((versions >= oldest) & (versions <= self.weight_version)).all()):
                raise StaleWeightsError(
                    f"step {self.step}: rollout sampled with weight versions "
                    f"{sorted(set(versions.tolist()))}, allowed {oldest}..{self.weight_version}"
                )
            if self.cfg.rollout.filter_zero_variance:
                sampled = self._keep_groups_with_signal(sampled)
            batch, texts = sampled.batch, sampled.texts
            timings.update(sampled.timings)
            self.last_rollout_stats = sampled.stats
            self.last_rollout_indices = sampled.indices  # the prompts of the rows kept
        if self.cfg.rollout.max_oversample:  # rank 0 drew extra prompts: every rank follows
            self.batches.load_state_dict(broadcast_object(self.batches.state_dict()))
        return broadcast_object(batch), texts

    def _keep_groups_with_signal(self, sampled: SampledRollout) -> SampledRollout:
        """Rank 0: drop the groups whose rewards are all equal; with ``max_oversample``,
        sample extra rounds of prompts (drawn from the data order) until
        ``prompts_per_step`` groups with a signal are kept or the rounds run out. Groups
        beyond ``prompts_per_step`` are dropped, and the kept ones trimmed to a number whose
        rows split evenly over the data-parallel ranks; rounds are counted after that trim.
        When no group is kept the result has no batch, and the log says why."""
        r, g = self.cfg.rollout, self.cfg.rollout.samples_per_prompt
        per_rank = self.dp_size // math.gcd(self.dp_size, g)  # groups whose rows split evenly

        def trainable(found: int) -> int:
            """Of ``found`` groups with a signal, how many one step can train on."""
            n = min(found, r.prompts_per_step)
            return n - n % per_rank

        rounds = [sampled]
        while (
            trainable(len(_signal_groups(rounds, g))) < r.prompts_per_step
            and len(rounds) <= r.max_oversample
        ):
            extra = self.batches.next_batch()
            rounds.append(self.sample(extra, self.step, self.weight_version, round_=len(rounds)))
        found = _signal_groups(rounds, g)
        kept = found[: trainable(len(found))]
        parts, indices, texts = [], [], []
        for i, rollout in enumerate(rounds):
            groups = [j for k, j in kept if k == i]
            rows = torch.tensor([j * g + s for j in groups for s in range(g)], dtype=torch.long)
            if len(rows):
                parts.append(rollout.batch.select(rows))
                indices += [rollout.indices[j] for j in groups]
                texts += [rollout.texts[int(row)] for row in rows]
        merged = dict(sampled.timings)
        for name in ("generate", "score"):  # every round's
            merged[name] = sum(x.timings.get(name, 0.0) for x in rounds)
        generated = sum(x.stats["groups"] for x in rounds)
        stats = _group_stats([x.batch for x in rounds], g)
        stats.update(
            {
                "rollout/oversample_rounds": len(rounds) - 1,
                "rollout/groups_dropped": generated - len(kept),
                "rollout/groups_trained": len(kept),
                "response/unknown_tokens": sum(
                    x.stats.get("response/unknown_tokens", 0) for x in rounds
                ),
            }
        )
        if not parts:
            _log(
                _skip_reason(self.step, len(found), len(rounds), generated, per_rank, self.dp_size)
                + f" (rollout.max_oversample={r.max_oversample})"
            )
            return SampledRollout([], None, [], merged, stats)
        batch = concat_rollouts(parts, pad_id=self.stop_ids[0])
        return SampledRollout(indices, batch, texts, merged, stats)

    def sample(
        self, indices: list[int], step: int, version: int, round_: int = 0
    ) -> SampledRollout:
        """Generate and score on rank 0 for ``step``'s prompts with the workers' current
        weights ``version``; thread-safe against the training loop (it touches only the
        generator, the reward pool and the tokenizer, which the loop leaves alone meanwhile).
        The sampling seed follows the step that trains on the rollout, whoever samples it,
        and ``round_`` (extra rounds of zero-variance filtering get seeds of their own)."""
        cfg = self.cfg
        timings: dict[str, float] = {}
        g = cfg.rollout.samples_per_prompt
        prompts = [self.prompt_ids[i] for i in indices]
        sampling = SamplingConfig(
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            max_tokens=cfg.rollout.max_response_tokens,
            stop_token_ids=self.stop_ids,
            seed=cfg.seed * 1_000_003 + step + round_ * 100_000_007,
        )
        # one-step-off: the workers load ``version`` now (published, not yet delivered)
        timings.update(_prefixed("publish_", self.weight_sync.deliver(version)))
        with _timed(timings, "generate"):
            completions = self.generator.generate(prompts, n=g, sampling=sampling)
        check_versions(completions, version)
        flat = [c for group in completions for c in group]
        texts, unknown = decode_responses(self.tokenizer, [c.token_ids for c in flat])
        golds = [self.problems[i].answer for i in indices for _ in range(g)]
        # A check whose worker died is scored again by the pool: only one that kills its
        # worker twice scores 0, and it is not trained on unannounced.
        crashes = self.reward_pool.stats.crashes
        with _timed(timings, "score"):
            rewards = self.reward_pool.score(texts, golds)
        if self.reward_pool.stats.crashes > crashes:
            _log(
                f"step {step}: {self.reward_pool.stats.crashes - crashes} reward check(s) "
                "killed their worker twice and score 0 (reward/crashes_total)"
            )
        batch = build_rollout_batch(
            prompts=[p for p in prompts for _ in range(g)],
            responses=[c.token_ids for c in flat],
            worker_logprobs=[c.logprobs for c in flat],
            rewards=rewards,
            truncated=[c.finish_reason == "length" for c in flat],
            pad_id=self.stop_ids[0],
            weight_versions=[c.weight_version for c in flat],
        )
        stats = {
            **_group_stats([batch], g),
            "groups": len(indices),
            "response/unknown_tokens": unknown,  # ids with no token, left out of the texts
        }
        return SampledRollout(indices, batch, texts, timings, stats)

    def _publish(self, version: int, deliver: bool = True) -> None:
        """Weights → safetensors + manifest (ranks share the writing), then, with
        ``deliver``, → workers reload and ack → prune older versions."""
        self.weight_sync.publish(self.model, version, deliver=deliver)
        self.weight_version = version
        barrier()

    # ------------------------------------------------------------------ eval, logs, checkpoints
    def evaluate(self) -> None:
        """pass@K on the configured sets with the current weights (rank 0 generates)."""
        cfg = self.cfg
        if self.is_rank_zero:
            self.weight_sync.deliver(self.weight_version)  # if one-step-off deferred it
            sampling = SamplingConfig(
                temperature=cfg.eval.temperature,
                top_p=cfg.eval.top_p,
                max_tokens=cfg.eval.max_tokens,
                stop_token_ids=self.stop_ids,
                seed=cfg.seed,
            )
            for name, (problems, prompts) in self._eval_sets().items():
                n = cfg.eval.n
                groups = self.generator.generate(prompts, n=n, sampling=sampling)
                check_versions(groups, self.weight_version)
                texts, unknown = decode_responses(
                    self.tokenizer, [c.token_ids for grp in groups for c in grp]
                )
                golds = [p.answer for p in problems for _ in range(n)]
                rewards = self.reward_pool.score(texts, golds)
                correct = [int(sum(rewards[i * n : (i + 1) * n])) for i in range(len(problems))]
                ks = powers_of_two_up_to(n)
                curves = [pass_at_k_curve(n, c, ks) for c in correct]
                scores = {
                    f"eval/{name}/pass@{k}": sum(curve[k] for curve in curves) / len(curves)
                    for k in ks
                }
                self.metric_logger.log_dict(
                    {**scores, f"eval/{name}/unknown_tokens": unknown}, step=self.step
                )
                self.eval_history.setdefault(name, {})[self.step] = {
                    k: sum(curve[k] for curve in curves) / len(curves) for k in ks
                }
                tqdm.write(
                    f"eval {name}: "
                    + " ".join(f"{k.split('/')[-1]}={v:.3f}" for k, v in scores.items())
                )
        barrier()

    def _eval_sets(self) -> dict[str, tuple[list, list[list[int]]]]:
        """The evaluation problems and their prompt ids, loaded and tokenised once. A set
        switched off on the command line (``eval.sets.NAME=null``) is skipped."""
        if self._eval_cache is None:
            self._eval_cache = {}
            for name, spec in self.cfg.eval.sets.items():
                if not _configured(spec):
                    continue
                problems = tt_config.instantiate(spec)
                self._eval_cache[name] = (problems, self._tokenize_all(problems))
        return self._eval_cache

    def _steps_timed(self) -> int:
        """Steps this process has run (a resumed run times its own steps only)."""
        return self.step - self._first_step

    def _throughput(
        self, rollout: RolloutBatch, timings: dict[str, float], step_s: float
    ) -> dict[str, float]:
        """Tokens per second of generation, of the update and of the whole step; the
        update's model FLOPs and, on a GPU in the peak table, its MFU over every trainer
        device (``simko_tune.metrics.throughput``)."""
        generated = float(rollout.mask.sum())
        lengths = row_lengths(rollout.mask[self.ppo.kept_indices(rollout)])
        epochs = self.cfg.ppo.epochs
        trained = float(lengths.sum()) * epochs
        out = {
            "throughput/generated_tokens_per_s": generated / max(timings.get("generate", 0), 1e-9),
            "throughput/trained_tokens_per_s": trained / max(timings["update"], 1e-9),
            "throughput/response_tokens_per_s": generated / step_s,
        }
        n_matmul, layers, attn_dim = self.flops_shape
        flops = training_flops(lengths, n_matmul, layers, attn_dim) * epochs
        out["perf/update_tflops_per_s"] = flops / max(timings["update"], 1e-9) / 1e12
        peak = peak_tflops(self.device)
        if peak is not None:
            out["perf/mfu"] = out["perf/update_tflops_per_s"] / (peak * self.world_size)
        return out

    def _log_samples(self, texts: list[str], rollout: RolloutBatch) -> None:
        """Rank 0: a few completions as text, every ``log.samples_every_n_steps``."""
        if not self._due(self.cfg.log.samples_every_n_steps):
            return
        indices = self.last_rollout_indices
        g = self.cfg.rollout.samples_per_prompt
        lines = []
        for j in range(min(self.cfg.log.num_samples, len(indices))):
            p = self.problems[indices[j]]
            lines.append(f"**problem** {p.problem}\n\n**gold** {p.answer}\n")
            for s in range(min(g, 2)):
                lines.append(f"- reward {rollout.rewards[j * g + s]:.0f}: `{texts[j * g + s]}`")
        self.metric_logger.log_text("samples", "\n".join(lines), step=self.step)

    def save_checkpoint(self, pending: SampledRollout | None = None) -> None:
        # The policy in Hugging Face form (the base checkpoint's dtype), inside the
        # checkpoint's atomic publication: what the eval recipe and vLLM load.
        hf_dtype = parse_weight_dtype(None, {}, self.hf_config)
        self.checkpoints.save(
            self.step,
            model=self.model,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            extra={
                "step": self.step,
                "weight_version": self.weight_version,
                "data": self.batches.state_dict(),
                "skipped_steps": self.skipped_steps,
                **({"pending_rollout": pending.state_dict()} if pending is not None else {}),
            },
            write_more=lambda folder: export_hf(
                self.model, folder / "hf", self.hf_config, self.cfg.model_dir, dtype=hf_dtype
            ),
        )
        self._checkpointed_step = self.step

    def cleanup(self) -> None:
        """After a normal end: release this rank's resources, then leave the process group
        together with the other ranks."""
        self.close()
        shutdown_distributed()

    def close(self) -> None:
        """Release what this rank started (workers, verifier pool, logger); no collectives."""
        if self.prefetcher is not None:  # before the generator it may still be using closes
            self.prefetcher.shutdown(wait=True, cancel_futures=True)
        if self.generator is not None:
            self.generator.close()
        if self.weight_sync is not None:
            self.weight_sync.close()
        if self.reward_pool is not None:
            self.reward_pool.close()
        if self.metric_logger is not None:
            self.metric_logger.close()
        if self.preemption is not None:
            self.preemption.close()


# ---------------------------------------------------------------------- helpers
def _log(msg: str) -> None:
    if rank() == 0:
        tqdm.write(msg, file=sys.stderr)


def _configured(node: DictConfig | None) -> bool:
    """A ``_component_`` section that is present and not switched off (``key=null`` on the
    command line empties its ``_component_``)."""
    return node is not None and node.get("_component_") is not None


def _run_name(output_dir: Path) -> str:
    return str(output_dir.resolve()).strip("/").replace("/", "_")[-100:]


def _prefixed(prefix: str, seconds: dict[str, float]) -> dict[str, float]:
    """``{"ack_s": 1.0}`` → ``{prefix + "ack": 1.0}``: weight-sync timings as step metrics."""
    return {prefix + k.removesuffix("_s"): v for k, v in seconds.items()}


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str):
    t0 = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t0


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _eval_summary(history: dict[str, dict[int, dict[int, float]]]) -> list[str]:
    """One line per evaluation set: pass@K at each K, first evaluation → last (with
    ``eval.before_training`` the first is the policy before RL)."""
    lines = []
    for name, by_step in history.items():
        first, last = min(by_step), max(by_step)
        if first == last:
            continue
        cells = ", ".join(
            f"pass@{k} {by_step[first][k]:.3f} → {by_step[last][k]:.3f}" for k in by_step[last]
        )
        lines.append(f"eval {name}, step {first} → {last}: {cells}")
    return lines


def _step_line(step: int, stats: dict[str, float], elapsed: float) -> str:
    """The console summary of one step: the policy's shape over all tokens, then over the
    entropy-gated ones, where SimKO acts (Λn: mean log-prob of the rank-n candidate;
    m2..K: the probability the ranks 2..K hold)."""

    def shape(kind: str) -> str:
        return (
            f"Λ1 {stats[f'policy/logprob_rank1_{kind}']:.3f} "
            f"Λ2 {stats[f'policy/logprob_rank2_{kind}']:.2f} "
            f"H {stats[f'policy/entropy_{kind}']:.3f} "
            f"m2..K {stats[f'policy/mass_rank2_to_k_{kind}']:.3f}"
        )

    return (
        f"step {step:>5} reward {stats['reward/mean']:.3f} loss {stats['loss']:+.4f} "
        f"| all: {shape('all')} | gated: {shape('gated')} "
        f"| len {stats['response/len_mean']:.1f} {elapsed:.1f}s"
    )


def _group_stats(batches: list[RolloutBatch], group_size: int) -> dict[str, float]:
    """Over every group generated: the fraction whose rewards are all equal (zero advantage,
    no gradient) and the share of the generated tokens they hold."""
    rewards = torch.cat([b.rewards for b in batches]).view(-1, group_size)
    tokens = torch.cat([b.mask.sum(1) for b in batches]).view(-1, group_size).sum(1).float()
    identical = rewards.max(1).values == rewards.min(1).values
    return {
        "reward/identical_group_frac": float(identical.float().mean()),
        "reward/identical_group_token_frac": float(tokens[identical].sum() / tokens.sum()),
    }


def _signal_groups(rounds: list[SampledRollout], group_size: int) -> list[tuple[int, int]]:
    """``(round, group)`` of every group whose rewards differ, in sampling order."""
    out = []
    for i, sampled in enumerate(rounds):
        rewards = sampled.batch.rewards.view(-1, group_size)
        varied = (rewards.max(1).values != rewards.min(1).values).nonzero().squeeze(1)
        out += [(i, int(j)) for j in varied]
    return out


def _skip_reason(
    step: int, found: int, rounds: int, generated: int, per_rank: int, dp_size: int
) -> str:
    """Why zero-variance filtering kept no group of ``step``: none had a signal, or fewer
    than the ``per_rank`` groups whose rows split evenly over the data-parallel ranks."""
    sampling = f"in {_counted(rounds, 'round')} of sampling"
    if not found:
        return (
            f"step {step}: every group's rewards were equal {sampling} "
            f"({_counted(generated, 'group')}): no learning signal, the update is skipped"
        )
    return (
        f"step {step}: {_counted(found, 'group')} with a learning signal {sampling}, fewer "
        f"than the {per_rank} whose rows split evenly over {dp_size} data-parallel ranks: "
        "the update is skipped"
    )


def _counted(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _rollout_stats(rollout: RolloutBatch, group_size: int) -> dict[str, float]:
    rewards = rollout.rewards.view(-1, group_size)
    stats = {
        "reward/mean": float(rewards.mean()),
        "response/len_mean": float(rollout.response_lens.float().mean()),
        "response/len_max": float(rollout.response_lens.max()),
        "response/truncated_frac": float(rollout.truncated.float().mean()),
    }
    return stats


# ---------------------------------------------------------------------- entry point
@parse
def recipe_main(cfg: DictConfig) -> int:
    cfg = check_schema(cfg)
    if cfg.dry_run:
        dry_run(cfg)
        return
    errors, _ = validate(cfg)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    log = logging.getLogger("simko_tune")  # progress of our own modules (e.g. the warm start)
    log.setLevel(logging.INFO)
    log.addHandler(logging.StreamHandler())
    recipe = SimKORecipe(cfg)
    code = 0
    try:
        recipe.setup()
        recipe.train()
    except Preempted as stop:
        _log(f"{stop}: exiting with {PREEMPTED_EXIT_CODE}; resume=auto continues the run")
        code = PREEMPTED_EXIT_CODE
    except BaseException:
        if dist.is_initialized() and dist.get_world_size() > 1:
            _fail_fast(recipe)
        recipe.close()
        raise
    distributed = dist.is_initialized()
    recipe.cleanup()
    if distributed:  # gloo's threads would race the interpreter's teardown (see there)
        exit_without_teardown(code)
    return code


def _fail_fast(recipe: SimKORecipe) -> NoReturn:
    """End this rank now, non-zero, after an exception.

    Its peers may sit in a collective it will never join (an all-gather of the publication,
    a broadcast of the rollout), so waiting on any barrier would hang until a timeout.
    Instead: log the cause, release what this rank started (generation workers, verifier
    pool), and exit without the interpreter's teardown (:func:`exit_without_teardown`).
    torchrun's agent then stops the other ranks within seconds (gloo peers also fail at once
    on the closed connections).
    """
    rank = dist.get_rank()
    print(
        f"[rank {rank}] failed, ending every rank:\n{traceback.format_exc()}",
        file=sys.stderr,
        flush=True,
    )
    try:
        recipe.close()
    except Exception as e:  # the exit matters more than a clean close
        print(f"[rank {rank}] cleanup after failure failed too: {e!r}", file=sys.stderr)
    exit_without_teardown(1)


if __name__ == "__main__":
    sys.exit(recipe_main())
