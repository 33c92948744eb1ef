"""`ops.paged_decode_step`, the engine's per-layer call of the C++ decode attention on tables made once per step
(`ops.decode_tables`): the checked wrapper's result on the same inputs, and the wrapper's handling (an adapted
input or its named error) of whatever the direct call does not take."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.test_cpu_ops import DECODE_CASES, DTYPES, decode_case, needs_cpu_kernels


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("context_lens", "block_size", "num_kv_heads", "group", "head_dim"), DECODE_CASES)
def test_step_equals_the_checked_wrapper_and_the_reference(assert_close, dtype, context_lens, block_size,
                                                           num_kv_heads, group, head_dim):
    from rl_engine.kernels.cpu import ops

    args, expected = decode_case(context_lens, block_size=block_size, num_kv_heads=num_kv_heads, group=group,
                                 head_dim=head_dim, dtype=dtype)
    q, k_cache, v_cache, tables, lens, scale = args
    # int64 tables (what a caller may hold) come back int32, as the kernel reads them
    step_tables, step_lens = ops.decode_tables(tables.long(), lens.long())
    assert step_tables.dtype == step_lens.dtype == torch.int32 and torch.equal(step_tables, tables.int())
    out = ops.paged_decode_step(q, k_cache, v_cache, step_tables, step_lens, scale, max(context_lens))
    assert torch.equal(out, ops.paged_decode_attention(*args))
    assert_close(out, expected, dtype)


def _small_case(dtype: torch.dtype = torch.float32):
    args, expected = decode_case([5, 17, 1], block_size=4, num_kv_heads=2, group=2, head_dim=16, dtype=dtype)
    return args, expected


@needs_cpu_kernels
def test_what_the_kernel_refuses_goes_through_the_wrapper(assert_close):
    from rl_engine.kernels.cpu import ops

    (q, k_cache, v_cache, tables, lens, scale), expected = _small_case()
    tables, lens = ops.decode_tables(tables, lens)
    # a q whose head dim is strided: the kernel refuses it, the wrapper copies it
    strided = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert strided.stride(-1) != 1
    assert_close(ops.paged_decode_step(strided, k_cache, v_cache, tables, lens, scale, 17), expected, torch.float32)
    # caches of another dtype than q: the wrapper's torch reference
    out = ops.paged_decode_step(q, k_cache.double(), v_cache.double(), tables, lens, scale, 17)
    assert out.dtype == torch.float32
    assert_close(out, expected, torch.float32)
    # a block outside the cache: the kernel's own error, through the wrapper
    bad = tables.clone()
    bad[1, 0] = k_cache.shape[0] + 5
    with pytest.raises(RuntimeError, match="outside the cache's"):
        ops.paged_decode_step(q, k_cache, v_cache, bad, lens, scale, 17)


@needs_cpu_kernels
def test_shapes_the_kernel_does_not_check_get_the_wrappers_named_error():
    from rl_engine.kernels.cpu import ops

    (q, k_cache, v_cache, tables, lens, scale), _ = _small_case()
    tables, lens = ops.decode_tables(tables, lens)
    with pytest.raises(ValueError, match="rows but block_tables has 3 requests"):
        ops.paged_decode_step(q[:2], k_cache, v_cache, tables, lens, scale, 17)
    with pytest.raises(ValueError, match="does not fit the cache"):
        ops.paged_decode_step(q[..., :8], k_cache, v_cache, tables, lens, scale, 17)
    with pytest.raises(ValueError, match="does not fit the cache"):
        ops.paged_decode_step(q[:, :3], k_cache, v_cache, tables, lens, scale, 17)
    with pytest.raises(ValueError, match="block_tables must be"):
        ops.decode_tables(tables, lens[:2])
