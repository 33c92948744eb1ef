"""EngineConfig validates where it is built: every bad value is refused with a message that names the field and
the value, and the defaults (and each flag's other setting) are accepted."""

from __future__ import annotations

import dataclasses

import pytest

from rl_engine.inference.config import EngineConfig

FLAGS = [f.name for f in dataclasses.fields(EngineConfig) if f.type == "bool"]


def test_every_flag_is_checked():
    # the engine's bool fields as the dataclass declares them: a new flag joins the check (and this list) or fails here
    assert FLAGS == ["enable_prefix_caching", "enforce_eager", "compile_decode", "record_routing",
                     "cpu_prepack_weights", "cpu_huge_pages", "cpu_decode_kernel", "fork_copy_partial_block",
                     "cpu_step_arena"]


@pytest.mark.parametrize("name", FLAGS)
@pytest.mark.parametrize("value", [1, 0, "false", None])
def test_flag_not_a_bool(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be true or false, got {value!r}$"):
        EngineConfig(**{name: value})


@pytest.mark.parametrize("name", FLAGS)
def test_flag_either_setting(name):
    default = getattr(EngineConfig(), name)
    assert getattr(EngineConfig(**{name: not default}), name) is (not default)


@pytest.mark.parametrize("name", ["block_size", "kv_cache_memory", "max_num_seqs", "max_num_batched_tokens",
                                  "max_model_len"])
@pytest.mark.parametrize("value", [0, -3, 2.0, "16", True])
def test_positive_integers(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be a positive integer, got {value!r}$"):
        EngineConfig(**{name: value})


@pytest.mark.parametrize("value", [1, 0, 4.0])
def test_num_kv_blocks(value):
    with pytest.raises(ValueError, match=rf"num_kv_blocks must be an integer >= 2 .*got {value!r}$"):
        EngineConfig(num_kv_blocks=value)
    assert EngineConfig(num_kv_blocks=2).num_kv_blocks == 2


@pytest.mark.parametrize("value", ["Auto", "", None, 2])
def test_cpu_threads(value):
    with pytest.raises(ValueError, match=rf"cpu_threads must be 'auto' or 'fixed', got {value!r}$"):
        EngineConfig(cpu_threads=value)


@pytest.mark.parametrize("value", [8, [], "1,2", [1, 0], [2, 4.0]])
def test_graph_batch_sizes(value):
    with pytest.raises(ValueError, match=r"graph_batch_sizes"):
        EngineConfig(graph_batch_sizes=value)
    assert EngineConfig(graph_batch_sizes=[1, 3]).graph_batch_sizes == [1, 3]
