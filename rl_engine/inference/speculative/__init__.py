"""Speculative decoding: cheap drafts verified k at a time by one forward of the target.

`config` validates the vLLM-style `speculative_config`; `ngram` (prompt lookup) and `draft_model` (a
smaller CausalLM with its own paged KV) propose drafts; `speculator` verifies them inside the engine's
continuous batching (rows with and without drafts in one flat batch), rolls back rejected KV and keeps
the metrics; `rejection` is the exact rejection-sampling math. Main design choice: drafts are appended
to the sequences' own token lists for the span of one step, so the scheduler and model runner treat a
verify chunk as ordinary uncomputed tokens.
"""

from rl_engine.inference.speculative.config import SpeculativeConfig
from rl_engine.inference.speculative.speculator import Speculator, SpecStats

__all__ = ["SpecStats", "SpeculativeConfig", "Speculator"]
