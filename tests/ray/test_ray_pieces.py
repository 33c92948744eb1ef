"""Pure pieces of the Ray launcher, without a cluster: actor options from a bundle, per-process configs; and
how tests/ray counts the processes its Ray instances leave behind."""

import os
import shutil
import subprocess

import yaml
from ray_scenarios import ray_pids_of, ray_temp_dir

from rl_engine.launch.ray_cluster import _actor_config, _actor_options


def test_actor_options_take_the_whole_bundle():
    assert _actor_options({"CPU": 2.0, "GPU": 1.0, "trainer_node": 0.125}) == {
        "num_cpus": 2.0, "num_gpus": 1.0, "resources": {"trainer_node": 0.125}}
    assert _actor_options({"CPU": 0.5}) == {"num_cpus": 0.5, "num_gpus": 0}


def test_a_process_gets_its_own_config_only_where_placement_differs(tmp_path):
    base = tmp_path / "config.yaml"
    run_config = {"placement": {"host": "127.0.0.1", "weight_transport": "auto"}, "train": {"tp": 1}}
    base.write_text(yaml.safe_dump(run_config))
    assert _actor_config(str(base), "trainer-0", {"host": "127.0.0.1"}) == str(base)
    path = _actor_config(str(base), "rollout-1", {"host": "10.0.0.7", "weight_transport": "zmq"})
    assert path == str(tmp_path / "config.rollout-1.yaml")
    assert yaml.safe_load(open(path)) == {"placement": {"host": "10.0.0.7", "weight_transport": "zmq"},
                                          "train": {"tp": 1}}


def test_leftover_processes_are_counted_by_our_instance_only(tmp_path):
    """tests/ray counts what is left of its Ray instances by their temp dirs, so two suites with Ray tests
    at once do not fail each other: a process named like a raylet that holds a log of another instance's
    dir is not ours; one holding a file under our dir is, whatever its name (Ray renames workers ray::...).
    Counting every Ray-looking process on the machine, as before, counted the other suite's raylet."""
    ours, theirs = ray_temp_dir(), ray_temp_dir()
    raylet = tmp_path / "raylet"
    raylet.symlink_to(shutil.which("sleep"))
    with open(os.path.join(ours, "worker.out"), "w") as mine, open(os.path.join(theirs, "raylet.out"), "w") as other:
        procs = [subprocess.Popen(["sleep", "60"], stdout=mine), subprocess.Popen([str(raylet), "60"], stdout=other)]
    try:
        assert ray_pids_of(ours) == {procs[0].pid} and ray_pids_of(theirs) == {procs[1].pid}
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for d in (ours, theirs):
            shutil.rmtree(d)
    assert ray_pids_of(ours) == set()
