"""The vLLM worker against the trainer's own computations, on one shared real engine."""

import shutil

import pytest
import torch
import zmq

from simko_tune.generation import (
    GenerationError,
    NativeGenerator,
    SamplingConfig,
    StaleWeightsError,
    WeightSync,
    check_versions,
    publish_weights,
)
from simko_tune.generation.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    decode_reply,
    model_fingerprint,
)
from simko_tune.generation.sync_dir import published_versions, version_dir
from simko_tune.models import read_hf_config

pytestmark = pytest.mark.slow

PROMPTS = [[5, 17, 42, 9], [100, 3], [7, 8, 9, 10, 11, 12, 13]]
GREEDY = SamplingConfig(temperature=0, max_tokens=12)


def _tokens(out):
    return [[c.token_ids for c in row] for row in out]


def test_health_check(vllm_worker, gen_model_dir):
    (info,) = vllm_worker.ping()
    assert info["ok"] and info["model"] == str(gen_model_dir) and info["pid"] > 0
    assert info["max_model_len"] == vllm_worker.max_model_len == 256
    assert info["model_fingerprint"] == model_fingerprint(gen_model_dir)
    assert info["max_message_bytes"] == DEFAULT_MAX_MESSAGE_BYTES


@pytest.mark.parametrize(
    "frames",
    [
        [b"\xff\x00 garbage"],
        [b'{"op": "load", "version": 0}', b"a second frame"],
        [b'{"op": "load", "version": "0; rm -rf /"}'],
        [b'{"op": "generate", "prompts": [[1]], "seeds": [[1]], "sampling": {"max_tokens": -1}}'],
        [b'{"op": "generate", "prompts": [[999999]], "seeds": [[1]], "sampling": {}}'],
    ],
)
def test_malformed_requests_do_not_stop_a_real_worker(vllm_worker, frames):
    """Each gets an error reply; the engine keeps its weights and serves the same greedy
    tokens afterwards."""
    version = vllm_worker.weight_version
    before = _tokens(vllm_worker.generate(PROMPTS, 1, GREEDY))
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(vllm_worker.addresses[0])
    try:
        sock.send_multipart(frames)
        assert sock.poll(120_000), "no reply"
        reply = decode_reply(sock.recv_multipart())
    finally:
        sock.close()
    assert reply["ok"] is False and reply["error"] and not reply.get("fatal")
    assert vllm_worker.ping()[0]["version"] == version
    assert _tokens(vllm_worker.generate(PROMPTS, 1, GREEDY)) == before


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_match_trainer_recomputation(vllm_worker, gen_model_dir, ref, temperature):
    vllm_worker.load_weights(0)  # the initial checkpoint, whatever earlier tests loaded
    model = ref.trainer_model(gen_model_dir)
    out = vllm_worker.generate(
        PROMPTS, 3, SamplingConfig(temperature=temperature, max_tokens=16, seed=5)
    )
    assert [len(row) for row in out] == [3, 3, 3]
    check_versions(out, 0)
    for prompt, row in zip(PROMPTS, out):
        for c in row:
            assert len(c.token_ids) == len(c.logprobs) > 0
            expected = ref.recompute_logprobs(model, prompt, c.token_ids, temperature)
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, rtol=0, atol=1e-4)


def test_published_weights_are_served(vllm_worker, gen_model_dir, sync_dir, versions, ref):
    """Publish → load → greedy changes and equals the trainer's own greedy decode (and the
    native generator's); a second publication through WeightSync moves the version on and,
    once the worker acknowledged it, prunes the first."""
    vllm_worker.load_weights(0)
    before = _tokens(vllm_worker.generate(PROMPTS, 1, GREEDY))
    hf_config = read_hf_config(gen_model_dir)
    stop = set(NativeGenerator(gen_model_dir).eos_ids)
    sync = WeightSync(sync_dir, hf_config)

    v1 = next(versions)
    model = ref.perturbed_model(gen_model_dir, seed=1)
    sync.publish(model, v1)  # no generator attached yet: published only
    vllm_worker.load_weights(v1)
    assert vllm_worker.weight_version == v1
    out = vllm_worker.generate(PROMPTS, 1, GREEDY)
    check_versions(out, v1)
    assert _tokens(out) != before
    assert _tokens(out) == [[ref.naive_greedy(model, p, 12, stop)] for p in PROMPTS]
    native = NativeGenerator(gen_model_dir, sync_dir)
    native.load_weights(v1)
    assert _tokens(native.generate(PROMPTS, 1, GREEDY)) == _tokens(out)

    v2 = next(versions)
    model2 = ref.perturbed_model(gen_model_dir, seed=2)
    sync.attach(vllm_worker)
    sync.publish(model2, v2)  # delivered: returns once the worker acknowledged v2
    assert vllm_worker.weight_version == v2
    out2 = vllm_worker.generate(PROMPTS, 1, GREEDY)
    check_versions(out2, v2)
    with pytest.raises(StaleWeightsError):
        check_versions(out, v2)
    assert _tokens(out2) == [[ref.naive_greedy(model2, p, 12, stop)] for p in PROMPTS]
    sync.close()  # joins the background pruning
    assert v1 not in published_versions(sync_dir) and v2 in published_versions(sync_dir)


