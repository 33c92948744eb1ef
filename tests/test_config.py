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


# ---- refused YAML, JSON and value ranges ------------------------------------------------------------
ALIAS_BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


def test_yaml_duplicate_keys_are_refused_with_key_and_line():
    with pytest.raises(yaml.YAMLError) as info:
        yaml_load("optim:\n  lr: 1\n  eps: 2\n  lr: 3\n")
    assert "duplicate key 'lr' (first at line 2)" in str(info.value) and info.value.problem_mark.line == 3
    with pytest.raises(yaml.YAMLError, match="duplicate key 'a'"):
        yaml_load("{a: 1, b: 2, a: 3}")
    assert yaml_load("a: {x: 1}\nb: {x: 2}\n") == {"a": {"x": 1}, "b": {"x": 2}}  # same key, other mappings
    with pytest.raises(ConfigError, match=r"not valid YAML: line 1, column 8: duplicate key 'b'"):
        apply_overrides({}, ["a={b: 1, b: 2}"])


@pytest.mark.parametrize("text", ["a: &x 1\nb: *x\n", "a: &x [1]\n", "a: {<<: {b: 1}, c: 2}\n"])
def test_yaml_anchors_aliases_and_merge_keys_are_refused(text):
    with pytest.raises(yaml.YAMLError, match="anchors and aliases|merge keys"):
        yaml_load(text)


def test_yaml_alias_bomb_is_refused_at_its_first_anchor(tmp_path):
    assert len(ALIAS_BOMB) < 600  # 9**9 "lol"s once expanded
    with pytest.raises(yaml.YAMLError) as info:
        yaml_load(ALIAS_BOMB)
    assert info.value.problem_mark.line == 0  # stopped at the first anchor, before composing anything else
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    with pytest.raises(ConfigError, match=r"bomb.yaml: invalid YAML config: line 1, column 4: YAML anchors"):
        load_config(RunConfig, str(path), ["model.path=/m"])


def test_yaml_nesting_is_bounded():
    expected: list = []
    for _ in range(59):
        expected = [expected]
    assert yaml_load("a: " + "[" * 60 + "]" * 60) == {"a": expected}  # 61 levels with the mapping
    with pytest.raises(yaml.YAMLError, match="nested deeper than 64 levels"):
        yaml_load("a: " + "[" * 5000 + "]" * 5000)


def test_yaml_file_errors_are_one_line_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope.yaml' does not exist"):
        load_config(RunConfig, str(tmp_path / "nope.yaml"))
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  path: /m\n dtype: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(RunConfig, str(path))
    assert str(info.value).startswith(f"{path}: invalid YAML config: line 3, column 2: ") and "\n" not in str(info.value)


def test_parse_json_refuses_duplicates_and_names_the_place():
    from rl_engine.config import InputError, parse_json

    assert parse_json('{"a": {"b": 1}, "c": [1, {"b": 2}]}', "x") == {"a": {"b": 1}, "c": [1, {"b": 2}]}
    with pytest.raises(InputError, match=r"^f.json: invalid JSON \(duplicate key 'b'\)$"):
        parse_json('{"a": {"b": 1, "b": 2}}', "f.json")
    with pytest.raises(InputError, match=r"^d.jsonl:4: invalid JSON \(Expecting value at column 7\)$"):
        parse_json('{"a": }', "d.jsonl:4")
    with pytest.raises(InputError, match=r"f.json: invalid JSON \(.* at line 2, column 1\)"):
        parse_json('{"a": 1,\n}', "f.json")
    with pytest.raises(InputError, match=r"f.json: invalid UTF-8 \(byte 0xff at offset 7\)"):
        parse_json(b'{"a": "\xff"}', "f.json")
    with pytest.raises(InputError, match="f.json: invalid JSON"):
        parse_json("[" * 100_000 + "]" * 100_000, "f.json")


def test_range_checks_name_key_value_and_range():
    from rl_engine.config import check_float, check_int

    cases = [
        (lambda: check_float("a.p", 1.5, lo=0, lo_open=True, hi=1), "a.p=1.5 must be in (0, 1]"),
        (lambda: check_float("a.p", float("nan"), lo=0, hi=1), "a.p=nan must be in [0, 1]"),
        (lambda: check_float("a.lr", float("inf"), lo=0, lo_open=True), "a.lr=inf must be finite and > 0"),
        (lambda: check_float("a.x", float("-inf")), "a.x=-inf must be finite"),
        (lambda: check_float("a.b", 1.0, lo=0, hi=1, hi_open=True, note="why"), "a.b=1.0 must be in [0, 1); why"),
        (lambda: check_int("a.n", 0, lo=1), "a.n=0 must be >= 1"),
        (lambda: check_int("a.n", 9, lo=1, hi=8), "a.n=9 must be in [1, 8]"),
    ]
    for call, message in cases:
        with pytest.raises(ConfigError) as info:
            call()
        assert str(info.value) == message
    check_float("a.clip", float("inf"), lo=0, lo_open=True, finite=False)  # a cap may be .inf
    check_int("a.n", 8, lo=1, hi=8)


def test_non_finite_words_are_floats_for_float_fields():
    assert _load(["optim.lr=inf"]).optim.lr == float("inf")
    assert _load(["optim.lr=-Infinity"]).optim.lr == float("-inf")
    with pytest.raises(ConfigError, match="name: expected str"):  # only float fields read them
        _load(["name=1.5"])
    assert _load(["name=nan"]).name == "nan"


def test_class_messages_get_the_full_key():
    from rl_engine.train_config import RLConfig

    with pytest.raises(ConfigError, match=r"^reward\.num_workers \(-1\) must be >= 0"):
        load_config(RLConfig, None, ["reward.num_workers=-1"])
    with pytest.raises(ConfigError, match=r"^loss\.importance_sampling\.mode='x' is not valid"):
        load_config(RLConfig, None, ["loss.importance_sampling.mode=x"])
    with pytest.raises(ConfigError, match=r"^rollout\.top_p=1\.5 must be in \(0, 1\]$"):
        load_config(RLConfig, None, ["rollout.top_p=1.5"])


@pytest.mark.parametrize("override", [
    "rollout.top_p=1", "rollout.top_k=-1", "rollout.top_k=50", "rollout.n=4096", "rollout.temperature=100",
    "optim.betas=[0, 0.999]", "optim.grad_clip=.inf", "optim.weight_decay=0", "train.threads=0", "warmup.steps=0",
    "warmup.path=null", "loss.clip_high=.inf", "train.seed=0",
])
def test_edge_values_in_range_are_accepted(override):
    from rl_engine.train_config import RLConfig

    load_config(RLConfig, None, [override])
