"""rl_engine: RL post-training for LLMs with one sharded policy for training and inference."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # The inference API is imported lazily so that `import rl_engine` stays light.
    if name in ("LLM", "SamplingParams"):
        from rl_engine import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'rl_engine' has no attribute {name!r}")