def _corrupt_truncate(folder):
    shard = next(folder.glob("*.safetensors"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)


def _corrupt_flip(folder):
    shard = next(folder.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x01
    shard.write_bytes(bytes(data))


def _corrupt_manifest(folder):
    (folder / "manifest.json").unlink()


def _corrupt_unfinished(folder):
    shutil.move(folder, folder.with_name(folder.name + ".tmp"))


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (_corrupt_truncate, "truncated"),
        (_corrupt_flip, "corrupt"),
        (_corrupt_manifest, "manifest missing"),
        (_corrupt_unfinished, "not published"),
    ],
)
def test_bad_publication_is_never_loaded(
    vllm_worker, gen_model_dir, sync_dir, versions, ref, corrupt, message
):
    good = next(versions)
    publish_weights(
        ref.perturbed_model(gen_model_dir, seed=good), good, sync_dir, read_hf_config(gen_model_dir)
    )
    vllm_worker.load_weights(good)
    before = vllm_worker.generate(PROMPTS, 1, GREEDY)

    bad = next(versions)
    publish_weights(
        ref.perturbed_model(gen_model_dir, seed=bad), bad, sync_dir, read_hf_config(gen_model_dir)
    )
    corrupt(version_dir(sync_dir, bad))
    with pytest.raises(GenerationError, match=message):
        vllm_worker.load_weights(bad)
    assert vllm_worker.weight_version == good
    after = vllm_worker.generate(PROMPTS, 1, GREEDY)
    check_versions(after, good)
    assert _tokens(after) == _tokens(before)
    assert good in published_versions(sync_dir)  # still there for restarts


def test_publication_missing_a_weight_is_refused(
    vllm_worker, gen_model_dir, sync_dir, versions, ref
):
    """The loader would only warn and keep the old tensor: the worker refuses instead."""
    model = ref.perturbed_model(gen_model_dir, seed=9)
    hf_config = dict(read_hf_config(gen_model_dir), num_hidden_layers=1)  # drops layer 1 names
    del model.layers[1]
    v = next(versions)
    publish_weights(model, v, sync_dir, hf_config)
    current = vllm_worker.weight_version
    with pytest.raises(GenerationError, match=r"missing \['model.layers.1"):
        vllm_worker.load_weights(v)
    assert vllm_worker.weight_version == current


def test_too_long_prompt_is_refused_before_sending(vllm_worker):
    with pytest.raises(
        GenerationError, match=r"prompt 1 has 256 tokens; the engine's max_model_len is 256"
    ):
        vllm_worker.generate([[1, 2], [3] * 256], 1, GREEDY)
    # and the worker is still fine
    assert len(vllm_worker.generate([[1, 2]], 1, GREEDY)[0]) == 1


def test_response_is_capped_by_context(vllm_worker):
    (c,) = vllm_worker.generate(
        [[3] * 250], 1, SamplingConfig(temperature=0, max_tokens=50, ignore_eos=True)
    )[0]
    assert len(c.token_ids) == 6 and c.finish_reason == "length"


def _tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and all its descendants."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def test_an_idle_worker_leaves_the_cores_to_the_trainer(vllm_worker):
    """After a generate call the worker goes quiet: vLLM's multiprocess executor would
    busy-poll for a second after each message (on CPU the engine runs in the worker process
    instead), taking a core from the trainer's next forward pass."""
    import time

    vllm_worker.generate([[1, 2, 3]] * 4, 2, GREEDY)
    pid = vllm_worker._workers[0].proc.pid
    before = _tree_cpu_seconds(pid)
    time.sleep(1.0)
    used = _tree_cpu_seconds(pid) - before
    assert used < 0.25, f"an idle worker used {used:.2f} CPU seconds in 1 s"
