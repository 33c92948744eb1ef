"""Kernel tests: Triton kernels run in the Triton interpreter on CPU tensors.

Triton fixes interpreter mode when a kernel is decorated, i.e. when `rl_engine.kernels.triton` is
first imported. So this conftest sets TRITON_INTERPRET=1 only around that import and a smoke launch,
then restores the environment: other test directories in the same pytest process never see the
variable, and on CPU nothing outside these tests runs Triton (the registry defaults to torch).
On a CUDA machine, `TRITON_INTERPRET=0 pytest tests/kernels` builds real kernels and the same tests
run on the GPU instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch

from rl_engine.kernels import registry


def _build_triton_kernels() -> tuple[bool, str, str]:
    """Import our Triton kernels (interpreted unless asked otherwise on CUDA) and launch one."""
    on_gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0"
    previous = os.environ.get("TRITON_INTERPRET")
    if not on_gpu:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import rl_engine.kernels.triton as triton_kernels
        from rl_engine.kernels.triton.swiglu import silu_and_mul

        device = "cpu" if triton_kernels.INTERPRETED else "cuda"
        if device == "cuda" and not torch.cuda.is_available():
            return False, device, "Triton kernels were built for a GPU and there is none"
        x = torch.linspace(-2, 2, 6, device=device).view(1, 6)
        expected = torch.nn.functional.silu(x[:, :3]) * x[:, 3:]
        if not torch.allclose(silu_and_mul(x), expected, atol=1e-6):
            return False, device, "the Triton interpreter ran but gave wrong results"
        return True, device, ""
    except Exception as exc:  # any failure means: skip the Triton tests, with the reason
        return False, "cpu", f"Triton kernels cannot run here: {type(exc).__name__}: {exc}"
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


TRITON_OK, TRITON_DEVICE, TRITON_SKIP_REASON = _build_triton_kernels()

# fp32: the contract bound. bf16: the Triton interpreter rounds fp32 -> bf16 by truncation (GPUs
# round to nearest even), so one bf16 ulp (2^-7 relative) of difference is expected, plus the
# reference's own intermediate bf16 roundings: 2e-2 covers two ulps.
TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


@pytest.fixture
def triton_device() -> str:
    """Device of the Triton kernel tests ("cpu" under the interpreter)."""
    if not TRITON_OK:
        pytest.skip(TRITON_SKIP_REASON)
    return TRITON_DEVICE


@pytest.fixture
def assert_close() -> Callable[..., None]:
    """assert_close(actual, expected, dtype): compares in fp32 with the tolerance of `dtype`."""

    def check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
        torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), **TOLERANCES[dtype])

    return check


@pytest.fixture(autouse=True)
def _fresh_registry() -> Iterator[None]:
    """Every test starts and ends with the default kernel config and an empty resolution cache."""
    registry.configure(registry.KernelConfig())
    yield
    registry.configure(registry.KernelConfig())


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request) -> Iterator[int]:
    """Runs a test with 1 and with 2 torch threads (batch-invariance must not depend on the split)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
