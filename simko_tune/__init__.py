"""simko-tune: SimKO and GRPO-family RL with verifiable rewards, as torchtune recipes."""

__version__ = "0.1.0"
