"""Config loader: nested dataclasses from YAML + dotted overrides, and every error a user can make
(unknown keys with the nearest one, wrong types by path, Literal, Optional, lists, required fields)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import pytest
import yaml

from rl_engine.config import ConfigError, apply_overrides, from_dict, load_config, to_dict, yaml_load


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0


@dataclass(kw_only=True)
class ModelConfig:
    path: str  # required
    dtype: Literal["float32", "bfloat16"] = "float32"
    seed: Optional[int] = None


@dataclass(kw_only=True)
class RolloutConfig:
    n: int = 4
    stop: list[str] = field(default_factory=list)
    temperatures: list[float] = field(default_factory=lambda: [1.0])
    mode: Literal["sync", "async"] = "sync"
    switch: Literal["on", "off"] = "off"
    extra: dict[str, int] = field(default_factory=dict)


@dataclass(kw_only=True)
class RunConfig:
    name: str = "run"
    steps: int = 10
    deterministic: bool = False
    model: ModelConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reference: Optional[ModelConfig] = None
    scale: float | int = 1
    hook: Any = None
    num_params: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        self.num_params = 7


def _load(overrides: list[str], yaml_text: str | None = None, tmp_path=None) -> RunConfig:
    path = None
    if yaml_text is not None:
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml_text)
    return load_config(RunConfig, str(path) if path else None, ["model.path=/m", *overrides])


def test_yaml_file_and_overrides_build_the_nested_tree(tmp_path):
    cfg = _load(["optim.lr=1e-6", "rollout.stop=[a, b]", "rollout.n=8", "deterministic=true"],
                "name: exp\noptim:\n  weight_decay: 0.1\n  lr: 3.0e-4\nrollout:\n  n: 2\n", tmp_path)
    assert isinstance(cfg.optim, OptimConfig) and isinstance(cfg.rollout, RolloutConfig)
    assert cfg.name == "exp" and cfg.model.path == "/m"
    assert cfg.optim.lr == 1e-6 and cfg.optim.weight_decay == 0.1  # override wins; file keeps others
    assert cfg.optim.betas == (0.9, 0.95) and isinstance(cfg.optim.betas, tuple)
    assert cfg.rollout.n == 8 and cfg.rollout.stop == ["a", "b"] and cfg.deterministic is True
    assert cfg.num_params == 7  # init=False field computed by the class


@pytest.mark.parametrize("raw, expected", [
    ("1e-6", 1e-6), ("3.0E+2", 300.0), ("5", 5.0), ("-.5", -0.5), ("1_000", 1000.0), (".inf", float("inf")),
])
def test_float_overrides_parse_as_yaml_scalars(raw, expected):
    cfg = _load([f"optim.lr={raw}"])
    assert cfg.optim.lr == expected and type(cfg.optim.lr) is float


def test_yaml_12_scalars():
    assert yaml_load("1e-6") == 1e-6
    assert yaml_load("010") == 10 and yaml_load("0x10") == 16 and yaml_load("0o10") == 8
    assert yaml_load("on") == "on" and yaml_load("no") == "no" and yaml_load("True") is True
    assert yaml_load("12:30") == "12:30"
    assert yaml.safe_load("010") == 8  # PyYAML's own loader is left alone


def test_literal_values():
    assert _load(["rollout.mode=async"]).rollout.mode == "async"
    assert _load(["rollout.switch=on"]).rollout.switch == "on"  # YAML 1.1 would make this True
    with pytest.raises(ConfigError, match=r"rollout\.mode: 'asnyc' is not one of \['sync', 'async'\]"):
        _load(["rollout.mode=asnyc"])
    with pytest.raises(ConfigError, match="model.dtype"):
        _load(["model.dtype=fp16"])


def test_unknown_keys_name_the_nearest_valid_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optm'; did you mean 'optim'\?"):
        _load(["optm.lr=1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'; did you mean 'optim.lr'\?"):
        _load(["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"'rollout.temperature'; did you mean 'rollout.temperatures'"):
        _load([], "rollout:\n  temperature: [1.0]\n", tmp_path)
    # Inside an Optional section the nested error is kept (not hidden behind "does not match").
    with pytest.raises(ConfigError, match=r"unknown config key 'reference.pth'; did you mean 'reference.path'"):
        _load(["reference.pth=/r"])
    with pytest.raises(ConfigError, match="valid keys: "):  # nothing close: list them
        _load(["zzzzzz=1"])


def test_wrong_types_name_the_path():
    cases = {
        "steps=ten": r"steps: expected int, got 'ten' \(str\)",
        "steps=true": r"steps: expected int, got True \(bool\)",
        "steps=1.5": r"steps: expected int, got 1.5",
        "deterministic=1": r"deterministic: expected true/false, got 1",
        "optim.lr=fast": r"optim.lr: expected float, got 'fast'",
        "optim.betas=[0.9, x]": r"optim.betas\[1\]: expected float, got 'x'",
        "optim.betas=[0.9]": r"optim.betas: expected 2 items, got 1",
        "rollout.stop=a": r"rollout.stop: expected a list, got 'a'",
        "rollout.stop=[a, 3]": r"rollout.stop\[1\]: expected str, got 3",
        "rollout.extra={a: x}": r"rollout.extra.a: expected int, got 'x'",
        "optim=3": r"optim: expected a mapping for OptimConfig, got 3",
        "name=2024": r"name: expected str, got 2024 \(int\) \(quote it",
        "model.seed=x": r"model.seed: expected int, got 'x'",
        "scale=abc": r"scale: 'abc' does not match float \| int",
    }
    for override, pattern in cases.items():
        with pytest.raises(ConfigError, match=pattern):
            _load([override])


def test_optional_fields():
    cfg = _load([])
    assert cfg.reference is None and cfg.model.seed is None
    cfg = _load(["reference.path=/ref", "reference.seed=3", "model.seed=null"])
    assert cfg.reference == ModelConfig(path="/ref", seed=3) and cfg.model.seed is None
    assert _load(["reference=null"]).reference is None


def test_union_keeps_the_exact_type():
    assert type(_load(["scale=3"]).scale) is int
    assert _load(["scale=2.5"]).scale == 2.5
    assert _load(["hook={a: [1, 2]}"]).hook == {"a": [1, 2]}  # Any passes through


def test_required_field_missing(tmp_path):
    with pytest.raises(ConfigError, match=r"missing required config key 'model'"):
        load_config(RunConfig, None, [])
    with pytest.raises(ConfigError, match=r"missing required config key 'model.path'"):
        load_config(RunConfig, None, ["model.dtype=bfloat16"])
    with pytest.raises(ConfigError, match=r"missing required config key 'reference.path'"):
        _load(["reference.seed=1"])


def test_class_validation_errors_name_the_section():
    with pytest.raises(ConfigError, match="steps must be >= 0"):
        _load(["steps=-1"])


def test_base_and_round_trip():
    base = _load(["optim.lr=0.5", "reference.path=/r"])
    data = to_dict(base)
    assert "num_params" not in data and data["optim"]["betas"] == [0.9, 0.95]
    assert yaml.safe_load(yaml.safe_dump(data)) == data  # plain YAML-able data
    assert from_dict(RunConfig, data) == base
    again = load_config(RunConfig, None, ["steps=3"], base=base)
    assert again.optim.lr == 0.5 and again.steps == 3 and again.reference.path == "/r"
    # An Optional section that is None in the base can be filled by overrides.
    filled = load_config(RunConfig, None, ["reference.path=/x"], base=_load([]))
    assert filled.reference == ModelConfig(path="/x")


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="must look like key.subkey=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match="empty key component"):
        apply_overrides({}, ["optim..lr=1"])
    with pytest.raises(ConfigError, match="'steps' is not a section"):
        apply_overrides({"steps": 3}, ["steps.x=1"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        apply_overrides({}, ["a=[1, 2"])
    assert apply_overrides({}, ["a.b=", "a.c=x=y"]) == {"a": {"b": "", "c": "x=y"}}


def test_yaml_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(RunConfig, str(path))


def test_partial_section_keeps_the_parents_default_for_it():
    from rl_engine.train_config import RLConfig

    cfg = load_config(RLConfig, None, ["reward.timeout_s=3"])
    default = RLConfig()
    assert cfg.reward.timeout_s == 3.0
    assert cfg.reward.name == default.reward.name == "exact_match"
    assert cfg.reward.kwargs == default.reward.kwargs
