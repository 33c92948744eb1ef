"""Typed configs: nested `@dataclass(kw_only=True)` trees loaded from YAML plus dotted overrides.

`load_config(RLConfig, "run.yaml", ["optim.lr=1e-6", "rollout.n=8"])` builds the dataclass tree, with
values parsed as YAML scalars and checked against the field types. An unknown key is an error that
names it and the nearest valid key, by full dotted path; nothing is silently defaulted. Each config
class checks its value ranges where it is built (`check_int` / `check_float` name the dotted key and
the allowed range), so a bad value fails at load, before any work.

A user's mistake (a config value, a YAML file, a model directory, a dataset row) raises `InputError`
(`ConfigError` for the config itself) with a one-line message naming the key or the file; `rl-engine`
prints it and exits with code 2. YAML and JSON inputs refuse duplicate keys, and YAML refuses anchors,
aliases and merge keys (an alias "bomb" of a few hundred bytes expands to billions of nodes).

YAML scalars follow the YAML 1.2 core schema where PyYAML's YAML 1.1 rules surprise config users:
`1e-6` is a float (1.1 reads it as a string), only `true`/`false` are booleans (`on`, `off`, `yes`,
`no` stay strings, so they can be Literal values), `010` is ten (not octal 8) and `12:30` is a string
(not base-60 750).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

_BOOL_TAG, _INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"


MAX_YAML_DEPTH = 64  # nesting levels of a config file; deeper is refused (the composer recurses)


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core booleans and floats (see the module docstring) that refuses
    anchors, aliases and merge keys, duplicate keys and nesting deeper than MAX_YAML_DEPTH."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None, None, "YAML anchors and aliases (&name, *name) are not supported in configs; write the "
                "values out", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels",
                                                  event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise yaml.constructor.ConstructorError(
                        None, None, "YAML merge keys (<<) are not supported in configs", key_node.start_mark)
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first_line
                except TypeError:  # an unhashable key: SafeConstructor names it
                    continue
                if seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {first_line[key]})", key_node.start_mark)
                first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL_TAG, _INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                   |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)
_Loader.add_implicit_resolver(_INT_TAG, re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7_]+|0x[0-9a-fA-F_]+)$"),
                              list("-+0123456789"))


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node)).replace("_", "")
    prefixed = text.lstrip("+-")[:2].lower() in ("0x", "0o")
    return int(text, 0) if prefixed else int(text, 10)


_Loader.add_constructor(_INT_TAG, _construct_int)


def yaml_load(text: Any) -> Any:
    """Parse YAML text (or a stream) with the config rules above; raises yaml.YAMLError."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def yaml_error_line(e: yaml.YAMLError) -> str:
    """A YAML error on one line: `line L, column C: problem` (PyYAML's own text spans several lines)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = "; ".join(filter(None, (getattr(e, "context", None), getattr(e, "problem", None))))
    if mark is None or not problem:
        return " ".join(str(e).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


class InputError(ValueError):
    """A user's input cannot be used: a config value, a model directory, a dataset row, a checkpoint
    file. The message fits on one line and names the config key or the file (`file:line` for a row);
    the CLI prints it after `label` and exits with code 2. A ValueError, so callers of the Python API
    that catch ValueError keep working."""

    label = "error"


class ConfigError(InputError):
    """A config key or value is wrong; the message names the dotted key."""

    label = "config error"


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_json(text: str | bytes, where: str) -> Any:
    """`json.loads` that refuses duplicate keys; any failure is an InputError naming `where` (a file,
    or `file:line` for a JSON-lines row, where the column is the useful position)."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        at = f"column {e.colno}" if e.lineno == 1 else f"line {e.lineno}, column {e.colno}"
        raise InputError(f"{where}: invalid JSON ({e.msg} at {at})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: invalid UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except (ValueError, RecursionError) as e:  # a duplicate key, an integer past Python's digit limit, nesting
        raise InputError(f"{where}: invalid JSON ({e})") from None


def _bound(value: float, bound: float, *, lower: bool, open_: bool) -> bool:
    if lower:
        return value > bound if open_ else value >= bound
    return value < bound if open_ else value <= bound


def _range_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    def num(x: float) -> str:
        return str(x) if isinstance(x, int) else f"{x:g}"

    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{num(lo)}, {num(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {num(lo)}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {num(hi)}"
    return "finite"


def check_int(key: str, value: int, *, lo: int | None = None, hi: int | None = None, note: str = "") -> None:
    """ConfigError `key=value must be in [lo, hi]` (or `>= lo`), with `note` after a `;`."""
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{key}={value} must be {_range_text(lo, hi, False, False)}" + (f"; {note}" if note else ""))


def check_float(key: str, value: float, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                hi_open: bool = False, finite: bool = True, note: str = "") -> None:
    """ConfigError unless `value` lies in the range (finite unless `finite=False`; never NaN), e.g.
    `rollout.top_p=1.5 must be in (0, 1]` or `optim.lr=nan must be finite and > 0`."""
    ok = not math.isnan(value) and (not finite or math.isfinite(value))
    ok = ok and (lo is None or _bound(value, lo, lower=True, open_=lo_open))
    ok = ok and (hi is None or _bound(value, hi, lower=False, open_=hi_open))
    if not ok:
        rule = _range_text(lo, hi, lo_open, hi_open)
        if finite and (lo is None or hi is None):  # a range with both ends already says "finite"
            rule = "finite" + ("" if rule == "finite" else f" and {rule}")
        raise ConfigError(f"{key}={value} must be {rule}" + (f"; {note}" if note else ""))


_NON_FINITE = ("nan", "inf", "infinity")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _unknown(key: str, valid: list[str], prefix: str) -> ConfigError:
    near = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {prefix + near[0]!r}?" if near else f"; valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"unknown config key {prefix + key!r}{hint}")


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=path + ".")
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp, path)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        # Compare types too: True == 1, but `true` is not a valid value of Literal[0, 1].
        if not any(value == c and type(value) is type(c) for c in choices):
            raise ConfigError(f"{path}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:  # fixed-length tuple[int, str]
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}: {value!r}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, key_tp, f"{path}.<key>"): _coerce(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if tp is Any or tp is object:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and value.strip().lower().lstrip("+-") in _NON_FINITE:
        return float(value)  # `inf` / `nan` as users type them (YAML spells them .inf / .nan): ranges refuse them
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int and isinstance(value, bool):  # bool is an int subclass; a config int is not a bool
        raise ConfigError(f"{path}: expected int, got {value!r} (bool)")
    if isinstance(tp, type) and not isinstance(value, tp):
        hint = " (quote it to pass a string: key=\"'value'\")" if tp is str else ""
        raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r} ({type(value).__name__}){hint}")
    return value


