"""Evaluation statistics: unbiased pass@K, mean@n, maj@n and the report over runs."""

from simko_tune.metrics.passk import (
    maj_at_n,
    mean_at_n,
    pass_at_k,
    pass_at_k_curve,
    powers_of_two_up_to,
)
from simko_tune.metrics.report import (
    BenchmarkScores,
    PassKReport,
    SampleRows,
    passk_report,
    read_samples,
    samples_by_problem,
)

__all__ = [
    "BenchmarkScores",
    "PassKReport",
    "maj_at_n",
    "mean_at_n",
    "pass_at_k",
    "pass_at_k_curve",
    "passk_report",
    "powers_of_two_up_to",
    "read_samples",
    "samples_by_problem",
    "SampleRows",
]
