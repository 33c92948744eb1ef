"""The `placement.launcher` key and the `ray` section: defaults, ranges, errors naming the key (no Ray)."""

import pytest

from rl_engine.config import ConfigError, load_config
from rl_engine.train_config import RLConfig


def test_defaults_keep_the_local_launcher():
    cfg = load_config(RLConfig)
    assert cfg.placement.launcher == "local"
    assert cfg.ray.address is None and cfg.ray.trainer_resources == {"CPU": 1.0} and cfg.ray.max_worker_restarts == 0


def test_worker_restarts_with_ray_and_rollout_workers():
    cfg = load_config(RLConfig, None, ["placement.mode=disaggregated", "placement.launcher=ray",
                                       "ray.max_worker_restarts=3"])
    assert cfg.ray.max_worker_restarts == 3
    with pytest.raises(ConfigError, match="got ray, colocated"):
        load_config(RLConfig, None, ["placement.mode=colocated", "placement.launcher=ray", "ray.max_worker_restarts=1"])


def test_ray_section_values():
    cfg = load_config(RLConfig, None, ["placement.mode=disaggregated", "placement.launcher=ray", "ray.address=auto",
                                       "ray.rollout_resources={CPU: 2, GPU: 1, gpu_node: 0.5}", "ray.strategy=SPREAD",
                                       "ray.runtime_env={working_dir: .}", "ray.namespace=team"])
    assert cfg.ray.rollout_resources == {"CPU": 2.0, "GPU": 1.0, "gpu_node": 0.5}
    assert (cfg.ray.address, cfg.ray.strategy, cfg.ray.runtime_env, cfg.ray.namespace) == ("auto", "SPREAD",
                                                                                          {"working_dir": "."}, "team")
    assert load_config(RLConfig, None, ["ray.address=10.0.0.1:6379"]).ray.address == "10.0.0.1:6379"


@pytest.mark.parametrize("override, message", [
    ("placement.launcher=ray", "placement.launcher=ray places actor processes"),
    ("placement.launcher=slurm", "placement.launcher"),
    ("ray.address=head", "ray.address='head' must be null"),
    ("ray.address=head:99999", "ray.address='head:99999' must be null"),
    ("ray.trainer_resources={CPU: -1}", "ray.trainer_resources.CPU=-1.0 must be finite and >= 0"),
    ("ray.coordinator_resources={CPU: 0}", "ray.coordinator_resources={'CPU': 0.0} asks for nothing"),
    ("ray.rollout_resources={CPU: .nan}", "ray.rollout_resources.CPU=nan"),
    ("ray.max_worker_restarts=-1", "ray.max_worker_restarts=-1 must be in [0, 1000]"),
    ("ray.max_worker_restarts=2", "ray.max_worker_restarts=2 restarts rollout worker processes: it needs "
                                  "placement.launcher=ray and placement.mode=disaggregated (got local, single_process)"),
    ("ray.strategy=ANYWHERE", "ray.strategy"),
    ("ray.namespace=' '", "ray.namespace"),
    ("ray.adress=auto", "unknown config key 'ray.adress'"),
])
def test_ray_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(RLConfig, None, [override])
    assert message in str(e.value)
