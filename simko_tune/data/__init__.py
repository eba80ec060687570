"""Datasets, benchmarks, prompt templates and the prompt order for training."""

from simko_tune.data.benchmarks import BENCHMARKS, PAPER_BENCHMARKS, BenchmarkSpec, load_benchmark
from simko_tune.data.problems import DataError, MathProblem
from simko_tune.data.prompts import (
    PROMPT_TEMPLATES,
    decode_responses,
    encode_with_special_tokens,
    render_prompt,
    stop_token_ids,
    tokenize_prompt,
)
from simko_tune.data.sampler import PromptBatches
from simko_tune.data.train import (
    TRAIN_DATASETS,
    LoadReport,
    load_train_dataset,
    load_train_dataset_with_report,
)

__all__ = [
    "BENCHMARKS",
    "PAPER_BENCHMARKS",
    "PROMPT_TEMPLATES",
    "TRAIN_DATASETS",
    "BenchmarkSpec",
    "DataError",
    "LoadReport",
    "MathProblem",
    "PromptBatches",
    "decode_responses",
    "encode_with_special_tokens",
    "load_benchmark",
    "load_train_dataset",
    "load_train_dataset_with_report",
    "render_prompt",
    "stop_token_ids",
    "tokenize_prompt",
]
