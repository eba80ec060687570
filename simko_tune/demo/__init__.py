"""The CPU demo: the embedded default task and the tiny policy it trains, with no downloads.

``countdown`` is a synthetic arithmetic task with an exact, eval-free verifier; ``tiny``
builds small Qwen2/Llama 3 Hugging Face directories and tokenizers here; ``warm_start``
fits a tiny Qwen2 to Countdown so RL has a nonzero reward to start from. The ``tiny_cpu``
config and the tests run on these because the development machine can download no weights.

None of it is the trainer: the recipe only reaches it through config ``_component_`` paths,
so it lives apart and ``simko_tune/`` reads as the trainer.
"""
