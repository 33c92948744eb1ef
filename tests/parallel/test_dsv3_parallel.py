"""DeepSeek-V3 (MLA, sigmoid group-limited routing, shared experts, aux-loss-free bias) under
tp2, ep2, pp2 (two gloo processes) and tp2 x ep2 (four) against the single-process run over 3 AdamW
steps, routing record / replay under ep2, and the bias update driving e_score_correction_bias."""

import json
import os

import pytest
import torch

from parallel_helpers import DSV3, assert_matches_single, build_trainer, my_micro_batches, routing_replay, run_layout, \
    write_json, write_weights
from rl_engine.launch.gloo import spawn

WORLD2 = [
    {"name": "dsv3_tp2", "kind": "dsv3", "tp": 2},
    {"name": "dsv3_ep2", "kind": "dsv3", "ep": 2},
    {"name": "dsv3_pp2", "kind": "dsv3", "pp": 2},
]
WORLD4 = [{"name": "dsv3_tp2_ep2", "kind": "dsv3", "tp": 2, "ep": 2}]


def _replay_check(weights: str, out: str) -> None:
    """ep2: replayed routing reproduces the recorded log-probs; other experts change them."""
    trainer = build_trainer({"kind": "dsv3", "ep": 2}, weights)
    replay = routing_replay(trainer, my_micro_batches(trainer, "dsv3"), num_experts=DSV3.num_experts)
    write_json(os.path.join(out, f"dsv3_replay{trainer.groups.world_rank}.json"), replay)


def _worker2(rank, world, weights, out):
    for spec in WORLD2:
        run_layout(spec, weights, out)
    _replay_check(weights, out)


def _worker4(rank, world, weights, out):
    for spec in WORLD4:
        run_layout(spec, weights, out)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dsv3"))
    weights = write_weights(os.path.join(out, "weights"), "dsv3")
    run_layout({"name": "single_dsv3", "kind": "dsv3"}, weights, out)
    spawn(_worker2, 2, weights, out)
    spawn(_worker4, 4, weights, out)
    return out


@pytest.mark.parametrize("spec", WORLD2 + WORLD4, ids=[s["name"] for s in WORLD2 + WORLD4])
def test_dsv3_layout_matches_single_process(results, spec):
    print(assert_matches_single(results, spec["name"], "single_dsv3", kind="dsv3"))


def test_dsv3_routing_replay_under_expert_parallelism(results):
    for rank in range(2):
        with open(os.path.join(results, f"dsv3_replay{rank}.json")) as f:
            r = json.load(f)
        assert r["same"] == 0.0
        assert r["changed"] > 1e-3


def test_dsv3_bias_update_drives_e_score_correction_bias(results):
    """The aux-loss-free update moved the correction bias of every MoE layer, in sign steps of the
    rate (assert_matches_single holds every layout to the single run's bias to rounding)."""
    from rl_engine.policy.dist_checkpoint import read_full_tensors

    params = read_full_tensors(os.path.join(results, "single_dsv3"), "param")
    for layer in (1, 2):
        bias = params[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"]
        assert bias.abs().max().item() > 0
        steps = bias / 0.01  # 3 steps of +-rate or 0 each, starting from 0
        assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 3
