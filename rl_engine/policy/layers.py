"""Tensor-parallel building blocks: column/row-parallel linears, vocab-parallel embedding and head.

Each layer owns its shard of the weight and knows its `ParallelGroups`; at tp=1 the collectives are
identities and these are plain linear / embedding ops. Every product goes through the kernel
registry's `dense` op, resolved at build (`bind_kernels`): `F.linear` (in an engine's CPU steps, on a
prepacked copy of the weight: `kernels/cpu/packed_linear.py`), or under `model.batch_invariant`
the batch-invariant tiled matmul (`kernels/invariant.py`). Fused projections (qkv, gate/up)
keep each rank's slice of every part side by side (`[q_r | k_r | v_r]`), so a rank's output splits
into its own heads without communication. Every parameter has a `load_full(name_part, tensor)` path
(through `weight_loader`) that takes the full Hugging Face tensor and keeps this rank's slice.

With sequence parallelism the activations between blocks are split over tokens: column layers
all-gather their input, row layers reduce-scatter their output.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from rl_engine import kernels
from rl_engine.kernels.cpu import train_elementwise
from rl_engine.kernels.cpu.host_memory import outside_step_arena
from rl_engine.kernels.grad_mode import training_kernels
from rl_engine.policy import comm
from rl_engine.policy.parallel import ParallelGroups


def _shard_rows(full: torch.Tensor, rank: int, size: int, name: str) -> torch.Tensor:
    if full.shape[0] % size:
        raise ValueError(f"{name}: dim 0 ({full.shape[0]}) is not divisible by the tensor-parallel size ({size})")
    return full.chunk(size, dim=0)[rank]


def mark_tp_partial_grad(param: torch.Tensor) -> None:
    """This (tp-replicated) parameter gets a partial gradient on each tp rank (it sees only a part
    of the tokens or heads): the trainer sums its gradient over the tp group."""
    param.tp_partial_grad = True


def _copy_checked(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise ValueError(f"tensor {name!r}: expected shape {tuple(param.shape)}, got {tuple(value.shape)}")
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, *, eps: float, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.bind_kernels(self.weight.device)

    def bind_kernels(self, device: torch.device) -> None:
        """Resolve the kernels once (at build, and again when the model moves to another device): `rms_norm`
        for the engine's forwards, `rms_norm_train` for the trainer's (`training_kernels`; on CPU the fused C++
        forward and backward)."""
        self._rms_norm = kernels.resolve("rms_norm", device)
        self._rms_norm_train = kernels.resolve("rms_norm_train", device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        rms_norm = self._rms_norm_train if training_kernels() else self._rms_norm
        out, residual_out = rms_norm(x, self.weight, self.eps, residual)
        return out if residual is None else (out, residual_out)


class RotaryEmbedding:
    """Rotate-half rotary embedding (Hugging Face Llama/Qwen) for the flat token batch of a forward.

    The rotation of every position below `max_positions` is computed once per device (by the
    `rotary_cos_sin` op) into a [max_positions, 2, head_dim] fp32 table: cos at full width and sin
    with the rotate-half sign folded in ([-sin | sin]). A forward gathers its tokens' rows once
    (`tables`) and every layer reuses them (`rotate`). On the torch backend a layer rotates all of its
    q and k heads in one pass over the fused projection's output, x * cos + roll(x, half) * sin (the
    registry's `rotary_full`: four torch dispatches where rotating q and k apart takes two dozen, which
    matters at decode, where such small ops dominate; one C++ pass each way on CPU in fp32). Other
    backends get the registry's `apply_rotary` on half-width views.
    """

    def __init__(self, *, head_dim: int, max_positions: int, device: torch.device,
                 attention_factor: float = 1.0) -> None:
        self.half = head_dim // 2
        self.max_positions = max_positions
        self.attention_factor = attention_factor  # YaRN scales cos and sin (transformers' attention_scaling)
        self._table: torch.Tensor | None = None
        self._half_width: tuple[torch.Tensor, torch.Tensor] | None = None  # (`half_width_table`'s views of it)
        self.bind_kernels(device)

    def bind_kernels(self, device: torch.device) -> None:
        resolution = kernels.default_registry().resolution("apply_rotary", device)
        self._fused = resolution.backend == "torch"
        self._apply_rotary = resolution.fn
        self._rotary_full = kernels.resolve("rotary_full", device)
        self._cos_sin = kernels.resolve("rotary_cos_sin", device)

    def _rows(self, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """[len(positions), 2, head_dim]: cos and signed sin at full width."""
        cos, sin = self._cos_sin(positions, inv_freq)
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return torch.stack((torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)), dim=1)

    def tables(self, positions: torch.Tensor, inv_freq: torch.Tensor, *,
               half_width: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token rotation tables for `rotate`: [T, 1, head_dim] cos and signed sin (torch), or
        [T, head_dim // 2] cos and sin (other backends, and `half_width`: what an attention context that
        rotates q and k itself takes, views of the same rows)."""
        table = self._table_on(positions.device, inv_freq)
        try:
            rows = table.index_select(0, positions)
        except (IndexError, RuntimeError):  # a position past the table (CPU raises): compute its rows
            rows = self._rows(positions, inv_freq)
        if self._fused and not half_width:
            return rows[:, :1], rows[:, 1:]
        return rows[:, 0, :self.half], rows[:, 1, self.half:]

    def half_width_table(self, device: torch.device, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[max_positions, head_dim // 2] cos and sin, views of the whole table whose row p is position p's: what
        `tables(positions, half_width=True)` gathers, for a kernel that reads each token's row itself."""
        views = self._half_width
        if views is None or views[0].device != device:
            table = self._table_on(device, inv_freq)
            views = self._half_width = (table[:, 0, :self.half], table[:, 1, self.half:])
        return views

    def _table_on(self, device: torch.device, inv_freq: torch.Tensor) -> torch.Tensor:
        table = self._table
        if table is None or table.device != device:
            with outside_step_arena():  # (built in a first forward, a prefill step: it outlives the step)
                table = self._table = self._rows(torch.arange(self.max_positions, device=device), inv_freq)
            self._half_width = None  # (views of the table it replaces)
        return table

    def rotate(self, x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [T, heads, head_dim] (a view into the fused projection is fine) -> rotated, new tensor."""
        cos, sin = tables
        if self._fused:
            return self._rotary_full(x, cos, sin)
        return self._apply_rotary(x, x[:, :0], cos, sin)[0]

    def rotate_qkv(self, qkv: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor], *, q_heads: int,
                   kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, k, v) [T, heads, head_dim] of the fused projection's output qkv [T, (q_heads + 2 kv_heads) head_dim]:
        q and k rotated in one `rotate`, v a view. With the CPU kernel (`train_elementwise.rotary_qkv`) the training
        forward's backward writes qkv's gradient in one buffer instead of concatenating its parts twice."""
        if self._fused and self._rotary_full is train_elementwise.rotary_full:
            return train_elementwise.rotary_qkv(qkv, *tables, q_heads=q_heads, kv_heads=kv_heads)
        T, D = qkv.shape[0], qkv.shape[1] // (q_heads + 2 * kv_heads)
        qk, v = qkv.split([(q_heads + kv_heads) * D, kv_heads * D], dim=1)
        q, k = self.rotate(qk.view(T, q_heads + kv_heads, D), tables).split([q_heads, kv_heads], dim=1)
        return q, k, v.view(T, kv_heads, D)


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b) with W split over output features. Several logical outputs may be fused
    (`output_sizes`, e.g. [q, k, v]); each is split over tp separately."""

    def __init__(
        self,
        in_features: int,
        output_sizes: list[int],
        *,
        groups: ParallelGroups,
        bias: bool,
        dtype: torch.dtype,
        device=None,
        replicas: list[int] | None = None,
    ) -> None:
        super().__init__()
        tp = groups.tp_size
        # replicas[i] > 1: part i has fewer rows than tp shards; each rank holds one full row block
        # of size output_sizes[i] * replicas[i] / tp (used for KV heads when num_kv_heads < tp).
        self.replicas = replicas or [1] * len(output_sizes)
        for size, rep in zip(output_sizes, self.replicas):
            if (size * rep) % tp:
                raise ValueError(f"output size {size} is not divisible by tensor_parallel_size ({tp})")
        self.groups = groups
        self.output_sizes = list(output_sizes)
        self.local_sizes = [s * r // tp for s, r in zip(output_sizes, self.replicas)]
        self.weight = nn.Parameter(torch.empty(sum(self.local_sizes), in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(sum(self.local_sizes), dtype=dtype, device=device)) if bias else None
        nn.init.normal_(self.weight, std=0.02)
        # Parameter tags read by the optimizer: sharded over tp; rows of replicated parts get
        # gradients from different q heads on each replica, summed over the replicas.
        replicated = [(sum(self.local_sizes[:i]), sum(self.local_sizes[:i + 1]), rep)
                      for i, rep in enumerate(self.replicas) if rep > 1]
        for p in (self.weight, self.bias):
            if p is not None:
                p.tensor_parallel = True
                if replicated:
                    p.tp_replicated_rows = replicated
        self.bind_kernels(self.weight.device)

    def bind_kernels(self, device: torch.device) -> None:
        self._dense = kernels.resolve("dense", device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.groups
        x = comm.gather_sequence(x, g.tp_group) if g.sequence_parallel else comm.copy_to_tp(x, g.tp_group)
        return self._dense(x, self.weight, self.bias)

    def shard_of(self, full: torch.Tensor, part: int) -> torch.Tensor:
        """This rank's rows of logical part `part` from its full tensor (weight or bias)."""
        g = self.groups
        rep = self.replicas[part]
        if rep == 1:
            return _shard_rows(full, g.tp_rank, g.tp_size, f"part {part}")
        # Replicated part: tp ranks share each row block, `rep` ranks per block.
        blocks = g.tp_size // rep
        return full.chunk(blocks, dim=0)[g.tp_rank // rep]

    def load_part(self, part: int, *, weight: torch.Tensor, bias: torch.Tensor | None = None, name: str = "") -> None:
        start = sum(self.local_sizes[:part])
        end = start + self.local_sizes[part]
        _copy_checked(self.weight[start:end], self.shard_of(weight, part), name or f"part {part}.weight")
        if bias is not None:
            if self.bias is None:
                raise ValueError(f"{name}: checkpoint has a bias but the model was built without one")
            _copy_checked(self.bias[start:end], self.shard_of(bias, part), f"{name}.bias")

    def full_part(self, part: int, tensor: torch.Tensor) -> torch.Tensor:
        """Inverse of load_part at tp=1: this rank's slice of part `part` from `tensor` (weight or
        bias). Gathering over tp is the caller's business (checkpoint export)."""
        start = sum(self.local_sizes[:part])
        return tensor[start:start + self.local_sizes[part]]


class RowParallelLinear(nn.Module):
    """y = x W^T (+ b) with W split over input features; partial outputs are summed over tp."""

    def __init__(self, in_features: int, out_features: int, *, groups: ParallelGroups, bias: bool,
                 dtype: torch.dtype, device=None) -> None:
        super().__init__()
        if in_features % groups.tp_size:
            raise ValueError(f"in_features ({in_features}) is not divisible by tensor_parallel_size ({groups.tp_size})")
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_features, in_features // groups.tp_size, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        nn.init.normal_(self.weight, std=0.02)
        self.weight.tensor_parallel = True
        if self.bias is not None and groups.sequence_parallel:
            mark_tp_partial_grad(self.bias)  # added to this rank's token slice only
        self.bind_kernels(self.weight.device)

    def bind_kernels(self, device: torch.device) -> None:
        self._dense = kernels.resolve("dense", device)
        # the default dense takes the residual add into its matmul (addmm, or oneDNN's fused add); the
        # batch-invariant one adds apart
        self._fuse_residual = getattr(self._dense, "fuses_residual", False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T (+ b) summed over tp; with `residual` (the stream this layer's output joins),
        residual + that. Inference on a single rank fuses the add into the matmul (one op less per
        block at decode); with autograd on, the separate add keeps every tensor-parallel layout
        rounding alike (the parallel tests compare them to 1e-5)."""
        g = self.groups
        if (residual is not None and self._fuse_residual and g.tp_group is None and self.bias is None
                and x.dim() == 2 and not training_kernels()):
            return self._dense(x, self.weight, residual=residual)
        y = self._dense(x, self.weight)
        y = comm.reduce_scatter_sequence(y, g.tp_group) if g.sequence_parallel else comm.reduce_from_tp(y, g.tp_group)
        if self.bias is not None:
            y = y + self.bias
        return y if residual is None else residual + y

    def load_full(self, weight: torch.Tensor, name: str = "") -> None:
        g = self.groups
        if weight.shape[1] % g.tp_size:
            raise ValueError(f"{name}: dim 1 ({weight.shape[1]}) not divisible by tensor_parallel_size ({g.tp_size})")
        _copy_checked(self.weight, weight.chunk(g.tp_size, dim=1)[g.tp_rank], name)


class ReplicatedLinear(nn.Module):
    """y = x W^T with the whole weight on every rank (MLA's latent projections, MTP's eh_proj)."""

    def __init__(self, in_features: int, out_features: int, *, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        nn.init.normal_(self.weight, std=0.02)
        self.bind_kernels(self.weight.device)

    def bind_kernels(self, device: torch.device) -> None:
        self._dense = kernels.resolve("dense", device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._dense(x, self.weight)


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split over tp. The vocabulary is padded up to a multiple of tp;
    padded rows are never looked up and their logits are masked to -inf in the head."""

    def __init__(self, vocab_size: int, dim: int, *, groups: ParallelGroups, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        self.groups = groups
        self.vocab_size = vocab_size
        self.rows_per_rank = math.ceil(vocab_size / groups.tp_size)
        self.vocab_start = groups.tp_rank * self.rows_per_rank
        self.vocab_end = min(vocab_size, self.vocab_start + self.rows_per_rank)  # real rows end
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, dim, dtype=dtype, device=device))
        nn.init.normal_(self.weight, std=0.02)
        self.weight.tensor_parallel = True
        if self.rows_per_rank > self.vocab_end - self.vocab_start:
            with torch.no_grad():
                self.weight[self.vocab_end - self.vocab_start:] = 0  # padding rows stay 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        g = self.groups
        if g.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_end - self.vocab_start)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[:, None], 0)
        return comm.reduce_scatter_sequence(out, g.tp_group) if g.sequence_parallel else comm.reduce_from_tp(out, g.tp_group)

    def load_full(self, weight: torch.Tensor, name: str = "") -> None:
        if weight.shape[0] != self.vocab_size:
            raise ValueError(f"tensor {name!r}: expected {self.vocab_size} rows (vocab_size), got {weight.shape[0]}")
        real = weight[self.vocab_start:self.vocab_end]
        with torch.no_grad():
            self.weight.zero_()
        _copy_checked(self.weight[: real.shape[0]], real, name)

    def local_real_rows(self) -> torch.Tensor:
        return self.weight[: self.vocab_end - self.vocab_start]


class ParallelLMHead(nn.Module):
    """Output projection with the vocabulary split over tp (its own weight or the embedding's)."""

    def __init__(self, embedding_like: VocabParallelEmbedding) -> None:
        super().__init__()
        self.groups = embedding_like.groups
        self.shard = embedding_like  # holds weight, vocab range and padding
        self.vocab_size = embedding_like.vocab_size
        self.bind_kernels(embedding_like.weight.device)

    def bind_kernels(self, device: torch.device) -> None:
        self.dense = kernels.resolve("dense", device)  # also the trainer's chunk logits (policy.logprobs)

    @property
    def weight(self) -> torch.Tensor:
        return self.shard.weight

    def local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, rows_per_rank] logits of this rank's vocab shard, padded rows at -inf."""
        g = self.groups
        if g.sequence_parallel:
            hidden = comm.gather_sequence(hidden, g.tp_group)
        else:
            hidden = comm.copy_to_tp(hidden, g.tp_group)
        logits = self.dense(hidden, self.weight)
        n_real = self.shard.vocab_end - self.shard.vocab_start
        if n_real < logits.shape[-1]:
            logits[..., n_real:] = float("-inf")
        return logits

    def full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, vocab_size] logits, gathered over tp (for generation and tests, not for training)."""
        logits = self.local_logits(hidden)
        if self.groups.tp_size > 1:
            logits = comm.gather_from_tp(logits, self.groups.tp_group)
        return logits[..., : self.vocab_size]


ActivationFn = Callable[[torch.Tensor], torch.Tensor]


def select_rows(x: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
    """x's rows `rows` (indices, or a slice: a view); `index_select`, whose backward adds into the rows,
    not advanced indexing, whose backward is a slower accumulating `index_put`."""
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
