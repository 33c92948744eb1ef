"""The reference policy in the trainer group (`policy.frozen.FrozenPolicy`, sharded like the trainer,
no optimizer state): with KL in the loss, tp2 and pp2 runs reproduce the single-process run step by
step, `train/kl_ref` included."""

import io

import pytest
from rl_actor_helpers import assert_same_run, child_pythonpath, rows, single_process_rows, toy_config

from rl_engine.actors.run import run_actors

KL = ["loss.kl_coef=0.1", "loss.kl_estimator=k3", "optim.lr=1e-2"]  # a larger lr: the KL moves within 3 steps


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return single_process_rows(tmp_path_factory.mktemp("single_kl"), *KL)


def _run(tmp_path, monkeypatch, *overrides):
    child_pythonpath(monkeypatch)
    run_actors(toy_config(tmp_path, *KL, *overrides), echo_stream=io.BytesIO())
    return rows(tmp_path)


def _check(got, reference):
    assert_same_run(got, reference)
    assert abs(reference[0]["train/kl_ref"]) <= 1e-7 and reference[-1]["train/kl_ref"] > 1e-5
    for a, b in zip(got, reference):
        assert abs(a["train/kl_ref"] - b["train/kl_ref"]) <= 1e-6 + 1e-4 * abs(b["train/kl_ref"]), (a, b)


@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_colocated_tp2_with_kl_matches_single_process(reference, tmp_path, monkeypatch, offload):
    """ref.offload=cpu: the FrozenPolicy's shards in host memory between steps score the same."""
    _check(_run(tmp_path, monkeypatch, "placement.mode=colocated", "train.tp=2", f"ref.offload={offload}"), reference)


def test_disaggregated_pp2_with_kl_matches_single_process(reference, tmp_path, monkeypatch):
    _check(_run(tmp_path, monkeypatch, "placement.mode=disaggregated", "train.pp=2"), reference)



@pytest.fixture(scope="module")
def kl_in_reward_reference(tmp_path_factory):
    return single_process_rows(tmp_path_factory.mktemp("single_kl_reward"), *KL, "loss.kl_in_reward=true")


@pytest.mark.parametrize("layout", [("placement.mode=colocated", "train.tp=2"),
                                    ("placement.mode=disaggregated", "train.dp=2")], ids=["colocated_tp2",
                                                                                          "disaggregated_dp2"])
def test_kl_in_reward_matches_single_process(kl_in_reward_reference, layout, tmp_path, monkeypatch):
    """loss.kl_in_reward with the actors: the trainer group gets each sample's reward and group in the
    TrainBatch, sums each sample's KL(proximal || ref) over the ranks holding its tokens (tp: one rank
    counts; dp: each rank its own samples) and recomputes the advantages as the single process does."""
    got = _run(tmp_path, monkeypatch, "loss.kl_in_reward=true", *layout)
    reference = kl_in_reward_reference
    assert_same_run(got, reference)
    assert reference[0]["train/kl_reward_penalty"] <= 1e-7 and reference[-1]["train/kl_reward_penalty"] > 1e-6
    for a, b in zip(got, reference):
        assert "train/kl_ref" not in a or abs(a["train/kl_ref"] - b["train/kl_ref"]) <= 1e-6 + 1e-4 * abs(b["train/kl_ref"])
        gap = abs(a["train/kl_reward_penalty"] - b["train/kl_reward_penalty"])
        assert gap <= 1e-7 + 1e-4 * b["train/kl_reward_penalty"], (a, b)
