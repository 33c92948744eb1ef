"""The grad-mode predicates that choose between kernels, each defined once.

`records_autograd(*tensors)`: autograd records a call on these inputs (grad mode on and one of them requires grad),
so the call needs an implementation with a backward: a kernel without one (the C++ CPU ops, the engine's RMSNorm
and SwiGLU) runs the torch reference then, and the batch-invariant kernels their autograd Functions.

`trainer_pass()` / `training_kernels()`: whether a forward takes the training kernels or the engine's. The trainer's
recorded pass and its no-grad passes (proximal, reference and teacher log-probs, run inside `trainer_pass`) take the
training kernels, so a no-grad pass over the weights being updated gives the recorded pass's log-probs bit for bit;
the policy's layers (`policy.layers`, `policy.moe`) and `modules.RMSNormLinear` pick by it at each forward.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch


def records_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records a call on these inputs (None entries are skipped)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_TRAINER_PASS: contextvars.ContextVar[bool] = contextvars.ContextVar("trainer_pass", default=False)


@contextlib.contextmanager
def trainer_pass() -> Iterator[None]:
    """A forward of the trainer's (its recorded pass, and the no-grad passes of proximal, reference and teacher
    log-probs): the layers take the kernels the recorded pass takes, so a no-grad pass over the weights being
    updated gives the first update's log-probs bit for bit (its importance ratio exactly 1). Per thread: an
    engine stepping in another thread keeps its own kernels."""
    token = _TRAINER_PASS.set(True)
    try:
        yield
    finally:
        _TRAINER_PASS.reset(token)


def training_kernels() -> bool:
    """Whether this forward takes the training kernels: autograd records it, or it runs in `trainer_pass`
    (a traced no-grad forward is the engine's compiled step: dynamo cannot read a ContextVar)."""
    return torch.is_grad_enabled() or (not torch.compiler.is_compiling() and _TRAINER_PASS.get())
