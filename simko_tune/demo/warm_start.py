"""The CPU default's policy: a tiny Qwen2 warm-started on Countdown by supervised training.

An untrained tiny model scores 0 on every problem, so every group advantage is 0 and RL
cannot start. This module trains a small tokenizer on Countdown text, builds a tiny Qwen2,
fits it to solver-written answers just long enough that sampling at temperature 1 solves
a moderate fraction of training problems (default target 0.3), and saves a Hugging Face
directory that vLLM, transformers and the recipe load like any Qwen2 checkpoint.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torchtune.modules import TransformerDecoder

from simko_tune.demo.countdown import (
    STOP_TOKEN,
    CountdownSpec,
    countdown_reward,
    make_countdown_problems,
    parse_gold,
    solve,
)
from simko_tune.demo.tiny import TinyQwen2Dims, build_tiny_qwen2, train_tokenizer, write_hf_dir
from simko_tune.fs import replace_dir
from simko_tune.models import load_hf_model, read_hf_config, tune_to_hf_converter

logger = logging.getLogger(__name__)

MARKER = "warm_start.json"


def default_dims() -> TinyQwen2Dims:
    """Head dim 32: vLLM's CPU attention supports head sizes 32, 64, 80, ... only."""
    return TinyQwen2Dims(
        num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=128, intermediate_dim=384,
        max_seq_len=128,
    )  # fmt: skip


@dataclass
class WarmStartConfig:
    """Settings of one build; all of them are written to ``warm_start.json``."""

    seed: int = 0
    dims: TinyQwen2Dims = field(default_factory=default_dims)
    vocab_size: int = 320  # BPE cap; Countdown text only yields ~26 merges: 304 ids in all
    spec: CountdownSpec = field(default_factory=CountdownSpec)
    sft_problems: int = 1200  # train-split problems the supervised phase sees
    max_steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 20
    target_success: float | None = 0.3  # stop once sampled success reaches it; None: max_steps
    eval_every: int = 50
    eval_problems: int = 256  # train-split problems for the stopping check
    report_samples: int = 4  # samples per problem for the final figures
    max_new_tokens: int = 24


