"""Four gloo processes, spawned once: tp2 x pp2 and tp2 x ep2 (MoE) match the single-process run;
a checkpoint saved at tp2 x pp2 loads at tp1 x pp1 and tp1 x pp2 with the same logits; a run
resumed from a checkpoint continues with the losses of the uninterrupted run."""

import os

import pytest
import torch

from parallel_helpers import build_trainer, check_layout, layout_ids, loss_fn, micro_batches, my_micro_batches, \
    rank_results, run_layouts, run_parity, write_json

LAYOUTS = [
    {"name": "tp2_pp2", "kind": "dense", "tp": 2, "pp": 2},
    {"name": "tp2_ep2", "kind": "moe", "tp": 2, "ep": 2},
]


def _save_logits(trainer, out: str, name: str) -> None:
    logits = trainer.forward_logits(micro_batches("dense", num=2, seed=7))
    g = trainer.groups
    if logits and g.tp_rank == 0 and g.dp_rank == 0:
        torch.save(torch.cat(logits), os.path.join(out, f"logits_{name}.pt"))


def _worker(rank, world, weights, out):
    _save_logits(run_layouts(LAYOUTS, weights, out)["tp2_pp2"], out, "tp2_pp2")
    # Load the tp2 x pp2 checkpoint into other layouts (dp takes the remaining ranks).
    for spec in ({"name": "tp1_pp2", "kind": "dense", "pp": 2}, {"name": "tp1_pp1", "kind": "dense"}):
        trainer = build_trainer(spec, weights["dense"])
        trainer.load_checkpoint(os.path.join(out, "tp2_pp2"))
        _save_logits(trainer, out, spec["name"])
    # Resume: 2 steps, save, 1 step; then resume from the save, in the same and in another layout.
    spec = {"kind": "dense", "tp": 2, "pp": 2}
    trainer = build_trainer(spec, weights["dense"])
    mbs = my_micro_batches(trainer, "dense")
    losses = [trainer.train_step(mbs, loss_fn)["loss"] for _ in range(2)]
    trainer.save_checkpoint(os.path.join(out, "resume"), extra={"data_cursor": 2})
    rng_after_save = torch.rand(1).item()
    losses.append(trainer.train_step(mbs, loss_fn)["loss"])
    result = {"uninterrupted": losses}
    for name, other in (("same_layout", spec), ("tp1_pp2", {"kind": "dense", "pp": 2})):
        resumed = build_trainer(other, weights["dense"])
        meta = resumed.load_checkpoint(os.path.join(out, "resume"))
        rng_ok = torch.rand(1).item() == rng_after_save
        loss = resumed.train_step(my_micro_batches(resumed, "dense"), loss_fn)["loss"]
        result[name] = {"loss": loss, "step": meta["step"], "extra": meta["extra"], "rng_ok": rng_ok}
    write_json(os.path.join(out, f"resume{rank}.json"), result)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_parity(tmp_path_factory.mktemp("world4"), _worker, world=4)


@pytest.mark.parametrize("spec", LAYOUTS, ids=layout_ids(LAYOUTS))
def test_layout_matches_single_process(results, spec):
    print(check_layout(results, spec))


def test_checkpoint_reshards_to_other_layouts(results):
    saved = torch.load(os.path.join(results, "logits_tp2_pp2.pt"))
    for name in ("tp1_pp2", "tp1_pp1"):
        loaded = torch.load(os.path.join(results, f"logits_{name}.pt"))
        diff = (loaded - saved).abs().max().item()
        print(f"logits tp2_pp2 -> {name}: max diff {diff:.2e}")
        assert loaded.shape == saved.shape and diff <= 1e-5


def test_resumed_run_continues_the_uninterrupted_losses(results):
    for r in rank_results(results, "resume", world=4):
        third = r["uninterrupted"][2]
        assert r["same_layout"]["loss"] == pytest.approx(third, abs=1e-6)
        assert r["tp1_pp2"]["loss"] == pytest.approx(third, abs=1e-5)
        for name in ("same_layout", "tp1_pp2"):
            assert r[name]["step"] == 2 and r[name]["extra"] == {"data_cursor": 2}
        assert r["same_layout"]["rng_ok"]  # same world size: each rank's RNG state restored
