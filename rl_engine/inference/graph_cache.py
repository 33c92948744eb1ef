"""The graph lookup cache: one-token-per-sequence (decode) steps run through runners keyed by a padded
batch size.

A batch of B sequences is padded up to the smallest bucket >= B; the table `runner_of[B]` (a list
indexed by B) gives its runner in O(1). Padded rows read token 0 at position 0, write their KV into the
dummy block 0 and attend to that one slot, so they never touch a real sequence's cache.

A runner owns static input buffers of its bucket size. The host side of each buffer is a numpy view, so
the engine fills rows with plain slice assignments, no torch op per step. On CPU the runner is eager
(the same table, buckets and padding, so those are tested here), or with `compile_decode` a bucket's
step compiled by torch.compile with static shapes (`compiled_decode.py`). On CUDA, `CudaGraphRunner` captures
`hidden_states` on the static device buffers once per bucket and replays it; decode attention then uses
the registry's paged-decode kernel over full-width block tables. The CUDA path is unverified: there is
no GPU where this was written, and MoE models (whose expert dispatch syncs with the host) stay eager.
"""

from __future__ import annotations

from typing import Callable

import torch

from rl_engine.inference.attention import PagedAttention
from rl_engine.inference.block_manager import DUMMY_BLOCK


def default_buckets(max_num_seqs: int) -> list[int]:
    """vLLM's capture sizes: 1, 2, 4, then every multiple of 8, up to max_num_seqs."""
    sizes = [b for b in (1, 2, 4) if b <= max_num_seqs] + list(range(8, max_num_seqs + 1, 8))
    if not sizes or sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class StaticInputs:
    """Input buffers of the largest bucket, shared by every runner (each uses its first rows), so
    memory does not grow with the number of buckets. Host tensors have numpy views that the engine
    fills with slice assignments; on CUDA they are pinned and mirrored by device buffers."""

    def __init__(self, max_batch_size: int, *, max_blocks: int, device: torch.device) -> None:
        pin = device.type == "cuda"

        def host(shape, dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, pin_memory=pin)

        self.host = {"input_ids": host(max_batch_size, torch.int64), "positions": host(max_batch_size, torch.int64),
                     "slot_mapping": host(max_batch_size, torch.int64),
                     "context_lens": host(max_batch_size, torch.int32),
                     "block_tables": host((max_batch_size, max_blocks), torch.int32)}
        self.device = {k: v.to(device) for k, v in self.host.items()} if pin else self.host


