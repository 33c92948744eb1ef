"""The AVX2 path of the C++ paged decode attention (`csrc/cpu_ops.cpp`), on any CPU that has AVX2: the engine's
build takes the AVX-512 path where the CPU has AVX-512, so the AVX2 path is tested through a second build of the
same source with AVX-512 switched off (`cpu.isa_variant("avx2")`, ~35 s of compiler time once, then cached),
which must report that it compiled the AVX2 path. Cases and reference are test_cpu_ops.py's (GQA groups of 1-7,
head dims 12-128, contexts across block boundaries and ending in partial blocks, padding requests, shared blocks).

Tolerances: fp32 and bf16 as in test_cpu_ops.py. fp16 (the AVX2 path widens fp16 rows by F16C; the AVX-512 build
sends fp16 to the portable kernel): fp32 math rounded once to fp16, at most half an fp16 ulp (2^-11 relative,
4.9e-4) off the fp32 reference, plus fp32 summation order (~1e-6 absolute on outputs of magnitude <= 4):
rtol 1e-3, atol 1e-5.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from rl_engine.kernels import cpu
from tests.kernels.conftest import TOLERANCES as KERNEL_TOLERANCES
from tests.kernels.test_cpu_ops import AVAILABLE, DECODE_CASES, REASON, decode_case

TOLERANCES = {**KERNEL_TOLERANCES, torch.float16: {"atol": 1e-5, "rtol": 1e-3}}


@pytest.fixture(scope="module")
def avx2_build() -> ModuleType:
    if not AVAILABLE:
        pytest.skip(f"C++ CPU kernels unavailable: {REASON}")
    if not cpu.cpu_has_avx2():
        pytest.skip("this CPU lacks AVX2, FMA or F16C: the AVX2 path cannot run here")
    module = cpu.isa_variant("avx2")  # a build failure here is a failure, not a skip: the engine's build worked
    assert module.isa() == "avx2", f"the build with AVX-512 switched off compiled the {module.isa()} path"
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("context_lens", "block_size", "num_kv_heads", "group", "head_dim"), DECODE_CASES)
def test_avx2_paged_decode_matches_reference(avx2_build, dtype, context_lens, block_size, num_kv_heads, group,
                                             head_dim):
    args, expected = decode_case(context_lens, block_size=block_size, num_kv_heads=num_kv_heads, group=group,
                                 head_dim=head_dim, dtype=dtype)
    out = avx2_build.paged_decode_attention(*args, max(context_lens))
    assert out.dtype == dtype and out.shape == args[0].shape
    torch.testing.assert_close(out.float(), expected, **TOLERANCES[dtype])
    assert torch.all(out[args[4] == 0] == 0)  # padding requests


def test_avx2_build_checks_block_tables_like_the_engines(avx2_build):
    cache = torch.zeros(3, 16, 1, 32)
    tables = torch.tensor([[0, 7]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="outside the cache's 3 blocks"):
        avx2_build.paged_decode_attention(torch.zeros(1, 2, 32), cache, cache, tables,
                                          torch.tensor([20], dtype=torch.int32), 1.0, 20)


def test_unknown_isa_variant_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown ISA variant 'sse'; choose one of \['avx2', 'portable'\]"):
        cpu.isa_variant("sse")
