"""pass@K evaluation of a model on the math benchmarks (the SimKO paper's settings).

    tune run simko_eval --config eval_math model_dir=/path/to/model output_dir=/path/to/out

``model_dir`` is a Hugging Face safetensors directory, a training checkpoint
(``step_XXXXXXXX/``, whose ``hf/`` export is loaded) or a folder of checkpoints (the latest
one is loaded). For every benchmark the recipe samples ``n`` responses per problem with the
generation workers, scores them with the verifier pool, and appends each problem's scored
samples to ``<output_dir>/samples.jsonl`` as soon as the problem is done. A rerun with the
same ``output_dir`` skips the problems already there, so a killed evaluation resumes where
it stopped (a torn last line is dropped and its problem redone). At the end it writes the
pass@K table (Markdown, CSV), its plot, and TensorBoard scalars ``eval/<benchmark>/pass@K``.
"""

from __future__ import annotations

import json
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torchtune import config
from torchtune.utils import get_logger
from tqdm import tqdm

import simko_tune.config
from simko_tune.config import (
    ConfigError,
    EvalRecipeConfig,
    GenerationSection,
    RewardSection,
    check_schema,
)
from simko_tune.data import (
    BENCHMARKS,
    PROMPT_TEMPLATES,
    MathProblem,
    decode_responses,
    load_benchmark,
    stop_token_ids,
    tokenize_prompt,
)
from simko_tune.fs import append_synced, atomic_write
from simko_tune.generation import build_generator
from simko_tune.generation.types import INITIAL_VERSION, check_versions
from simko_tune.metrics import passk_report, read_samples
from simko_tune.paths import STEP_DIR
from simko_tune.rewards import RewardPool, extract_for_mode

log = get_logger("INFO")

SAMPLES_FILE = "samples.jsonl"
SETTINGS_FILE = "eval_settings.json"

ProblemKey = tuple[str, str]  # (benchmark, problem_id)


