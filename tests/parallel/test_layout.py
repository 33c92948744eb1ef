"""Layouts without processes: rank order, validation errors, stage split, schedules."""

import pytest

from parallel_helpers import DENSE, MOE
from rl_engine.policy.parallel import all_group_ranks, check_layout, check_model_layout, rank_coords
from rl_engine.policy.pipeline import make_schedule, schedule_1f1b, simulate, split_layers


def test_megatron_rank_order_tp_fastest():
    groups = all_group_ranks(tp=2, pp=2, ep=2, dp=2)
    assert groups["tp"] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert groups["dp"] == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert groups["pp"] == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert groups["ep"] == [(0, 2), (1, 3), (4, 6), (5, 7)]  # ep carved out of dp
    assert sorted(groups["edp"]) == [(r,) for r in range(8)]  # edp = dp / ep = 1
    assert groups["embedding"] == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert rank_coords(5, tp=2, pp=2, ep=2, dp=2) == {"tp": 1, "cp": 0, "dp": 0, "pp": 1, "ep": 0, "edp": 0}
    # Every kind of group partitions the world.
    for kind in ("tp", "dp", "pp", "ep", "edp"):
        assert sorted(r for g in groups[kind] for r in g) == list(range(8))
    wide = all_group_ranks(tp=1, pp=1, ep=2, dp=4)
    assert wide["ep"] == [(0, 1), (2, 3)] and wide["edp"] == [(0, 2), (1, 3)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(tp=2, pp=2, ep=1, dp=2, world_size=4), r"tp \(2\) x pp \(2\) x dp \(2\) = 8 is not the world size \(4\)"),
    (dict(tp=3, pp=1, ep=1, dp=None, world_size=4), r"world size \(4\) is not divisible by tp \(3\) x pp \(1\)"),
    (dict(tp=1, pp=1, ep=3, dp=4, world_size=4), r"ep \(3\) must divide dp \(4\)"),
    (dict(tp=0, pp=1, ep=1, dp=1, world_size=1), r"tp must be a positive integer, got 0"),
])
def test_bad_world_layouts_name_the_numbers(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_layout(**kwargs)


@pytest.mark.parametrize("config, kwargs, message", [
    (DENSE, dict(tp=3), r"num_attention_heads \(4\) must be divisible by tp \(3\)"),
    (DENSE, dict(pp=5), r"pp \(5\) x virtual stages \(1\) = 5 exceeds the number of layers \(4\)"),
    (DENSE, dict(pp=2, virtual_stages=3), r"= 6 exceeds the number of layers \(4\)"),
    (MOE, dict(ep=3), r"num_experts \(4\) must be divisible by ep \(3\)"),
    (DENSE, dict(ep=2), r"ep \(2\) > 1 needs a mixture-of-experts model"),
    (MOE.replace(moe_intermediate_size=18), dict(tp=4), r"moe_intermediate_size \(18\) must be divisible by tp \(4\)"),
])
def test_bad_model_layouts_name_the_numbers(config, kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_model_layout(config, **kwargs)


def test_kv_heads_fewer_than_tp_are_accepted_when_they_divide_it():
    check_model_layout(DENSE, tp=4)  # 1 KV head replicated on 4 ranks
    with pytest.raises(ValueError, match=r"num_key_value_heads \(3\)"):
        check_model_layout(DENSE.replace(num_heads=12, num_kv_heads=3), tp=4)


def test_layer_split_even_or_given():
    assert split_layers(4, 2) == [(0, 2), (2, 4)]
    assert split_layers(7, 3) == [(0, 2), (2, 5), (5, 7)]
    assert split_layers(4, 2, [1, 3]) == [(0, 1), (1, 4)]
    with pytest.raises(ValueError, match=r"summing to the number of layers \(4\)"):
        split_layers(4, 2, [1, 2])


def test_schedules_cover_every_pass_and_never_deadlock():
    assert schedule_1f1b(2, 0, 3) == [("F", 0, 0), ("F", 0, 1), ("B", 0, 0), ("F", 0, 2), ("B", 0, 1), ("B", 0, 2)]
    for pp in (2, 3, 4):
        for virtual in (1, 2, 3):
            for micro in range(1, 10):
                if virtual > 1 and micro % pp:
                    continue
                per_rank = [make_schedule(pp, r, micro, virtual) for r in range(pp)]
                want = sorted((k, c, m) for k in "FB" for c in range(virtual) for m in range(micro))
                assert all(sorted(s) == want for s in per_rank)
                assert simulate(per_rank, pp), (pp, virtual, micro)
    # The simulator does catch a deadlock: a last stage that runs backward before forward.
    bad = [make_schedule(2, 0, 2), [("B", 0, 0), ("F", 0, 0), ("F", 0, 1), ("B", 0, 1)]]
    assert not simulate(bad, 2)
    with pytest.raises(ValueError, match=r"micro-batches \(3\) to be a multiple of pp \(2\)"):
        make_schedule(2, 0, 3, 2)