def _coerce_union(value: Any, tp: Any, path: str) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    options = [a for a in args if a is not type(None)]
    # With one real option (Optional[X]) or a mapping for the one dataclass option, its own error
    # (an unknown nested key, say) is the useful one: do not hide it behind "does not match".
    dataclass_options = [a for a in options if dataclasses.is_dataclass(a)]
    if len(options) == 1:
        return _coerce(value, options[0], path)
    if isinstance(value, dict) and len(dataclass_options) == 1:
        return _coerce(value, dataclass_options[0], path)
    if type(value) in options:  # exact match first: 3 stays an int in `float | int`
        return value
    errors = []
    for option in options:
        try:
            return _coerce(value, option, path)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(f"{path}: {value!r} does not match {_type_name(tp)} ({'; '.join(errors)})")


def from_dict(cls: type[T], data: dict[str, Any], *, prefix: str = "") -> T:
    """Build `cls` from a nested dict, checking keys and types; `prefix` is the dotted path of
    `cls` inside the root config (for error messages)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected a mapping, got {data!r}")
    types_ = _field_types(cls)
    for key in data:
        if key not in types_:
            raise _unknown(str(key), list(types_), prefix)
    data = _with_section_defaults(cls, data)
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required config key {prefix + missing[0]!r}"
                          + (f" (also missing: {', '.join(prefix + m for m in missing[1:])})" if missing[1:] else ""))
    kwargs = {k: _coerce(v, types_[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:  # from check_int / check_float: it names its full key already
        raise
    except (TypeError, ValueError) as e:  # raised by the class's own validation (__post_init__)
        raise ConfigError(_with_key(" ".join(str(e).split()), cls, prefix)) from e


def _with_key(message: str, cls: type, prefix: str) -> str:
    """A class's own validation message with the dotted path in front of the key it starts with:
    `num_workers (-1) must be >= 0` from the `reward` section -> `reward.num_workers (-1) must be >= 0`;
    `importance_sampling.mode=...` from `loss.importance_sampling` -> `loss.importance_sampling.mode=...`.
    A message that starts with no key of the section gets the section's path as a prefix."""
    parts = prefix.rstrip(".").split(".") if prefix else []
    m = re.match(r"[A-Za-z_][A-Za-z0-9_.]*", message)
    token = m.group(0).rstrip(".") if m else ""
    head = token.split(".")[0]
    if head in {f.name for f in dataclasses.fields(cls)}:
        return prefix + message
    if parts and head == parts[-1]:
        return ".".join(parts[:-1] + [message]) if len(parts) > 1 else message
    return f"{prefix.rstrip('.') or cls.__name__}: {message}"


def _with_section_defaults(cls, data: dict[str, Any]) -> dict[str, Any]:
    """A partially given section starts from the parent's default for it, not the section class's
    own defaults: `reward.kwargs=...` must keep the `reward.name` that the parent's default_factory
    chose."""
    out = dict(data)
    for f in dataclasses.fields(cls):
        if f.name in out and isinstance(out[f.name], dict) and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if dataclasses.is_dataclass(default):
                merged = to_dict(default)
                _merge(merged, out[f.name])
                out[f.name] = merged
    return out


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain YAML/JSON data (dicts, lists, scalars) that `from_dict` accepts:
    only init fields, tuples as lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b.c=value` strings applied to a nested dict; value parsed as a YAML scalar/list."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.subkey=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if any(not p for p in parts):
            raise ConfigError(f"override {item!r}: empty key component in {key!r}")
        node = data
        for i, p in enumerate(parts[:-1]):
            if node.get(p) is None:  # absent, or an Optional section that is None so far
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])!r} is not a section")
        try:
            node[parts[-1]] = yaml_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {yaml_error_line(e)}") from None
    return data


def read_yaml_file(path: str) -> Any:
    """A YAML config file's data; ConfigError naming the file (and `file:line:column` for bad YAML)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except OSError as e:
        raise ConfigError(f"config file {path!r} cannot be read: {e.strerror or e}") from None
    try:
        return yaml_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML config: {yaml_error_line(e)}") from None


def load_config(cls: type[T], path: str | None = None, overrides: list[str] | None = None,
                base: T | None = None) -> T:
    """Defaults of `cls` (or `base`), then the YAML file, then the overrides."""
    data: dict[str, Any] = to_dict(base) if base is not None else {}
    if path:
        loaded = read_yaml_file(path)
        loaded = {} if loaded is None else loaded
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
        _merge(data, loaded)
    apply_overrides(data, overrides or [])
    return from_dict(cls, data)


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v
