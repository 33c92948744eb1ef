"""Pure pieces of the Ray launcher, without a cluster: actor options from a bundle, per-process configs."""

import yaml

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