class DecodeRunner:
    """Eager runner of one bucket: its rows of the static buffers, padding, one forward. `direct`, set by the model
    runner where it serves the model (`direct_decode.DirectDecode`), runs that forward as direct C++ kernel calls."""

    direct = None

    def __init__(self, batch_size: int, *, inputs: StaticInputs, model, attn: PagedAttention) -> None:
        self.batch_size = batch_size
        self.model = model
        self.attn = attn
        rows = slice(0, batch_size)
        host = {k: v[rows] for k, v in inputs.host.items()}
        self.input_ids, self.positions = host["input_ids"], host["positions"]
        self.slot_mapping, self.context_lens, self.block_tables = (host["slot_mapping"], host["context_lens"],
                                                                   host["block_tables"])
        self.np_input_ids, self.np_positions = self.input_ids.numpy(), self.positions.numpy()
        self.np_slot_mapping, self.np_context_lens = self.slot_mapping.numpy(), self.context_lens.numpy()
        self.np_block_tables = self.block_tables.numpy()
        self._host = host
        self._device = {k: v[rows] for k, v in inputs.device.items()}

    def pad(self, n: int) -> None:
        """Rows n.. become padding (their previous content may be stale)."""
        if n < self.batch_size:
            self.np_input_ids[n:] = 0
            self.np_positions[n:] = 0
            self.np_slot_mapping[n:] = DUMMY_BLOCK * self.attn.block_size
            self.np_context_lens[n:] = 1
            self.np_block_tables[n:, 0] = DUMMY_BLOCK

    def run(self, *, max_context_len: int, routing=None,
            first_block: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward the bucket's rows (filled and padded by the caller) -> (hidden [bucket, H], logits
        [bucket, V] when the runner computes them, else None: the caller does, for the rows it needs).
        `first_block`: a bucket of one whose blocks are first_block, first_block + 1, ..."""
        self.attn.prepare(slot_mapping=self.slot_mapping, num_single=self.batch_size, block_tables=self.block_tables,
                          context_lens=self.context_lens, max_context_len=max_context_len, prefills=[],
                          first_block=first_block)
        direct = self.direct
        if direct is not None and direct.usable(routing):
            hidden = direct.hidden_states(self.input_ids, self.positions)
            if hidden is not None:
                return hidden, None
        return self.model.hidden_states(self.input_ids, positions=self.positions, attn_context=self.attn,
                                         routing=routing), None


class CudaGraphRunner(DecodeRunner):
    """A captured CUDA graph of one bucket (unverified: written without a GPU).

    Host rows are copied into the static device buffers, then the graph replays. Decode attention
    reads the full-width block tables through the registry kernel, so captured shapes never change."""

    graph: torch.cuda.CUDAGraph | None = None
    output: torch.Tensor | None = None

    def _forward(self) -> torch.Tensor:
        d = self._device
        self.attn.prepare(slot_mapping=d["slot_mapping"], num_single=self.batch_size,
                          block_tables=d["block_tables"], context_lens=d["context_lens"], max_context_len=0,
                          prefills=[])
        return self.model.hidden_states(d["input_ids"], positions=d["positions"], attn_context=self.attn)

    def capture(self, pool=None) -> None:
        self.pad(0)
        self._copy_inputs()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up (lazy inits, kernel autotuning) outside the graph
                self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = self._forward()

    def _copy_inputs(self) -> None:
        for name, host in self._host.items():
            self._device[name].copy_(host, non_blocking=True)

    def run(self, *, max_context_len: int, routing=None,
            first_block: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if routing is not None:
            raise ValueError("routing capture is not supported inside CUDA graphs; use enforce_eager=True")
        self._copy_inputs()
        self.graph.replay()
        return self.output, None


class GraphCache:
    """Buckets -> runners, looked up by batch size in O(1)."""

    def __init__(self, buckets: list[int], make_runner: Callable[[int], DecodeRunner]) -> None:
        if not buckets or min(buckets) < 1:
            raise ValueError(f"graph batch-size buckets must be positive integers, got {buckets}")
        self.buckets = sorted(set(buckets))
        self.max_batch_size = self.buckets[-1]
        self._make_runner = make_runner
        self._runners: dict[int, DecodeRunner] = {}
        # runner_of[b]: the runner of the smallest bucket >= b (filled as runners are built).
        self._bucket_of = [0] * (self.max_batch_size + 1)
        j = 0
        for b in range(1, self.max_batch_size + 1):
            while self.buckets[j] < b:
                j += 1
            self._bucket_of[b] = self.buckets[j]
        self.runner_of: list[DecodeRunner | None] = [None] * (self.max_batch_size + 1)

    def bucket_for(self, batch_size: int) -> int | None:
        return self._bucket_of[batch_size] if 0 < batch_size <= self.max_batch_size else None

    def lookup(self, batch_size: int) -> DecodeRunner | None:
        """The runner for a decode batch of `batch_size` rows, or None when it exceeds every bucket."""
        if batch_size > self.max_batch_size:
            return None
        runner = self.runner_of[batch_size]
        if runner is None:
            runner = self._build(self._bucket_of[batch_size])
        return runner

    def build_all(self) -> None:
        """Build (capture) every bucket now, largest first (CUDA graphs share the memory pool best)."""
        for bucket in reversed(self.buckets):
            self._build(bucket)

    def _build(self, bucket: int) -> DecodeRunner:
        runner = self._runners.get(bucket)
        if runner is None:
            runner = self._runners[bucket] = self._make_runner(bucket)
            for b in range(1, bucket + 1):
                if self._bucket_of[b] == bucket:
                    self.runner_of[b] = runner
        return runner

    @property
    def num_runners(self) -> int:
        return len(self._runners)

    @property
    def runners(self) -> dict[int, DecodeRunner]:
        """bucket -> its runner, for the buckets built so far."""
        return dict(self._runners)
