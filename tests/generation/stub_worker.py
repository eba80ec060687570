"""A generation worker process with a stub engine: the real serve loop, sockets, CURVE and
message handling of :mod:`simko_tune.generation.server`, answering in milliseconds.

Run as a script: ``python stub_worker.py --model DIR --port P [serving options]``. A sample's
tokens are the prompt shifted by its seed, cut at ``max_tokens``; its log-probs are
``-(t + 1) / 8`` (exact in float32), so a test can check every value that comes back.
"""

import argparse

from simko_tune.generation.protocol import model_fingerprint
from simko_tune.generation.server import add_serving_args, parse_generate, serve, serving_kwargs


class StubWorker:
    fatal_errors = ()

    def __init__(self, model_dir: str) -> None:
        self.model_dir = model_dir
        self.version = 0
        self.fingerprint = model_fingerprint(model_dir)

    def ping(self, msg):
        return {
            "ok": True,
            "version": self.version,
            "model": self.model_dir,
            "model_fingerprint": self.fingerprint,
            "pid": 0,
            "max_model_len": 256,
        }

    def generate(self, msg):
        prompts, seeds, sampling = parse_generate(msg)
        rows = []
        for prompt, prompt_seeds in zip(prompts, seeds):
            row = []
            for seed in prompt_seeds:
                tokens = [(t + (seed or 0)) % 1000 for t in prompt][: sampling.max_tokens]
                row.append((tokens, [-(t + 1) / 8 for t in range(len(tokens))], "length"))
            rows.append(row)
        return {"ok": True, "version": self.version, "completions": rows}

    def load(self, msg):
        self.version = msg["version"]
        return {"ok": True, "version": self.version}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    add_serving_args(parser)
    args = parser.parse_args()
    serve(lambda: StubWorker(args.model), **serving_kwargs(args))
