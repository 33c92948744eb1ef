"""Rollout-side building blocks: prompt data, rewards, group advantages, sequence packing.

Import the submodules directly (`from rl_engine.rollout.rewards import ...`): this package imports
nothing itself, so reward worker processes start without importing torch.
"""
