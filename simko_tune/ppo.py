"""The update of one rollout: its old log-probs, then PPO-style optimizer steps over
mini-batches of micro-batches, on every data-parallel rank.

:class:`PPOUpdate` is what the recipe calls each step, in two phases:

1. :meth:`PPOUpdate.old_logprobs` – log-probs of the sampled tokens under the policy before
   the update (and under the frozen reference policy, for a KL penalty). Forward only.
2. :meth:`PPOUpdate.update` – advantages from the rewards (the loss mode's rule), the rows
   the mode trains on, then for each mini-batch: micro-batches forward + backward with the
   loss normalised by the whole mini-batch's token (or sequence) count, gradient clipping,
   a non-finite guard, the optimizer and lr-scheduler steps. Metrics are summed on the
   device as it goes (:class:`MetricSums`) and reduced over the ranks once at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from simko_tune.loss import (
    GATED_METRICS,
    LossConfig,
    kept_responses,
    mode_advantages,
    policy_loss,
    token_logprobs,
)
from simko_tune.parallel import (
    all_reduce_max,
    all_reduce_sum,
    clip_grad_norm_,
    full_output_weight,
    hidden_states,
    micro_batches,
    reshard,
    row_lengths,
    set_gradient_sync,
)
from simko_tune.rollout import RolloutBatch


@dataclass(frozen=True)
class PPOSettings:
    """What the update reads from the config (``rollout`` and ``ppo`` sections)."""

    group_size: int  # rollout.samples_per_prompt
    mini_batch_prompts: int
    epochs: int = 1
    micro_batch_size: int = 64
    max_tokens_per_micro_batch: int | None = None
    logprob_max_tokens_per_micro_batch: int | None = None
    max_grad_norm: float = 1.0
    defer_grad_sync: bool = True
    old_logprobs: str = "trainer"  # "workers": the generator's log-probs stand in

    @classmethod
    def from_config(cls, cfg: Any) -> PPOSettings:
        p = cfg.ppo
        return cls(
            group_size=cfg.rollout.samples_per_prompt,
            mini_batch_prompts=p.mini_batch_prompts,
            epochs=p.epochs,
            micro_batch_size=p.micro_batch_size,
            max_tokens_per_micro_batch=p.max_tokens_per_micro_batch,
            logprob_max_tokens_per_micro_batch=p.logprob_max_tokens_per_micro_batch,
            max_grad_norm=p.max_grad_norm,
            defer_grad_sync=p.defer_grad_sync,
            old_logprobs=cfg.rollout.old_logprobs,
        )

    @property
    def rows_per_mini_batch(self) -> int:
        return self.mini_batch_prompts * self.group_size


class MetricSums:
    """One rank's metric sums over its micro-batches, kept on the device (no host sync per
    micro-batch), then the means over every rank's tokens.

    The loss returns means over a micro-batch's tokens; they are summed weighted by its
    token count (the :data:`GATED_METRICS` by its gated-token count), so the result is the
    mean over all tokens, not a mean of means. Maxima are kept as maxima. The
    generator-vs-trainer mismatch is measured on one mini-batch only (see
    :meth:`PPOUpdate.update`), so it has sums of its own."""

    def __init__(self, device: torch.device) -> None:
        zero = torch.zeros((), device=device)
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = self.gated = zero
        self.ratio_max = self.is_max = zero
        self.mismatch = {"sum": zero, "tokens": zero, "max": zero}

    def add(self, metrics: dict[str, torch.Tensor], measure_mismatch: bool) -> None:
        """Take in one micro-batch's metrics (the dict is consumed)."""
        n_tok = metrics.pop("num_tokens")
        n_gated = metrics.pop("num_gated")
        self.ratio_max = torch.maximum(self.ratio_max, metrics.pop("ratio_max").detach())
        if "is_weight_max" in metrics:
            self.is_max = torch.maximum(self.is_max, metrics.pop("is_weight_max"))
        if measure_mismatch:
            m = self.mismatch
            m["sum"] = m["sum"] + metrics.pop("logprob_mismatch_mean_abs") * n_tok
            m["tokens"] = m["tokens"] + n_tok
            m["max"] = torch.maximum(m["max"], metrics.pop("logprob_mismatch_max_abs"))
        for k, v in metrics.items():
            weight = n_gated if k in GATED_METRICS else n_tok
            self.sums[k] = self.sums.get(k, 0.0) + v.detach() * weight
        self.tokens = self.tokens + n_tok
        self.gated = self.gated + n_gated

    def reduce(
        self, loss_sum: torch.Tensor, group, with_is: bool, with_mismatch: bool
    ) -> dict[str, float]:
        """Means over every rank's tokens; ``loss_sum`` summed over the ranks."""
        names = sorted(self.sums)
        local = torch.stack([loss_sum] + [self.sums[k] for k in names] + [self.tokens, self.gated])
        reduced = all_reduce_sum(local.float(), group=group).tolist()
        total_tokens, total_gated = max(reduced[-2], 1.0), max(reduced[-1], 1.0)
        out = {
            k: reduced[1 + i] / (total_gated if k in GATED_METRICS else total_tokens)
            for i, k in enumerate(names)
        }
        out["loss"] = reduced[0]
        # a maximum over every micro-batch of every rank, not a mean of maxima
        out["ratio_max"] = float(all_reduce_max(self.ratio_max, group=group))
        if with_is:
            out["is_weight/mean"] = out.pop("is_weight_mean")
            out["is_weight/capped_frac"] = out.pop("is_weight_capped_frac")
            out["is_weight/max"] = float(all_reduce_max(self.is_max, group=group))
        if with_mismatch:
            m = self.mismatch
            total = all_reduce_sum(
                torch.stack([m["sum"], m["tokens"]]).float(), group=group
            ).tolist()
            out["logprob_mismatch/mean_abs"] = total[0] / max(total[1], 1.0)
            out["logprob_mismatch/max_abs"] = float(all_reduce_max(m["max"], group=group))
        return out


