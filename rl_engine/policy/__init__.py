"""The policy model: config, parallel layers, decoder families, log-probs, checkpoints."""

from rl_engine.policy.checkpoint import from_pretrained, load_hf_weights, save_pretrained
from rl_engine.policy.config import ModelConfig
from rl_engine.policy.model import CausalLM
from rl_engine.policy.moe import RoutingRecord
from rl_engine.policy.parallel import ParallelGroups

__all__ = ["CausalLM", "ModelConfig", "ParallelGroups", "RoutingRecord", "from_pretrained",
           "load_hf_weights", "save_pretrained"]
