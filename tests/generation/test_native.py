"""NativeGenerator (in-process torchtune KV-cache decoding) against plain recomputation."""

import json
import math

import pytest
import torch

from simko_tune.generation import NativeGenerator, SamplingConfig, publish_weights
from simko_tune.generation.native import _apply_top_p
from simko_tune.models import read_hf_config

PROMPTS = [[5, 17, 42, 9], [100, 3], [7, 8, 9, 10, 11, 12, 13]]


@pytest.fixture(scope="module")
def native(gen_model_dir):
    return NativeGenerator(gen_model_dir, max_batch_size=4)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_recomputation(native, gen_model_dir, ref, temperature):
    model = ref.trainer_model(gen_model_dir)
    out = native.generate(
        PROMPTS, 2, SamplingConfig(temperature=temperature, max_tokens=12, seed=1)
    )
    for prompt, row in zip(PROMPTS, out):
        for c in row:
            assert len(c.token_ids) == len(c.logprobs) > 0 and c.weight_version == 0
            expected = ref.recompute_logprobs(model, prompt, c.token_ids, temperature)
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, rtol=0, atol=1e-4)


def test_greedy_matches_naive_decode_with_stop(native, gen_model_dir, ref):
    """Left padding and the KV cache change nothing: greedy equals the no-cache decode."""
    model = ref.perturbed_model(gen_model_dir, seed=3)
    gen = NativeGenerator(gen_model_dir, max_batch_size=2)
    gen.model.load_state_dict(model.state_dict())
    stop = {
        int(
            gen.generate([PROMPTS[0]], 1, SamplingConfig(temperature=0, max_tokens=5))[0][
                0
            ].token_ids[2]
        )
    }
    sampling = SamplingConfig(temperature=0, max_tokens=10, stop_token_ids=sorted(stop))
    for prompt, row in zip(PROMPTS, gen.generate(PROMPTS, 1, sampling)):
        expected = ref.naive_greedy(model, prompt, 10, stop | gen.eos_ids)
        assert row[0].token_ids == expected
        assert row[0].finish_reason == ("stop" if expected[-1] in stop | gen.eos_ids else "length")
    assert gen.generate([PROMPTS[0]], 1, sampling)[0][0].finish_reason == "stop"


def test_seeded_samples_do_not_depend_on_batching(gen_model_dir):
    sampling = SamplingConfig(temperature=1.0, max_tokens=8, seed=11)
    a = NativeGenerator(gen_model_dir, max_batch_size=1).generate(PROMPTS, 3, sampling)
    b = NativeGenerator(gen_model_dir, max_batch_size=5).generate(PROMPTS, 3, sampling)
    assert [[c.token_ids for c in r] for r in a] == [[c.token_ids for c in r] for r in b]
    other = NativeGenerator(gen_model_dir).generate(
        PROMPTS, 3, SamplingConfig(temperature=1.0, max_tokens=8, seed=12)
    )
    assert [[c.token_ids for c in r] for r in a] != [[c.token_ids for c in r] for r in other]
    assert len({tuple(c.token_ids) for c in a[0]}) > 1  # samples of one prompt differ


def test_rows_of_one_prompt_share_its_prefill(gen_model_dir):
    """Each distinct prompt of a batch goes through the model once (its n rows copy its keys
    and values), and the completions are those of decoding every row on its own."""
    gen = NativeGenerator(gen_model_dir, max_batch_size=6)
    shapes = []
    hook = gen.model.register_forward_pre_hook(lambda m, args: shapes.append(args[0].shape))
    sampling = SamplingConfig(temperature=1.0, max_tokens=4, seed=2, ignore_eos=True)
    shared = gen.generate(PROMPTS[:2], 3, sampling)
    hook.remove()
    assert shapes[0] == (2, max(len(p) for p in PROMPTS[:2]))  # one row per distinct prompt
    assert shapes[1:] == [(6, 1)] * 3  # then all six rows decode
    alone = NativeGenerator(gen_model_dir, max_batch_size=1).generate(PROMPTS[:2], 3, sampling)
    for a, b in zip(sum(shared, []), sum(alone, [])):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs))


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = _apply_top_p(logits, 0.8).isfinite()[0].tolist()
    assert kept == [True, True, False, False]
    assert _apply_top_p(logits, 0.01).isfinite()[0].tolist() == [True, False, False, False]


