"""The policy model: config, parallel layers, decoder families, log-probs, checkpoints, and its
parallel training (groups, pipeline schedules, expert dispatch, distributed optimizer, sharded
checkpoints; the entry point is `ParallelTrainer`)."""

from rl_engine.policy.checkpoint import from_pretrained, load_hf_weights, save_pretrained
from rl_engine.policy.config import ModelConfig
from rl_engine.policy.model import CausalLM
from rl_engine.policy.moe import RoutingRecord
from rl_engine.policy.optimizer import OptimizerConfig
from rl_engine.policy.parallel import ParallelGroups
from rl_engine.policy.parallel_trainer import ParallelTrainer
from rl_engine.policy.pipeline import MicroBatch

__all__ = ["CausalLM", "MicroBatch", "ModelConfig", "OptimizerConfig", "ParallelGroups", "ParallelTrainer",
           "RoutingRecord", "from_pretrained", "load_hf_weights", "save_pretrained"]