class CountdownTokens:
    """Token ids of prompts and answers, encoded separately: the trainer and vLLM see
    the prompt's ids and then generate the answer's, never a joint encoding."""

    def __init__(self, model_dir: Path):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.stop_id = self.tok.token_to_id(STOP_TOKEN)
        self.pad_id = self.tok.token_to_id("<|endoftext|>")

    def prompt(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def answer(self, text: str) -> list[int]:
        return self.tok.encode(text).ids + [self.stop_id]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


def _sft_batch(
    examples: list[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens and next-token labels, -100 everywhere but the answer tokens."""
    length = max(len(p) + len(a) for p, a in examples)
    tokens = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    for i, (p, a) in enumerate(examples):
        seq = p + a
        tokens[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(p) - 1 : len(seq) - 1] = torch.tensor(a)
    return tokens, labels


@torch.no_grad()
def sample_answers(
    model: TransformerDecoder,
    prompts: list[list[int]],
    stop_id: int,
    pad_id: int,
    max_new_tokens: int,
    generator: torch.Generator,
    temperature: float = 1.0,
) -> list[list[int]]:
    """One sampled answer per prompt (up to, without, the stop token), with torchtune's
    KV-cache generation on left-padded prompts."""
    from torchtune.generation import generate
    from torchtune.modules.common_utils import local_kv_cache

    was_training = model.training
    model.eval()
    width = max(len(p) for p in prompts)
    batch = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, width - len(p) :] = torch.tensor(p)
    with local_kv_cache(
        model,
        batch_size=len(prompts),
        device=torch.device("cpu"),
        dtype=torch.float32,
        decoder_max_seq_len=width + max_new_tokens,
    ):
        out, _ = generate(
            model,
            batch,
            max_generated_tokens=max_new_tokens,
            pad_id=pad_id,
            temperature=temperature,
            stop_tokens=[stop_id],
            rng=generator,
        )
    model.train(was_training)
    answers = []
    for row in out[:, width:].tolist():
        answers.append(row[: row.index(stop_id)] if stop_id in row else row)
    return answers


def sampled_success(
    model: TransformerDecoder,
    tokens: CountdownTokens,
    problems: list,
    samples: int,
    max_new_tokens: int,
    seed: int,
) -> float:
    """Mean Countdown reward of ``samples`` temperature-1 answers per problem."""
    generator = torch.Generator().manual_seed(seed)
    prompts = [tokens.prompt(p.problem) for p in problems for _ in range(samples)]
    golds = [p.answer for p in problems for _ in range(samples)]
    answers = sample_answers(
        model, prompts, tokens.stop_id, tokens.pad_id, max_new_tokens, generator
    )
    rewards = [countdown_reward(tokens.decode(a), g) for a, g in zip(answers, golds)]
    return sum(rewards) / len(rewards)


def _supervised_fit(
    model: TransformerDecoder, tokens: CountdownTokens, cfg: WarmStartConfig
) -> tuple[int, list[dict]]:
    """AdamW on solver-written answers (a fresh random solution each time a problem is
    drawn, so the policy keeps several solution paths) until the sampled success on
    training problems reaches ``cfg.target_success``. Returns steps taken and the log."""
    rng = random.Random(f"warm_start/{cfg.seed}")
    problems = make_countdown_problems(cfg.sft_problems, cfg.seed, "train", cfg.spec)
    encoded = []
    for p in problems:
        numbers, target = parse_gold(p.answer)
        encoded.append(
            (tokens.prompt(p.problem), [tokens.answer(s) for s in solve(numbers, target)])
        )
    check = problems[: cfg.eval_problems]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    log: list[dict] = []
    step = 0
    while step < cfg.max_steps:
        model.train()
        batch = [rng.choice(encoded) for _ in range(cfg.batch_size)]
        toks, labels = _sft_batch([(p, rng.choice(ans)) for p, ans in batch], tokens.pad_id)
        logits = model(toks)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        if cfg.target_success is not None and step % cfg.eval_every == 0:
            success = sampled_success(model, tokens, check, 1, cfg.max_new_tokens, cfg.seed + step)
            log.append({"step": step, "loss": round(loss.item(), 4), "success": success})
            logger.info(
                "warm start step %d: loss %.4f, sampled success %.3f", step, loss.item(), success
            )
            if success >= cfg.target_success:
                break
    return step, log


def build_tiny_policy(out_dir: str | Path, cfg: WarmStartConfig | None = None) -> Path:
    """Build the warm-started Countdown policy and publish it at ``out_dir`` (replacing
    what is there) as one atomic rename; ``warm_start.json`` records settings and figures."""
    cfg = cfg or WarmStartConfig()
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    torch.manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.build.", dir=out.parent) as work:
        work = Path(work)
        corpus = []
        for p in make_countdown_problems(cfg.sft_problems, cfg.seed, "train", cfg.spec):
            numbers, target = parse_gold(p.answer)
            corpus += [p.problem + s + STOP_TOKEN for s in solve(numbers, target)]
        tok_dir = train_tokenizer(corpus, work / "tokenizer", vocab_size=cfg.vocab_size)
        init_dir = build_tiny_qwen2(tok_dir, work / "init", cfg.dims, seed=cfg.seed)
        model = load_hf_model(init_dir)
        tokens = CountdownTokens(init_dir)

        steps, log = _supervised_fit(model, tokens, cfg)
        n_test = min(cfg.eval_problems, 150)
        figures = {
            "train_success": sampled_success(
                model, tokens, make_countdown_problems(cfg.eval_problems, cfg.seed + 1, "train", cfg.spec),
                cfg.report_samples, cfg.max_new_tokens, cfg.seed + 1,
            ),
            "test_success": sampled_success(
                model, tokens, make_countdown_problems(n_test, cfg.seed, "test", cfg.spec),
                cfg.report_samples, cfg.max_new_tokens, cfg.seed + 2,
            ),
        }  # fmt: skip
        config = read_hf_config(init_dir)
        staged = write_hf_dir(
            tune_to_hf_converter(config)(model.state_dict()), config, tok_dir, work / "model"
        )
        record = {
            **asdict(cfg),
            "steps": steps,
            "sampling": {"temperature": 1.0, "samples_per_problem": cfg.report_samples},
            **figures,
            "log": log,
            "build_seconds": round(time.monotonic() - started, 1),
        }
        (staged / MARKER).write_text(json.dumps(record, indent=2))
        (staged / "tiny_dims.json").write_text(json.dumps(asdict(cfg.dims), indent=2))
        replace_dir(staged, out)
    return out


def warm_start_config(**settings) -> WarmStartConfig:
    """The defaults with ``settings`` replacing fields (``dims`` and ``spec`` as dicts of
    the fields they change): what a config's ``prepare_model`` section passes."""
    cfg = WarmStartConfig()
    unknown = set(settings) - {f.name for f in fields(WarmStartConfig)}
    if unknown:
        raise TypeError(f"unknown warm-start settings {sorted(unknown)}")
    for name, cls in (("dims", TinyQwen2Dims), ("spec", CountdownSpec)):
        if name in settings:
            settings[name] = cls(**{**asdict(getattr(cfg, name)), **dict(settings[name])})
    return replace(cfg, **settings)


def ensure_tiny_policy(out_dir: str | Path, cfg: WarmStartConfig | None = None, **settings) -> Path:
    """``out_dir`` if it holds a finished build of these settings (its ``warm_start.json``
    is written before the directory is published), else build it now: a build made with
    other settings (an older version's, say) is replaced, never silently reused.
    ``settings``: see :func:`warm_start_config` (not with ``cfg``)."""
    out = Path(out_dir)
    if cfg is not None and settings:
        raise TypeError("pass either cfg or settings, not both")
    cfg = cfg or warm_start_config(**settings)
    marker = out / MARKER
    if marker.is_file():
        record = json.loads(marker.read_text())
        wanted = json.loads(json.dumps(asdict(cfg)))
        if {k: record.get(k) for k in wanted} == wanted:
            return out
        logger.info("%s was built with other warm-start settings: rebuilding it", out)
    return build_tiny_policy(out, cfg)
