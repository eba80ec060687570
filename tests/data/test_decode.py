"""Decoding generated ids never fails on an id the model can emit: a model's vocabulary can be
larger than its tokenizer's (Qwen2.5's embedding has 152,064 rows, its tokenizer 151,665 ids),
and torchtune's decode crashes on the ids past the tokenizer. Those are left out of the text
and counted."""

from __future__ import annotations

import pytest

from simko_tune.data import decode_responses

ANSWER = "The answer is \\boxed{42}."
QWEN_IM_END, QWEN_LAST_SPECIAL = 151645, 151664  # <|im_end|>, <|file_sep|>


def test_ids_past_the_qwen_tokenizer_are_left_out_and_counted(qwen_tokenizer):
    """Real Qwen2.5 tokenizer: torchtune's decode crashes on 151,700 (its padded vocabulary,
    what a trained model can sample); the helper gives the text of the other ids, special
    tokens skipped as before, and counts the ids it left out. 151,664 is the last id the
    tokenizer has, 152,063 the model's last."""
    ids = qwen_tokenizer.encode(ANSWER, add_bos=False, add_eos=False)
    mid = ids.index(qwen_tokenizer.encode("42", add_bos=False, add_eos=False)[1])  # the "2"
    response = ids[:mid] + [151700] + ids[mid:] + [QWEN_LAST_SPECIAL, 151665, 152063]
    with pytest.raises(TypeError, match="NoneType"):  # the crash that killed rank 0
        qwen_tokenizer.decode(response, skip_special_tokens=True)
    texts, unknown = decode_responses(qwen_tokenizer, [response, ids + [QWEN_IM_END], []])
    assert texts == [ANSWER, ANSWER, ""]
    assert unknown == 3


def test_ids_past_the_llama3_tokenizer_are_left_out_and_counted(llama3_tokenizer):
    """Real Llama 3 tokenizer (tiktoken): ids past its specials (128,256 is the last) raise
    KeyError in torchtune's decode; the helper leaves them out and counts them."""
    ids = llama3_tokenizer.encode(ANSWER, add_bos=False, add_eos=False)
    response = [*ids[:3], 128257, *ids[3:], 128009, 130000]  # 128009: <|eot_id|>
    with pytest.raises(KeyError):
        llama3_tokenizer.decode(response)
    assert decode_responses(llama3_tokenizer, [response]) == ([ANSWER], 2)


def test_other_tokenizers_are_refused_by_name():
    class Sentencepiece:
        special_tokens: dict[str, int] = {}

    with pytest.raises(TypeError, match="Sentencepiece"):
        decode_responses(Sentencepiece(), [[1, 2]])


def test_the_eval_recipe_scores_a_response_with_ids_past_the_tokenizer(
    tmp_path, qwen_tokenizer, caplog
):
    """simko_eval's call site, real Qwen2.5 tokenizer: a response with 151,700 inside its
    answer is scored as the rest of it reads (the boxed 42 is right) and the ids are
    reported in the log."""
    import simko_eval
    from omegaconf import OmegaConf

    from simko_tune.config import resolve_config_path
    from simko_tune.data import MathProblem
    from simko_tune.generation import Completion
    from simko_tune.rewards import math_reward

    ids = qwen_tokenizer.encode(ANSWER, add_bos=False, add_eos=False)
    response = [*ids[:-3], 151700, *ids[-3:], QWEN_IM_END, 152000]

    class Generator:
        def generate(self, prompts, n, sampling):
            row = Completion(response, [-1.0] * len(response), "stop", weight_version=0)
            return [[row] * n for _ in prompts]

    class Rewards:
        mode = "boxed"

        def score(self, texts, golds):
            return [math_reward(t, g) for t, g in zip(texts, golds)]

    cfg = OmegaConf.load(resolve_config_path("eval_tiny_cpu"))
    cfg = OmegaConf.merge(cfg, {"model_dir": str(tmp_path), "output_dir": str(tmp_path / "o")})
    recipe = simko_eval.PassAtKEvalRecipe(cfg)
    recipe._tokenizer = qwen_tokenizer
    problem = MathProblem("1", "What is 6 times 7?", "42", "math500")
    with caplog.at_level("WARNING"):
        (rows,) = recipe._generate_and_score(Generator(), Rewards(), "math500", [problem])
    n = recipe.num_samples["math500"]
    assert [(r["response"], r["answer"], r["reward"]) for r in rows] == [(ANSWER, "42", 1.0)] * n
    assert f"math500: {2 * n} generated ids have no token" in caplog.text


@pytest.mark.slow
def test_the_recipe_scores_and_counts_ids_past_the_tokenizer(tmp_path, tiny_model_dir):
    """The trainer's call sites: a generator that emits an id past the tokenizer (put first
    in every response) no longer kills rank 0. The rollout and the evaluation score the text
    of the other ids, and the rollout's stats and the evaluation's scalars count them."""
    import simko_recipe
    from omegaconf import OmegaConf

    from simko_tune.config import check_schema, resolve_config_path

    cfg = OmegaConf.load(resolve_config_path("tiny_cpu"))
    for key, value in {
        "output_dir": str(tmp_path / "out"), "model_dir": str(tiny_model_dir),
        "prepare_model": None, "generation.backend": "native",
        "generation.weight_transfer": "memory", "dataset.n": 8,
        "rollout.prompts_per_step": 2, "rollout.samples_per_prompt": 2,
        "ppo.mini_batch_prompts": 1, "rewards.num_workers": 1, "eval.n": 2,
        "eval.sets.countdown_test.n": 3,
    }.items():  # fmt: skip
        OmegaConf.update(cfg, key, value, force_add=True)
    recipe = simko_recipe.SimKORecipe(check_schema(cfg))
    recipe.setup()
    try:
        past = max(recipe.tokenizer.special_tokens.values()) + 1  # the tokenizer has none
        generate, score = recipe.generator.generate, recipe.reward_pool.score
        written, scored, logged = [], [], {}

        def generate_with_unknown_ids(prompts, n, sampling):
            groups = generate(prompts, n, sampling)
            for c in (c for group in groups for c in group):
                written.append(list(c.token_ids))
                c.token_ids.insert(0, past)
                c.logprobs.insert(0, -1.0)
            return groups

        def record(texts, golds):
            scored.extend(texts)
            return score(texts, golds)

        recipe.generator.generate = generate_with_unknown_ids
        recipe.reward_pool.score = record
        recipe.metric_logger.log_dict = lambda d, step: logged.update(d)
        sampled = recipe.sample(recipe.batches.next_batch(), step=0, version=0)
        recipe.evaluate()
    finally:
        recipe.cleanup()
    expected = [recipe.tokenizer.decode(ids, skip_special_tokens=True) for ids in written]
    assert len(written) == 4 + 3 * 2 and scored == expected
    assert sampled.texts == expected[:4]
    assert sampled.stats["response/unknown_tokens"] == 4
    assert logged["eval/countdown_test/unknown_tokens"] == 6