def test_load_weights_from_publication(gen_model_dir, ref, tmp_path):
    gen = NativeGenerator(gen_model_dir, tmp_path)
    model = ref.perturbed_model(gen_model_dir, seed=4)
    publish_weights(model, 2, tmp_path, read_hf_config(gen_model_dir))
    gen.load_weights(2)
    assert gen.weight_version == 2
    out = gen.generate(PROMPTS[:1], 1, SamplingConfig(temperature=0, max_tokens=6))[0][0]
    assert out.weight_version == 2
    assert out.token_ids == ref.naive_greedy(model, PROMPTS[0], 6, gen.eos_ids)


def test_load_state_from_memory_serves_the_trainers_weights(gen_model_dir, ref):
    """The in-memory transfer: the trainer's state dict, copied in, decodes as the trainer's
    model does (naive greedy reference); a missing tensor is refused, naming it."""
    gen = NativeGenerator(gen_model_dir)
    model = ref.perturbed_model(gen_model_dir, seed=4)
    gen.load_state(3, model.state_dict())
    assert gen.weight_version == 3
    out = gen.generate(PROMPTS[:1], 1, SamplingConfig(temperature=0, max_tokens=6))[0][0]
    assert out.weight_version == 3
    assert out.token_ids == ref.naive_greedy(model, PROMPTS[0], 6, gen.eos_ids)
    state = dict(model.state_dict())
    del state["norm.scale"]
    with pytest.raises(RuntimeError, match="norm.scale"):
        gen.load_state(4, state)


def test_kv_caches_are_built_on_the_generators_device(native):
    """The caches follow the model, not the default device: with ``meta`` as the default
    (standing in for CPU beside CUDA weights, the first GPU run's failure), decoding on CPU
    still works and gives the same tokens."""
    sampling = SamplingConfig(temperature=1.0, max_tokens=6, seed=5)
    expected = native.generate(PROMPTS, 2, sampling)
    torch.set_default_device("meta")
    try:
        got = native.generate(PROMPTS, 2, sampling)
    finally:
        torch.set_default_device(None)
    assert [[c.token_ids for c in r] for r in got] == [[c.token_ids for c in r] for r in expected]
    assert not native.model.caches_are_setup()


def _sampled_distribution(probs: list[float], temperature: float, top_p: float) -> list[float]:
    """The distribution a sampler must draw from, written plainly: p^(1/T), then keep a token
    iff the tokens more likely than it hold less than ``top_p`` of the mass (vLLM's rule),
    renormalised."""
    scaled = [p ** (1.0 / temperature) for p in probs]
    total = sum(scaled)
    scaled = [p / total for p in scaled]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    kept, above = set(), 0.0
    for i in order:
        if above < top_p:
            kept.add(i)
        above += scaled[i]
    mass = sum(scaled[i] for i in kept)
    return [scaled[i] / mass if i in kept else 0.0 for i in range(len(scaled))]


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.6, 1.0), (1.0, 0.7)])
def test_samples_follow_the_tempered_nucleus_distribution(gen_model_dir, ref, temperature, top_p):
    """4,000 seeded draws of one prompt's first token against the distribution written
    plainly from a full forward pass (no cache): every token's frequency within 5 standard
    errors of its probability, tokens outside the nucleus never drawn, and each draw's
    log-prob that of the distribution sampled from. The default CPU run samples with this
    generator, so its sampler is checked, not only its log-probs; the check has the power to
    see a wrong temperature or nucleus (asserted)."""
    model = ref.perturbed_model(gen_model_dir, seed=5, std=0.1)
    gen = NativeGenerator(gen_model_dir, max_batch_size=4000)
    gen.load_state(1, model.state_dict())
    prompt, draws = PROMPTS[0], 4000
    with torch.no_grad():
        probs = model(torch.tensor([prompt]))[0, -1].double().softmax(-1).tolist()
    expected = _sampled_distribution(probs, temperature, top_p)
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, max_tokens=1, seed=9)
    row = gen.generate([prompt], draws, sampling)[0]
    counts = [0] * len(probs)
    for c in row:
        counts[c.token_ids[0]] += 1
        assert c.logprobs[0] == pytest.approx(math.log(expected[c.token_ids[0]]), abs=1e-4)
    tolerance = [5 * math.sqrt(p * (1 - p) / draws) + 1 / draws for p in expected]
    for token, (n, p, tol) in enumerate(zip(counts, expected, tolerance)):
        if p == 0:
            assert n == 0, f"token {token} lies outside the nucleus but was drawn {n} times"
        else:
            assert abs(n / draws - p) <= tol, (token, n / draws, p)
    # power: the untempered full distribution differs beyond the tolerance where it should
    other = _sampled_distribution(probs, 1.0, 1.0)
    if (temperature, top_p) != (1.0, 1.0):
        assert max(abs(a - b) - t for a, b, t in zip(expected, other, tolerance)) > 0
    assert max(expected) < 0.5 and sum(p > 0.01 for p in expected) >= 5  # not one sure token