# ---------------------------------------------------------------------------------------
# Model directory


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def resolve_model_dir(path: str | Path) -> tuple[Path, int | None]:
    """The Hugging Face directory to load and the training step it comes from (None for a
    plain model).

    Accepts an HF directory, a checkpoint ``step_XXXXXXXX/`` (its ``hf/`` export), or a
    folder of checkpoints (the highest step). Published checkpoints appear by rename, so a
    ``step_*`` folder is complete; anything else raises ``FileNotFoundError`` saying what
    was expected.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model_dir={str(path)!r}: no such directory")
    if _is_hf_dir(path):
        match = STEP_DIR.match(path.parent.name) if path.name == "hf" else None
        return path.resolve(), int(match.group(1)) if match else None
    if STEP_DIR.match(path.name) and _is_hf_dir(path / "hf"):
        return (path / "hf").resolve(), int(STEP_DIR.match(path.name).group(1))
    steps = sorted(
        (int(m.group(1)), child)
        for child in path.iterdir()
        if (m := STEP_DIR.match(child.name)) and _is_hf_dir(child / "hf")
    )
    if steps:
        step, child = steps[-1]
        return (child / "hf").resolve(), step
    raise FileNotFoundError(
        f"model_dir={str(path)!r} is neither a Hugging Face model directory (config.json and "
        "*.safetensors) nor a training checkpoint (step_XXXXXXXX/ with an hf/ export) nor a "
        "folder of such checkpoints"
    )


# ---------------------------------------------------------------------------------------
# The samples file


def write_samples_atomically(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def completed_problems(
    rows: list[dict[str, Any]], num_samples: dict[str, int], path: Path
) -> tuple[set[ProblemKey], list[dict[str, Any]]]:
    """The problems of the selected benchmarks that hold exactly samples ``0..n-1``, and the
    rows to keep: those, plus every row of benchmarks not selected in this run. Partial
    problems (a kill during their write) are dropped to be generated again."""
    by_problem: dict[ProblemKey, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_problem[(row["benchmark"], str(row["problem_id"]))].append(row)
    done: set[ProblemKey] = set()
    keep: list[dict[str, Any]] = []
    for key, problem_rows in by_problem.items():
        benchmark = key[0]
        if benchmark not in num_samples:
            keep.extend(problem_rows)
            continue
        n = num_samples[benchmark]
        indices = sorted(row["sample_index"] for row in problem_rows)
        if indices == list(range(n)):
            done.add(key)
            keep.extend(problem_rows)
        elif indices == list(range(len(indices))) and len(indices) > n:
            raise ValueError(
                f"{path}: {benchmark}/{key[1]} has {len(indices)} samples but this run asks "
                f"for {n} (num_samples); use another output_dir or the same num_samples"
            )
    return done, keep


def check_settings(output_dir: Path, settings: dict[str, Any], has_samples: bool) -> None:
    """Pin the settings of the samples in ``output_dir``; resuming them with different
    settings raises ``ValueError`` naming the key."""
    path = output_dir / SETTINGS_FILE
    if has_samples and path.is_file():
        saved = json.loads(path.read_text())
        for key, value in settings.items():
            if saved.get(key) != value:
                raise ValueError(
                    f"{output_dir}: its samples were generated with {key}={saved.get(key)!r}, "
                    f"this run has {key}={value!r}; use another output_dir or the same settings"
                )
        return
    atomic_write(path, json.dumps(settings, indent=2))


# ---------------------------------------------------------------------------------------
# The recipe


class PassAtKEvalRecipe:
    """Generate, score and append samples problem by problem; then report pass@K.

    The config is checked in full before anything slow starts (workers take tens of seconds
    to start), and the generators start only when some problem is left to generate.
    """

    def __init__(self, cfg: DictConfig) -> None:
        cfg = self._check_config(cfg)
        self._cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.samples_path = self.output_dir / SAMPLES_FILE
        self.num_samples = {
            name: int(cfg.eval.n_per_benchmark.get(name, cfg.eval.n)) for name in cfg.benchmarks
        }
        self.num_generated_problems = 0

    @staticmethod
    def _check_config(cfg: DictConfig) -> DictConfig:
        """The config merged onto :class:`EvalRecipeConfig` (types, unknown and missing keys,
        closed sets), the ``generation`` and ``rewards`` sections' own checks (the training
        recipe's), then what only this recipe needs; every error names its key, all of them
        at once. Raises :class:`ConfigError`."""
        cfg = check_schema(cfg, EvalRecipeConfig)
        errors = GenerationSection.problems(cfg.generation) + RewardSection.problems(cfg.rewards)
        for key in ("model_dir", "output_dir"):
            if cfg.get(key) in (None, ""):
                errors.append(f"config key {key!r} is required (pass {key}=...)")
        benchmarks = cfg.benchmarks
        if not benchmarks:
            errors.append("config key 'benchmarks' must be a non-empty list")
        for i, name in enumerate(benchmarks):
            if name not in BENCHMARKS:
                errors.append(
                    f"config key 'benchmarks[{i}]': unknown benchmark {name!r}; "
                    f"known: {', '.join(sorted(BENCHMARKS))}"
                )
        if len(set(benchmarks)) != len(benchmarks):
            errors.append(f"config key 'benchmarks' lists a benchmark twice: {list(benchmarks)}")
        section = cfg.eval
        for name, n in [("n", section.n), *section.n_per_benchmark.items()]:
            key = "eval.n" if name == "n" else f"eval.n_per_benchmark.{name}"
            if name != "n" and name not in BENCHMARKS:
                errors.append(f"config key {key!r}: unknown benchmark {name!r}")
            if n < 1:
                errors.append(f"config key {key!r} must be a positive integer, got {n!r}")
        if section.problems_per_call < 1:
            errors.append("config key 'eval.problems_per_call' must be a positive integer")
        for k in section.ks or []:
            if k < 1:
                errors.append(f"config key 'eval.ks' must hold positive integers, got {k!r}")
        if cfg.prompt_template not in PROMPT_TEMPLATES:
            errors.append(
                f"config key 'prompt_template': unknown template {cfg.prompt_template!r}; "
                f"known: {', '.join(sorted(PROMPT_TEMPLATES))}"
            )
        if cfg.generation.addresses:
            errors.append(
                "config key 'generation.addresses': simko_eval starts its own workers on "
                "model_dir; remote workers serve whatever model they were given"
            )
        if errors:
            raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
        return cfg

    def setup(self) -> None:
        cfg = self._cfg
        self.model_dir, self.step = resolve_model_dir(cfg.model_dir)
        # Tokenizer paths in the YAML interpolate ${model_dir}: point them at the export.
        cfg.model_dir = str(self.model_dir)
        log.info(
            f"Model: {self.model_dir}" + (f" (step {self.step})" if self.step is not None else "")
        )
        self.output_dir.mkdir(parents=True, exist_ok=True)
        found = read_samples(self.samples_path)
        rows, torn = found.rows, found.torn
        # Samples of one output_dir must share these, or the table would average over two
        # models or sampling setups.
        check_settings(
            self.output_dir,
            {
                "model_dir": str(self.model_dir),
                "prompt_template": cfg.prompt_template,
                "temperature": cfg.eval.temperature,
                "top_p": cfg.eval.top_p,
                "max_tokens": cfg.eval.max_tokens,
            },
            has_samples=bool(rows),
        )
        self._tokenizer = config.instantiate(cfg.tokenizer)
        self._metric_logger = config.instantiate(cfg.metric_logger)
        self._metric_logger.log_config(cfg)

        data_dir = Path(cfg.data_dir) if cfg.data_dir else None
        self._problems = {
            name: load_benchmark(name, data_dir=data_dir, limit=cfg.limit)
            for name in cfg.benchmarks
        }
        done, keep = completed_problems(rows, self.num_samples, self.samples_path)
        if torn or len(keep) != len(rows):
            log.info(
                f"{self.samples_path}: dropping {len(rows) - len(keep)} rows of unfinished "
                "problems" + (" and a torn last line" if torn else "")
            )
            write_samples_atomically(self.samples_path, keep)
        self._todo: dict[str, list[MathProblem]] = {}
        for name, problems in self._problems.items():
            self._todo[name] = [p for p in problems if (name, p.id) not in done]
            log.info(
                f"{name}: {len(problems)} problems, {len(problems) - len(self._todo[name])} "
                f"already scored, {len(self._todo[name])} to generate (n={self.num_samples[name]})"
            )

    def _start_generator(self) -> Any:
        """The generation workers, built from the ``generation`` section as in training."""
        return build_generator(
            self._cfg.generation,
            str(self.model_dir),
            device=self._cfg.device,
            sync_dir=self._cfg.generation.sync_dir,
            log_dir=self.output_dir / "worker_logs",
        )

    def evaluate(self) -> None:
        """Generate and score every problem not yet in the samples file, appending each
        problem's rows as one write (a kill leaves whole problems and at most one partial
        one, which the next run drops and redoes)."""
        total = sum(len(problems) for problems in self._todo.values())
        if total == 0:
            log.info("Every problem is already scored; nothing to generate.")
            return
        per_call = self._cfg.eval.problems_per_call
        with (
            self._start_generator() as generator,
            RewardPool.from_config(self._cfg.rewards) as rewards,
            self.samples_path.open("a", encoding="utf-8") as out,
            tqdm(total=total, unit="problem", desc="pass@K eval", dynamic_ncols=True) as bar,
        ):
            for benchmark, todo in self._todo.items():
                for start in range(0, len(todo), per_call):
                    batch = todo[start : start + per_call]
                    for rows in self._generate_and_score(generator, rewards, benchmark, batch):
                        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
                        append_synced(out, lines)
                        self.num_generated_problems += 1
                        bar.update(1)
        log.info(f"Generated and scored {self.num_generated_problems} problems.")

    def _sampling(self, benchmark: str, batch: list[MathProblem]) -> Any:
        from simko_tune.generation import SamplingConfig

        sampling = self._cfg.eval
        seed = sampling.seed
        if seed is not None:
            # Per batch, from its first problem: batches must not share one random stream.
            seed = (int(seed) + zlib.crc32(f"{benchmark}/{batch[0].id}".encode())) % 2**31
        return SamplingConfig(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            stop_token_ids=stop_token_ids(self._tokenizer),
            seed=seed,
        )

    def _generate_and_score(
        self, generator: Any, rewards: Any, benchmark: str, batch: list[MathProblem]
    ) -> list[list[dict[str, Any]]]:
        """The scored sample rows of each problem of ``batch``."""
        n = self.num_samples[benchmark]
        template = self._cfg.prompt_template
        prompts = [tokenize_prompt(self._tokenizer, template, p.problem) for p in batch]
        completions = generator.generate(prompts, n, self._sampling(benchmark, batch))
        # The generators never load other weights: anything else is not this model's samples.
        check_versions(completions, INITIAL_VERSION)
        for problem, samples in zip(batch, completions, strict=True):
            if len(samples) != n:
                raise RuntimeError(
                    f"the generator returned {len(samples)} samples for "
                    f"{benchmark}/{problem.id}, expected {n}"
                )
        flat = [c for samples in completions for c in samples]
        responses, unknown = decode_responses(self._tokenizer, [c.token_ids for c in flat])
        if unknown:
            log.warning(
                f"{benchmark}: {unknown} generated ids have no token in the tokenizer (the "
                "model's padded vocabulary): left out of the responses' text"
            )
        scores = rewards.score(responses, [p.answer for p in batch for _ in range(n)])
        rows = [
            {
                "benchmark": benchmark,
                "problem_id": batch[i // n].id,
                "sample_index": i % n,
                "reward": float(score),
                "answer": extract_for_mode(response, rewards.mode),
                "response": response,
                "finish_reason": completion.finish_reason,
                "num_tokens": len(completion.token_ids),
            }
            for i, (completion, response, score) in enumerate(
                zip(flat, responses, scores, strict=True)
            )
        ]
        return [rows[i : i + n] for i in range(0, len(rows), n)]

    def report(self) -> dict[str, float]:
        """Write the pass@K table and plot over every sample in the output_dir, and log them
        as TensorBoard scalars at the checkpoint's training step (0 for a plain model), so
        evaluations of one run's checkpoints line up over training."""
        ks = list(self._cfg.eval.ks) if self._cfg.eval.ks else None
        run = f"step_{self.step:08d}" if self.step is not None else self.model_dir.name
        report = passk_report({run: self.samples_path}, self.output_dir, ks=ks)
        scalars: dict[str, float] = {}
        for scores in report.scores:
            prefix = f"eval/{scores.benchmark}"
            scalars.update({f"{prefix}/pass@{k}": v for k, v in scores.pass_at_k.items()})
            scalars[f"{prefix}/mean@n"] = scores.mean_at_n
            scalars[f"{prefix}/maj@n"] = scores.maj_at_n
            curve = "  ".join(f"pass@{k} {100 * v:.1f}" for k, v in scores.pass_at_k.items())
            log.info(f"{scores.benchmark} ({scores.num_problems} problems, n={scores.n}): {curve}")
        self._metric_logger.log_dict(scalars, step=self.step if self.step is not None else 0)
        log.info(f"Wrote {report.markdown}, {report.csv}, {report.plot}")
        return scalars

    def cleanup(self) -> None:
        self._metric_logger.close()


@simko_tune.config.parse
def recipe_main(cfg: DictConfig) -> None:
    recipe = PassAtKEvalRecipe(cfg)
    recipe.setup()
    recipe.evaluate()
    recipe.report()
    recipe.cleanup()


if __name__ == "__main__":
    recipe_main()
