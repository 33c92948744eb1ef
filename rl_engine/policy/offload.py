"""Host offload of a frozen model (`ref.offload: cpu`, `distill.offload: cpu`): its weights live in host
memory between uses and on the compute device only while it scores a step's micro-batches, so a
reference policy or a teacher does not hold device memory while the policy trains.

    offload = HostOffload(ref_model, device="cuda")   # the weights move to host memory now
    with offload.in_use():                            # on the device for the no-grad passes
        ref_logprobs = forward_logprobs(ref_model, micro_batches)

Each parameter and buffer keeps its Python object (modules, tied weights and optimizer-free code that
holds references see the same tensors); only its `.data` changes: the host copy while in use on a CPU
device (no copy at all), a device copy made from the host copy on CUDA (pinned host memory,
non-blocking), and an empty tensor between uses. Verified on CPU (the release and the storage swap);
the CUDA transfer path has not been run on a GPU yet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

__all__ = ["HostOffload", "in_use"]


class HostOffload:
    def __init__(self, modules: torch.nn.Module | Sequence[torch.nn.Module], *, device: str | torch.device) -> None:
        modules = [modules] if isinstance(modules, torch.nn.Module) else list(modules)
        seen: set[int] = set()
        self.tensors: list[torch.Tensor] = []
        for m in modules:
            for t in [*m.parameters(), *m.buffers()]:
                if id(t) not in seen:  # tied weights: one tensor
                    seen.add(id(t))
                    self.tensors.append(t)
        self.device = torch.device(device)
        pin = self.device.type == "cuda"
        self.host = [t.detach().to("cpu", copy=True) for t in self.tensors]
        if pin:
            self.host = [h.pin_memory() for h in self.host]
        self.resident = True
        self.release()

    def fetch(self) -> None:
        """Weights onto the compute device (on CPU: the host copies themselves)."""
        for t, h in zip(self.tensors, self.host):
            t.data = h.to(self.device, non_blocking=True)
        self.resident = True

    def release(self, *, write_back: bool = False) -> None:
        """Free the device copies; `write_back` first copies them into the host copies (after a
        load_state_dict into the model, say)."""
        for t, h in zip(self.tensors, self.host):
            if write_back and t.data.data_ptr() != h.data_ptr():
                h.copy_(t.data)
            t.data = torch.empty(0, dtype=t.dtype, device=self.device)
        self.resident = False

    @contextlib.contextmanager
    def in_use(self, *, write_back: bool = False) -> Iterator[None]:
        self.fetch()
        try:
            yield
        finally:
            self.release(write_back=write_back)

    @property
    def resident_bytes(self) -> int:
        """Bytes of the model's weights on the compute device now (0 between uses)."""
        return sum(t.untyped_storage().nbytes() for t in self.tensors)


def in_use(offload: HostOffload | None, *, write_back: bool = False) -> contextlib.AbstractContextManager:
    """`offload.in_use()`, or nothing for a model that is not offloaded."""
    return contextlib.nullcontext() if offload is None else offload.in_use(write_back=write_back)