@pytest.fixture(scope="module")
def context_64_dir(gen_model_dir, tmp_path_factory):
    """A tiny model whose context is 64 positions (else the shape of ``gen_model_dir``)."""
    from simko_tune.demo.tiny import TinyQwen2Dims, build_tiny_qwen2

    shape = json.loads((gen_model_dir / "tiny_dims.json").read_text())
    dims = TinyQwen2Dims(**{**shape, "max_seq_len": 64})
    return build_tiny_qwen2(gen_model_dir, tmp_path_factory.mktemp("ctx64") / "model", dims)


def test_mixed_prompt_lengths_stop_each_row_at_its_context(context_64_dir):
    """Prompts of 5 and 50 tokens with a budget of 100 in a context of 64: batched, the long
    prompt's rows finish first and must not be fed past the context (they were: IndexError);
    every row fills the context, ends with "length", and equals that row decoded alone."""
    prompts = [list(range(10, 15)), [(7 * i) % 300 + 3 for i in range(50)]]
    sampling = SamplingConfig(temperature=1.0, max_tokens=100, seed=3, ignore_eos=True)
    batched = NativeGenerator(context_64_dir, max_batch_size=4).generate(prompts, 2, sampling)
    alone = NativeGenerator(context_64_dir, max_batch_size=1).generate(prompts, 2, sampling)
    for prompt, row, row_alone in zip(prompts, batched, alone):
        for a, b in zip(row, row_alone):
            assert len(a.token_ids) == len(a.logprobs) == 64 - len(prompt)
            assert a.finish_reason == b.finish_reason == "length"
            assert a.token_ids == b.token_ids
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs))


def test_validate_refuses_a_native_run_past_the_models_context(context_64_dir, monkeypatch):
    """dry_run's check: with generation.backend=native the context is the model's own (64
    here, under the engine's max_model_len of 128), for the rollout and for evaluation; the
    message names both keys. A sum equal to the context fits; vLLM runs are not concerned."""
    from omegaconf import OmegaConf

    from simko_tune.config import check_schema, resolve_config_path
    from simko_tune.plan import validate

    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def errors(**overrides) -> list[str]:
        cfg = OmegaConf.load(resolve_config_path("tiny_cpu"))
        cfg.model_dir = str(context_64_dir)
        for key, value in overrides.items():
            OmegaConf.update(cfg, key, value)
        return validate(check_schema(cfg))[0]

    found = errors(**{"rollout.max_response_tokens": 50, "eval.max_tokens": 48})
    assert any(
        "rollout.max_prompt_tokens + rollout.max_response_tokens = 24 + 50 exceeds" in e
        and "generation.backend=native" in e
        and "64" in e
        for e in found
    ), found
    assert any("rollout.max_prompt_tokens + eval.max_tokens = 24 + 48 exceeds" in e for e in found)
    assert errors(**{"rollout.max_response_tokens": 40, "eval.max_tokens": 40}) == []
    no_eval = {"eval.every_n_steps": 0, "eval.before_training": False, "eval.max_tokens": 48}
    assert errors(**no_eval) == []
    vllm = {"generation.backend": "vllm", "generation.weight_transfer": "files"}
    assert errors(**vllm, **{"rollout.max_response_tokens": 50}) == []