class PPOUpdate:
    """The update of one rollout on this rank (see the module docstring).

    Every rank holds the whole rollout and takes its own rows of each mini-batch (its
    data-parallel share); gradients are reduced by FSDP2, metrics at the end."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any | None,
        loss_cfg: LossConfig,
        settings: PPOSettings,
        *,
        device: torch.device,
        dp_rank: int = 0,
        dp_size: int = 1,
        dp_group=None,
        ref_model: nn.Module | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.loss_cfg = loss_cfg
        self.settings = settings
        self.device = device
        self.dp_rank, self.dp_size, self.dp_group = dp_rank, dp_size, dp_group
        self.ref_model = ref_model
        self.log = log

    # ------------------------------------------------------------------ rows
    def kept_indices(self, rollout: RolloutBatch) -> torch.Tensor:
        """The indices of the rows this mode trains on. PSR / NSR drop the other
        responses, as the official code does, so mini-batches and normalisers count the kept
        ones only; trimmed to a multiple of the data-parallel size. When none is kept (PSR
        on a batch with no correct response) every row stays, all with advantage 0."""
        kept = kept_responses(rollout.rewards, self.loss_cfg).nonzero().squeeze(1)
        kept = kept[: len(kept) - len(kept) % self.dp_size]
        return kept if 0 < len(kept) < len(rollout) else torch.arange(len(rollout))

    def old_logprob_rows(self, rollout: RolloutBatch) -> torch.Tensor:
        """The rows whose old log-probs need a separate forward pass before the update.

        Not the first mini-batch's (of a single epoch): its update runs before any optimizer
        step, so the policy it takes the ratio against is the current one, and the loss
        takes those log-probs from its own forward, detached (as TRL and verl do for a
        rollout consumed by one step, and as exact here for the first step of several).
        Off-policy, they are the proximal log-probs of the importance weights too. No row
        when the workers' log-probs stand in (``rollout.old_logprobs: workers``)."""
        s = self.settings
        if s.old_logprobs == "workers":
            return torch.zeros(0, dtype=torch.long)
        kept = self.kept_indices(rollout)
        if s.epochs > 1:  # later epochs revisit the first mini-batch after a step
            return kept
        return kept[s.rows_per_mini_batch :]

    def micro_batches(
        self, rollout: RolloutBatch, rows: range, max_tokens: int | None
    ) -> list[torch.Tensor]:
        """This data-parallel rank's rows of ``rows``, in micro-batches (a token budget, or
        ``micro_batch_size`` rows when ``max_tokens`` is None)."""
        return micro_batches(
            rows,
            row_lengths(rollout.mask),
            self.dp_rank,
            self.dp_size,
            max_rows=self.settings.micro_batch_size,
            max_tokens=max_tokens,
        )

    def normalizer(self, rollout: RolloutBatch, rows: range) -> float:
        """The loss denominator over the whole mini-batch (all micro-batches, all ranks):
        every rank holds the full rollout, so it is computed locally, identically."""
        if self.loss_cfg.agg == "token_mean":
            return float(rollout.mask[rows.start : rows.stop].sum())
        return float(len(rows))

    # ------------------------------------------------------------------ phase 1
    @torch.no_grad()
    def old_logprobs(
        self, rollout: RolloutBatch, policy_rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Log-probs of the sampled tokens under the policy before this step's update, for
        ``policy_rows`` (default: every row; see :meth:`old_logprob_rows`; the other rows
        are NaN, so that a use of one could not pass unnoticed), and under the reference
        policy, every row, when the KL penalty needs them (None otherwise). Forward only:
        micro-batches of ``logprob_max_tokens_per_micro_batch`` tokens.

        The policy's are None when no row needs them (the loss takes the current ones), and
        the workers' with ``old_logprobs="workers"``."""
        s = self.settings
        if s.old_logprobs == "workers":
            old = rollout.worker_logprobs
        else:
            policy_rows = torch.arange(len(rollout)) if policy_rows is None else policy_rows
            old = None
        passes = []  # (name, model, the rollout's rows it needs)
        if old is None and len(policy_rows):
            passes.append(("old", self.model, policy_rows))
        if self.ref_model is not None:
            passes.append(("ref", self.ref_model, torch.arange(len(rollout))))
        if not passes:
            return old, None
        budget = s.logprob_max_tokens_per_micro_batch or s.max_tokens_per_micro_batch
        shape = rollout.worker_logprobs.shape
        out = {}
        for name, model, needed in passes:
            out[name] = torch.zeros(shape, device=self.device)
            sub = rollout if len(needed) == len(rollout) else rollout.select(needed)
            for local in self.micro_batches(sub, range(len(sub)), budget):
                mb, rows = sub.select(local), needed[local]
                hidden = hidden_states(model, mb.tokens.to(self.device))
                lp = token_logprobs(
                    hidden,
                    full_output_weight(model),
                    mb.targets.to(self.device),
                    temperature=self.loss_cfg.temperature,
                    chunk_size=self.loss_cfg.chunk_size,
                    mask=mb.mask,  # on the host: response positions only, no device sync
                )
                out[name][rows.to(self.device), : lp.shape[1]] = lp
        if self.ref_model is not None:
            reshard(self.ref_model)  # forward only: its root's compute copy is not needed again
        # every rank computed its own rows; sum to share them (rows are disjoint)
        out = {k: all_reduce_sum(v, group=self.dp_group).cpu() for k, v in out.items()}
        if "old" in out:
            skipped = torch.ones(len(rollout), dtype=torch.bool)
            skipped[policy_rows] = False
            out["old"][skipped] = float("nan")
        return out.get("old", old), out.get("ref")

    # ------------------------------------------------------------------ phase 2
    def update(
        self,
        rollout: RolloutBatch,
        old_logprobs: torch.Tensor | None,
        ref_logprobs: torch.Tensor | None = None,
        is_cap: float | None = None,
        step: int | None = None,
    ) -> dict[str, float]:
        """PPO updates. ``old_logprobs``: each row's ratio denominator; a row of NaN (or
        None for every row) takes the current policy's, detached, which is exact only
        before the first optimizer step: in the first mini-batch of the first epoch (see
        :meth:`old_logprob_rows`). ``ref_logprobs``: the KL penalty's reference.
        ``is_cap``: off-policy, each token's loss is weighted by min(exp(proximal -
        behaviour), is_cap), proximal = the old log-probs, behaviour = the workers'.
        ``step``: named in the log when an update is skipped.

        The first mini-batch's forward also measures the generator-vs-trainer mismatch: its
        current log-probs precede any optimizer step of this update.

        Metrics stay on the device; the non-finite guard's flag is the loop's one host sync
        per mini-batch (the loss reads row lengths off the host mask).
        """
        s = self.settings
        advantages = mode_advantages(
            rollout.rewards, s.group_size, self.loss_cfg.mode, self.loss_cfg.positive_weight
        )
        kept = self.kept_indices(rollout)
        if len(kept) < len(rollout):
            rollout = rollout.select(kept)
        advantages = advantages[kept]
        old_logprobs, ref_logprobs = (
            None if t is None else t[kept] for t in (old_logprobs, ref_logprobs)
        )
        current = self._rows_on_current_policy(rollout, old_logprobs)
        correct = rollout.rewards >= 1.0
        measure_mismatch = s.old_logprobs == "trainer"
        metrics = MetricSums(self.device)
        loss_sum = grad_norm_sum = torch.zeros((), device=self.device)
        num_updates = skipped = 0
        for epoch in range(s.epochs):
            for start in range(0, len(rollout), s.rows_per_mini_batch):
                mini = range(start, min(start + s.rows_per_mini_batch, len(rollout)))
                measure = measure_mismatch and epoch == 0 and start == 0
                mini_loss = self._backward_mini_batch(
                    rollout, mini, advantages, correct, current, old_logprobs, ref_logprobs,
                    is_cap, measure, metrics,
                )  # fmt: skip
                grad_norm, stepped = self._optimizer_step(mini_loss)
                if not stepped:
                    skipped += 1
                    self.log(f"step {step}: non-finite loss or gradient, update skipped")
                loss_sum = loss_sum + mini_loss
                grad_norm_sum = grad_norm_sum + grad_norm.to(self.device)  # before clipping
                num_updates += 1
        out = metrics.reduce(loss_sum, self.dp_group, is_cap is not None, measure_mismatch)
        out["loss"] = out["loss"] / max(num_updates, 1)
        out["grad_norm_mean"] = float(grad_norm_sum) / max(num_updates, 1)
        out["updates_skipped_nonfinite"] = float(skipped)
        out["kept_responses"] = float(len(kept))
        return out

    def _rows_on_current_policy(
        self, rollout: RolloutBatch, old_logprobs: torch.Tensor | None
    ) -> torch.Tensor:
        """[B] bool: the rows whose old log-probs are the current policy's (None or a NaN
        row; on the host: no device sync). Only the first mini-batch of the first epoch may
        have them, all its rows or none: the current policy is the old one only before the
        first optimizer step."""
        current = (
            torch.ones(len(rollout), dtype=torch.bool)
            if old_logprobs is None
            else old_logprobs.isnan().all(dim=1)
        )
        n = self.settings.rows_per_mini_batch
        first = current[:n]
        if (
            bool(current[n:].any())
            or (self.settings.epochs > 1 and bool(current.any()))
            or bool(first.any()) != bool(first.all())
        ):
            raise ValueError(
                "old log-probs are missing for some rows: only the first mini-batch of the "
                "first epoch may go without (all its rows), since the current policy is the "
                "old one only before the first optimizer step"
            )
        return current

    def _backward_mini_batch(
        self,
        rollout: RolloutBatch,
        mini: range,
        advantages: torch.Tensor,
        correct: torch.Tensor,
        current: torch.Tensor,
        old_logprobs: torch.Tensor | None,
        ref_logprobs: torch.Tensor | None,
        is_cap: float | None,
        measure: bool,
        metrics: MetricSums,
    ) -> torch.Tensor:
        """Forward + backward of this rank's micro-batches of ``mini``, the loss normalised
        by the whole mini-batch; gradients are reduced over data-parallel ranks on the last
        micro-batch only (``defer_grad_sync``). Returns the mini-batch's loss (this rank's
        share), on the device."""
        s = self.settings
        normalizer = self.normalizer(rollout, mini)
        mini_loss = torch.zeros((), device=self.device)
        micro = self.micro_batches(rollout, mini, s.max_tokens_per_micro_batch)
        for i, rows in enumerate(micro):
            set_gradient_sync(self.model, not s.defer_grad_sync or i == len(micro) - 1)
            mb = rollout.select(rows)
            width = mb.tokens.shape[1]
            hidden = hidden_states(self.model, mb.tokens.to(self.device))
            old = None if bool(current[rows].all()) else old_logprobs
            loss, mb_metrics = policy_loss(
                hidden,
                full_output_weight(self.model),
                mb.targets.to(self.device),
                _rows(old, rows, width, self.device),
                advantages[rows].to(self.device),
                mb.mask,  # on the host: the loss reads row lengths off it, no sync
                correct[rows].to(self.device),
                self.loss_cfg,
                ref_logprobs=_rows(ref_logprobs, rows, width, self.device),
                normalizer=normalizer,
                sampler_logprobs=(
                    _rows(rollout.worker_logprobs, rows, width, self.device)
                    if measure or is_cap is not None
                    else None
                ),
                is_cap=is_cap,
            )
            loss.backward()
            mini_loss = mini_loss + loss.detach()
            metrics.add(mb_metrics, measure)
        return mini_loss

    def _optimizer_step(self, mini_loss: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Clip, then step unless the loss or the gradient is non-finite on any rank (a
        clipped loss can be NaN with finite gradients, so both are checked); the lr
        schedule advances either way. Returns the gradient norm before clipping and
        whether the optimizer stepped."""
        grad_norm = clip_grad_norm_(self.model.parameters(), self.settings.max_grad_norm)
        bad = (~torch.isfinite(mini_loss) | ~torch.isfinite(grad_norm)).float()
        stepped = all_reduce_sum(bad).item() == 0  # the mini-batch's one host sync
        if stepped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        return grad_norm, stepped


def _rows(t: torch.Tensor | None, rows: torch.Tensor, width: int, device) -> torch.Tensor | None:
    return None if t is None else t[rows, :width].to(device)
