"""Backend detection: the one place that asks whether CUDA, Triton, FlashInfer, Transformer Engine or
our C++ CPU kernels can be used, and the one place that imports the optional GPU libraries.

Every probe is a small module-level function returning a `BackendStatus` (available + a reason a
person can read). The registry calls them through this module's namespace at resolve time, so tests
replace a probe with `monkeypatch.setattr(backends, "cuda_available", ...)` and clear the registry's
cache; nothing else in the package may try-import an optional library.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from dataclasses import dataclass
from types import ModuleType

import torch

BACKENDS: tuple[str, ...] = ("torch", "cpu", "triton", "flashinfer", "transformer_engine")


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run on a device type, and why (or why not)."""

    available: bool
    reason: str


# --- raw probes (replace these in tests) -------------------------------------------------------


def cuda_available() -> bool:
    """True when torch sees a CUDA (or ROCm) device."""
    return torch.cuda.is_available()


def cuda_capability() -> tuple[int, int]:
    """Compute capability of the current CUDA device; only called when `cuda_available()`."""
    return torch.cuda.get_device_capability()


@functools.cache
def _try_import(module_name: str) -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(module_name), ""
    except Exception as exc:  # an optional library can fail with anything, not only ImportError
        return None, f"{type(exc).__name__}: {exc}"


def triton_importable() -> BackendStatus:
    module, error = _try_import("triton")
    if module is None:
        return BackendStatus(False, f"import triton failed ({error})")
    return BackendStatus(True, f"triton {getattr(module, '__version__', '?')} importable")


def triton_interpreter_active() -> bool:
    """True when our Triton kernels run (or will run) in the Triton interpreter on CPU tensors.

    Triton fixes interpreter mode when a kernel is decorated, i.e. when `rl_engine.kernels.triton`
    is first imported; once it is, its recorded mode is the truth, whatever the environment says now.
    """
    kernels_module = sys.modules.get("rl_engine.kernels.triton")
    if kernels_module is not None:
        return bool(kernels_module.INTERPRETED)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def flashinfer_importable() -> BackendStatus:
    module, error = _try_import("flashinfer")
    if module is None:
        return BackendStatus(False, f"flashinfer not importable ({error})")
    return BackendStatus(True, f"flashinfer {getattr(module, '__version__', '?')} importable")


def transformer_engine_importable() -> BackendStatus:
    module, error = _try_import("transformer_engine.pytorch")
    if module is None:
        return BackendStatus(False, f"transformer_engine.pytorch not importable ({error})")
    return BackendStatus(True, "transformer_engine.pytorch importable")


# --- per-device status (what the registry asks) --------------------------------------------------


def cpu_kernels_status(source: str = "cpu_ops.cpp") -> BackendStatus:
    """Our C++ CPU kernels of one source under `rl_engine/kernels/cpu/csrc/` (the op's `OpSpec.cpu_source`):
    builds that source on the first call (then cached), and no other."""
    from rl_engine.kernels import cpu

    available, reason = cpu.extension_status(cpu.SOURCE.parent / source)
    return BackendStatus(available, reason)


def backend_status(backend: str, device_type: str, *, cpu_source: str = "cpu_ops.cpp") -> BackendStatus:
    """Can `backend` run ops on tensors of `device_type` ("cpu", "cuda", ...)? `cpu_source`: the C++ file
    the op's `cpu` implementation is built from."""
    if backend == "torch":
        return BackendStatus(True, "torch reference runs on every device")
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; known backends: {', '.join(BACKENDS)}")
    if backend == "cpu":
        if device_type != "cpu":
            return BackendStatus(False, f"the C++ CPU kernels run on CPU tensors only, not on {device_type}")
        return cpu_kernels_status(cpu_source)
    if backend == "triton":
        return _triton_status(device_type)
    if device_type != "cuda":
        return BackendStatus(False, f"{backend} runs on CUDA only, not on {device_type}")
    if not cuda_available():
        return BackendStatus(False, "no CUDA device")
    if backend == "flashinfer":
        return flashinfer_importable()
    return transformer_engine_importable()


def _triton_status(device_type: str) -> BackendStatus:
    # cheap tests first: on CPU without the interpreter, `import triton` is never paid for
    if device_type == "cpu":
        if not triton_interpreter_active():
            return BackendStatus(False, "Triton needs a GPU; on CPU only under TRITON_INTERPRET=1")
        importable = triton_importable()
        if not importable.available:
            return importable
        return BackendStatus(True, "Triton interpreter (TRITON_INTERPRET=1) on CPU tensors")
    if device_type != "cuda":
        return BackendStatus(False, f"Triton kernels are not built for {device_type}")
    if not cuda_available():
        return BackendStatus(False, "no CUDA device")
    importable = triton_importable()
    if not importable.available:
        return importable
    if triton_interpreter_active():
        return BackendStatus(False, "Triton kernels were built for the interpreter (TRITON_INTERPRET=1)")
    if torch.version.hip is None:
        major, minor = cuda_capability()
        if (major, minor) < (7, 0):
            return BackendStatus(False, f"compute capability {major}.{minor} < 7.0 (Triton's minimum)")
    return BackendStatus(True, importable.reason + " with a CUDA device")


# --- guarded imports of the optional GPU libraries (only adapters call these) ---------------------


def import_flashinfer() -> ModuleType:
    """The `flashinfer` module, or a RuntimeError saying why it cannot be used."""
    module, error = _try_import("flashinfer")
    if module is None:
        raise RuntimeError(f"flashinfer is not available: {error}")
    return module


def import_transformer_engine() -> ModuleType:
    """The `transformer_engine.pytorch` module, or a RuntimeError saying why it cannot be used."""
    module, error = _try_import("transformer_engine.pytorch")
    if module is None:
        raise RuntimeError(f"transformer_engine is not available: {error}")
    return module


def import_transformer_engine_recipe() -> ModuleType:
    """`transformer_engine.common.recipe` (FP8 recipes), or a RuntimeError."""
    module, error = _try_import("transformer_engine.common.recipe")
    if module is None:
        raise RuntimeError(f"transformer_engine is not available: {error}")
    return module
