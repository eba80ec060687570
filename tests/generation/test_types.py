import pytest

from simko_tune.generation import Completion, SamplingConfig, StaleWeightsError, check_versions
from simko_tune.generation.types import GenerationError, check_prompt_lengths, sample_seed


def _c(version: int) -> Completion:
    return Completion(
        token_ids=[1], logprobs=[-0.1], finish_reason="length", weight_version=version
    )


def test_check_versions_names_the_first_stale_completion():
    check_versions([[_c(3), _c(3)], [_c(3)]], expected=3)
    with pytest.raises(StaleWeightsError, match=r"1 completion.*prompt 1 sample 0 has version 2"):
        check_versions([[_c(3), _c(3)], [_c(2)]], expected=3)


def test_sample_seed_is_deterministic_and_distinct():
    seeds = {sample_seed(7, i, j) for i in range(20) for j in range(20)}
    assert len(seeds) == 400
    assert sample_seed(7, 3, 4) == sample_seed(7, 3, 4)
    assert sample_seed(7, 3, 4) != sample_seed(8, 3, 4)
    assert all(0 <= s < 2**63 for s in seeds)


def test_prompt_length_check_names_prompt_and_lengths():
    check_prompt_lengths([[1] * 9], max_model_len=10)
    with pytest.raises(GenerationError, match=r"prompt 1 has 10 tokens.*max_model_len is 10"):
        check_prompt_lengths([[1] * 3, [1] * 10], max_model_len=10)
    with pytest.raises(GenerationError, match="prompt 0 is empty"):
        check_prompt_lengths([[]], max_model_len=10)


@pytest.mark.parametrize(
    "kw", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"max_tokens": 0}]
)
def test_sampling_config_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        SamplingConfig(**kw)


def test_check_versions_window_for_one_step_off_rollouts():
    """With ``max_staleness=1`` the previous version is accepted, an older or a newer one is
    not; the default window stays exact."""
    check_versions([[_c(3), _c(2)]], expected=3, max_staleness=1)
    with pytest.raises(StaleWeightsError, match=r"version 2\.\.3.*prompt 0 sample 1 has version 1"):
        check_versions([[_c(3), _c(1)]], expected=3, max_staleness=1)
    with pytest.raises(StaleWeightsError, match=r"has version 4"):
        check_versions([[_c(4)]], expected=3, max_staleness=1)
    with pytest.raises(StaleWeightsError):
        check_versions([[_c(2)]], expected=3)
    check_versions([[_c(1)]], expected=3, max_staleness=2)
    with pytest.raises(ValueError, match="max_staleness"):
        check_versions([[_c(3)]], expected=3, max_staleness=-1)
