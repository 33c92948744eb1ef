"""Paged attention for one flat batch: the `attn_context` the engine hands the policy model.

The batch is `num_single` one-token queries (decodes, one-token prefill chunks) followed by longer
prefill chunks. Per layer, `attend` writes the new k/v into the paged cache at `slot_mapping`
(block_id * block_size + offset; padding writes go to the dummy block 0), then:
- one-token queries: a lone row reads its context as a strided view of the cache when its blocks
  are consecutive (else gathers them) and runs one unmasked SDPA call. More rows are cut into chunks
  whose gathered K/V stay within `DECODE_CHUNK_BYTES`: each chunk gathers its rows' blocks into a
  [rows, Hkv, L, D] view padded to its own longest context and runs one SDPA call with an additive
  length mask; the runner orders rows by context length. When blocks are scattered and contexts
  outgrow the L2 cache this measured up to ~2x faster on CPU than one batch-wide gather (a chunk's
  K/V are still cached when SDPA reads them, and short rows are not padded to the batch's longest);
  otherwise it is on par. A GQA group of query heads is laid out as SDPA's query-length axis ([B, Hkv, G, D]), so KV heads
  are never repeated.
- prefill chunks: with the registry's `paged_prefill_attention` resolved to its C++ kernel (`prefill_op`,
  the CPU default where it builds) one call per layer for every chunk of the step, each query reading
  its keys in place in the cache (the step's table, query lengths and contexts built once in
  `prepare`). Else one SDPA call per sequence, over the chunk's own k/v when it starts the sequence
  (plain causal; consecutive such chunks of one length, e.g. a rollout's samples of equal-length
  prompts, batched into one call), else over its gathered cached prefix with an offset causal mask.
Index tensors, views and masks are built once per step (`prepare`), not per layer. On CUDA, decode
calls the `paged_decode_attention` op from the kernel registry instead (unverified here: no GPU in CI);
on CPU too when the registry resolves it to the C++ kernel (`kernels/cpu`, which reads K/V in place
in their blocks: `cpu_decode=True`, it is also given the step's longest context): the CPU default where
the kernel builds, so the SDPA path above runs where it does not (no compiler, `RL_ENGINE_CPU_KERNELS=0`).
There each layer calls the kernel directly (`ops.paged_decode_step`) on the step's int32 tables, made once in
`prepare`: the checked wrapper's Python cost ~9 us a call, paid by 8 layers a step.
Built with the registry's `rotary_kv_write` (the C++ kernel on CPU, its default there), the context rotates q and
k itself (`fuses_rotary`): the model hands `attend_rotary` q and k before rotary, and one pass rotates q and
writes the rotated k and v into their slots in place of the model's rotary and `attend`'s two index_copy_.
A step of decodes only with both C++ kernels (`direct_decode`: every compiled decode step) calls the two extension
functions themselves, without their wrappers' checks, which the kernels repeat (a refused call goes through the
wrappers): the `tiny` preset's 128-row compiled step ~16 us shorter at 1 thread (two layers), same bits.
Under `model.batch_invariant` (`batch_invariant=True`) every query instead goes through the batch-invariant
attention, the same per-query reduction the trainer's packed forward runs: with its C++ kernel (CPU,
`invariant.native_attention`) one `invariant.paged_attention` call per layer for the whole step, each
query reading its keys in place in the cache through its row of a step-wide block table (built once per
step in `prepare`); with the torch implementation `kernels.invariant.attention` over keys gathered from
the cache at positions 0, 1, ... (padded to whole key blocks): decodes as one call per group of rows,
prefill chunks as calls over their sequence's keys.
`decode_observer`, when set, sees every eager decode call's inputs and output (a replayed CUDA graph
runs no Python; a compiled CPU step's C++ attention op calls back into Python while one is set); tests compare the
kernels against the engine on a real engine state with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from rl_engine.kernels import invariant
from rl_engine.kernels.cpu import ops as cpu_ops

DECODE_CHUNK_BYTES = 1 << 20  # gathered K + V per decode chunk: about half a core's L2
DECODE_GROUP = 16  # batch-invariant decode: rows per attention call


@dataclass
class PrefillChunk:
    start: int  # first row in the flat batch
    end: int
    context_len: int  # tokens with KV after this step (cached prefix + this chunk)
    block_ids: torch.Tensor | None  # [num_blocks] long, None when the chunk starts the sequence


@dataclass
class PrefillRun:
    """`count` consecutive prefill chunks that each start their sequence, all of one length, rows
    [start, end): attended in one batched SDPA call instead of one call per chunk."""
    start: int
    end: int
    count: int


def _plan_prefills(prefills: list[PrefillChunk]) -> list[PrefillChunk | PrefillRun]:
    """The step's prefill chunks with each run of consecutive equal-length chunks that start their
    sequence merged into a `PrefillRun` (a rollout's n samples of a prompt, prompts of one length).
    An RL rollout's first step prefills every sample's prompt (128 sequences of 13 tokens in
    grpo_step.py); one call per sequence costs ~5x the batched call there (1 thread, per layer), and the
    flash kernel computes each (sequence, head) alike in both, so outputs are bit-equal."""
    plan: list[PrefillChunk | PrefillRun] = []
    run: list[PrefillChunk] = []

    def flush() -> None:
        if len(run) > 1:
            plan.append(PrefillRun(start=run[0].start, end=run[-1].end, count=len(run)))
        else:
            plan.extend(run)
        run.clear()

    for c in prefills:
        if c.block_ids is not None:
            flush()
            plan.append(c)
            continue
        if run and (c.start != run[-1].end or c.end - c.start != run[0].end - run[0].start):
            flush()
        run.append(c)
    flush()
    return plan


def _fresh_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, count: int, group: int,
                  scale: float) -> torch.Tensor:
    """Rows of `count` fresh sequences of one length, back to back (q [count * n, Hq, D], k/v [count * n,
    Hkv, D]): causal attention of each over its own k/v in one SDPA call -> [count * n, Hq, D]."""
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    o = F.scaled_dot_product_attention(*(x.unflatten(0, (count, -1)).transpose(1, 2) for x in (q, k, v)),
                                       is_causal=True, scale=scale)  # [count, Hq, n, D]
    return o.transpose(1, 2).flatten(0, 1)


class PagedAttention:
    """Implements the model's `AttentionContext` over per-layer caches
    [num_blocks, block_size, num_kv_heads, head_dim]."""

    def __init__(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], *, first_layer: int,
                 decode_op=None, batch_invariant: bool = False, cpu_decode: bool = False,
                 rotary_kv_write=None, prefill_op=None) -> None:
        self.k_caches = k_caches
        self.v_caches = v_caches
        self.first_layer = first_layer
        self.block_size = k_caches[0].shape[1]
        self.num_kv_heads = k_caches[0].shape[2]
        self.head_dim = k_caches[0].shape[3]
        self._k_flat = [k.view(-1, self.num_kv_heads, self.head_dim) for k in k_caches]
        self._v_flat = [v.view(-1, self.num_kv_heads, self.head_dim) for v in v_caches]
        self.decode_op = decode_op  # a registry kernel (CUDA, or the C++ CPU one); None: SDPA below
        self.cpu_decode = cpu_decode  # decode_op is kernels.cpu.ops.paged_decode_attention: ops.paged_decode_step
        self.max_context_len = 0
        self.batch_invariant = batch_invariant
        if rotary_kv_write is not None and batch_invariant:
            raise ValueError("the fused rotary + KV write has no batch-invariant form: build the attention without"
                             " rotary_kv_write under model.batch_invariant")
        # the registry's `rotary_kv_write` (the C++ kernel): the model hands `attend_rotary` q and k before rotary
        self.rotary_kv_write = rotary_kv_write
        self.fuses_rotary = rotary_kv_write is not None
        if prefill_op is not None and batch_invariant:
            raise ValueError("prefill_op has no batch-invariant form: build the attention without prefill_op under "
                             "model.batch_invariant")
        # the registry's `paged_prefill_attention` (the C++ kernel): one call per layer for the step's prefill
        # chunks with (block tables int32 [chunks, max_blocks], cu_seqlens_q int32 [chunks + 1], context_lens
        # int32 [chunks]) built in `prepare`; None: SDPA per sequence
        self.prefill_op = prefill_op
        self.prefill_call: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # batch-invariant with the C++ kernel: one call per layer for every query of the step, each with
        # its row of a step-wide block table (int32 [rows, max_blocks]) and its position (int32 [T])
        self.native_invariant = batch_invariant and invariant.native_attention(k_caches[0].device)
        self.invariant_call: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # batch-invariant metadata: per group of decode rows (first row, end row, cache blocks [rows * nb],
        # key length L, positions [rows]); per prefill chunk, its sequence's slots [context_len] (None when
        # the chunk starts it) and positions
        self.invariant_decode: list[tuple[int, int, torch.Tensor, int, torch.Tensor]] = []
        self.invariant_prefills: list[tuple[torch.Tensor | None, torch.Tensor]] = []
        # batch-invariant: which branches of `attend` this step takes (decodes, prefill chunks that start
        # their sequence, chunks over a cached prefix); the model checks each combination once
        self.path: tuple[bool, bool, bool] | None = None
        # decode_observer(layer_idx, q, k_cache, v_cache, block_tables, context_lens, scale, out); each of
        # `observer_hooks` is told whether one is set (a compiled step's C++ attention op then calls back into Python)
        self.observer_hooks: list[Callable[[bool], None]] = []
        self._decode_observer: Callable[..., None] | None = None
        self.slot_mapping: torch.Tensor | None = None
        self.num_single = 0
        self.block_tables: torch.Tensor | None = None  # [B, >= max blocks] int32 (registry op, observer)
        self.context_lens: torch.Tensor | None = None  # [B] int32 (registry op, observer)
        # the C++ decode kernel's (block tables [num_single, >= nb], context lens [num_single]), int32, made once
        # per step in `prepare` and shared by every layer's call (`ops.paged_decode_step`)
        self.decode_tables: tuple[torch.Tensor, torch.Tensor] | None = None
        # (block tables, context lens, num_single, `decode_tables` of them) where those are views of the two tensors
        # (a decode runner's static buffers, written in place every step): `prepare` reuses them for the same
        # tensors (kept alive here, so `is` compares them; one step's tables at most) and row count, without the
        # checks and slicing again
        self._decode_views: tuple = (None,) * 4
        # a step of decodes only, with the C++ rotary + KV write and decode kernels: `attend_rotary` calls both
        # kernels themselves, not through their Python wrappers (set in `prepare`, where `decodes_direct`: the
        # engine's kernels and dtype allow it, fixed at build; the compiled step's C++ op asks the same)
        self.direct_decode = False
        self.decodes_direct = (cpu_decode and not batch_invariant and rotary_kv_write is cpu_ops.rotary_kv_write
                               and k_caches[0].dtype in cpu_ops.DTYPES)  # (others: the wrappers)
        # SDPA decode, per chunk of rows: (rows, gathered block ids [rows * nb] or None for a view of
        # consecutive blocks, as_strided (size, stride, storage offset) of K/V as [rows, Hkv, L, D],
        # additive mask [rows, 1, 1, L] or None for a lone row at its exact length).
        self.decode_chunks: list[tuple[slice, torch.Tensor | None, tuple, torch.Tensor | None]] = []
        self.prefills: list[PrefillChunk] = []
        self.prefill_plan: list[PrefillChunk | PrefillRun] = []  # the prefills, equal fresh runs merged

    @property
    def decode_observer(self) -> Callable[..., None] | None:
        return self._decode_observer

    @decode_observer.setter
    def decode_observer(self, observer: Callable[..., None] | None) -> None:
        self._decode_observer = observer
        for hook in self.observer_hooks:
            hook(observer is not None)

    def prepare(self, *, slot_mapping: torch.Tensor, num_single: int, block_tables: torch.Tensor | None,
                context_lens: torch.Tensor | None, max_context_len: int, prefills: list[PrefillChunk],
                first_block: int | None = None) -> None:
        """Set this step's metadata. block_tables [B, >= nb] and context_lens [B] describe the
        `num_single` one-token rows; `max_context_len` is the longest of their contexts. `first_block`:
        a lone row whose blocks are first_block, first_block + 1, ... (read as a view)."""
        self.slot_mapping = slot_mapping
        self.num_single = num_single
        self.prefills = prefills
        self.block_tables = block_tables
        self.context_lens = context_lens
        self.max_context_len = max_context_len
        self.decode_chunks = []
        self.decode_tables = None
        self.direct_decode = False
        self.prefill_plan = [] if self.batch_invariant or self.prefill_op else _plan_prefills(prefills)
        self.prefill_call = self._prefill_call(prefills) if self.prefill_op and prefills else None
        if self.batch_invariant:
            self._prepare_invariant(num_single, block_tables, context_lens, max_context_len)
        elif num_single and self.cpu_decode:
            cached = self._decode_views
            if cached[0] is block_tables and cached[1] is context_lens and cached[2] == num_single:
                self.decode_tables = cached[3]  # (a decode runner's static buffers again: the same views)
            else:
                self.decode_tables = tables = cpu_ops.decode_tables(block_tables[:num_single],
                                                                    context_lens[:num_single])
                views = (tables[0].data_ptr() == block_tables.data_ptr()
                         and tables[1].data_ptr() == context_lens.data_ptr())
                self._decode_views = (block_tables, context_lens, num_single, tables) if views else (None,) * 4
            self.direct_decode = not prefills and self.decodes_direct
        elif num_single and self.decode_op is None:
            self._prepare_decode(num_single, block_tables, context_lens, max_context_len, first_block)

    def _prefill_call(self, prefills: list[PrefillChunk]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`prefill_op`'s metadata: chunk i's row of the table holds its sequence's blocks (a chunk that starts
        its sequence: the blocks its k/v were just written to, every block_size-th slot of `slot_mapping`)."""
        dev, bs = self.slot_mapping.device, self.block_size
        blocks = [self.slot_mapping[c.start:c.end:bs] // bs if c.block_ids is None else c.block_ids for c in prefills]
        table = torch.zeros((len(prefills), max(len(b) for b in blocks)), dtype=torch.int32, device=dev)
        for i, b in enumerate(blocks):
            table[i, :len(b)] = b
        first = prefills[0].start
        cu_seqlens = torch.tensor([0] + [c.end - first for c in prefills], dtype=torch.int32, device=dev)
        context_lens = torch.tensor([c.context_len for c in prefills], dtype=torch.int32, device=dev)
        return table, cu_seqlens, context_lens

    def _prepare_invariant(self, B: int, block_tables: torch.Tensor | None, context_lens: torch.Tensor | None,
                           max_context_len: int) -> None:
        self.path = (B > 0, any(c.block_ids is None for c in self.prefills),
                     any(c.block_ids is not None for c in self.prefills))
        if self.native_invariant:
            self._prepare_native(B, block_tables, context_lens)
            return
        bs = self.block_size
        # decode rows in groups of DECODE_GROUP, each padded to its own longest context (the runner
        # orders rows by context length); a query's result does not depend on its group. Keys are
        # gathered by whole cache blocks (a copy of 4 KiB rows, ~1.7x faster than by slot here); key
        # positions past a row's context read whatever block the table gives them (a -1 entry: block 0;
        # past the table: its last column), finite values that attention masks.
        self.invariant_decode = []
        lens = context_lens[:B].tolist() if B else []
        for a in range(0, B, DECODE_GROUP):
            b = min(B, a + DECODE_GROUP)
            length = invariant.padded_length(max(lens[a:b]))
            columns = torch.arange(-(-length // bs), device=block_tables.device).clamp(max=block_tables.shape[1] - 1)
            blocks = block_tables[a:b][:, columns].long().clamp(min=0).reshape(-1)
            self.invariant_decode.append((a, b, blocks, length, context_lens[a:b].long() - 1))
        self.invariant_prefills = []
        for c in self.prefills:
            pos = torch.arange(c.context_len - (c.end - c.start), c.context_len, device=self.slot_mapping.device)
            slots = None if c.block_ids is None else invariant.paged_slots(c.block_ids[None], c.context_len, bs)[0]
            self.invariant_prefills.append((slots, pos))

    def _prepare_native(self, B: int, block_tables: torch.Tensor | None, context_lens: torch.Tensor | None) -> None:
        """The step's table rows and positions for `invariant.paged_attention`: decode row b reads its own
        table row at position context_len - 1 (a padding row, context 0, gets zeros); a prefill chunk's
        queries read one row of its sequence's blocks (a chunk that starts its sequence: the blocks its k/v
        were just written to, from `slot_mapping`), at the chunk's positions."""
        dev, bs = self.slot_mapping.device, self.block_size
        if not B and not self.prefills:  # an empty step
            self.invariant_call = None
            return
        rows, positions, chunk_blocks = [], [], []
        if B:
            rows.append(torch.arange(B, dtype=torch.int32, device=dev))
            positions.append(context_lens[:B].to(torch.int32) - 1)
        for i, c in enumerate(self.prefills):
            n = c.end - c.start
            chunk_blocks.append(self.slot_mapping[c.start:c.end:bs] // bs if c.block_ids is None else c.block_ids)
            rows.append(torch.full((n,), B + i, dtype=torch.int32, device=dev))
            positions.append(torch.arange(c.context_len - n, c.context_len, dtype=torch.int32, device=dev))
        if not chunk_blocks:
            table = block_tables[:B].to(torch.int32)
        else:
            width = max([len(b) for b in chunk_blocks] + ([block_tables.shape[1]] if B else []))
            table = torch.full((B + len(chunk_blocks), width), -1, dtype=torch.int32, device=dev)
            if B:
                table[:B, :block_tables.shape[1]] = block_tables[:B]
            for i, blocks in enumerate(chunk_blocks):
                table[B + i, :len(blocks)] = blocks
        self.invariant_call = (table, rows[0] if len(rows) == 1 else torch.cat(rows),
                               positions[0] if len(positions) == 1 else torch.cat(positions))

    def _prepare_decode(self, B: int, block_tables: torch.Tensor, context_lens: torch.Tensor,
                        max_context_len: int, first_block: int | None) -> None:
        bs, Hkv, D = self.block_size, self.num_kv_heads, self.head_dim
        token = Hkv * D  # elements per cached token
        if B == 1:  # its exact context, unmasked
            size, stride = (1, Hkv, max_context_len, D), (0, D, token, 1)
            if first_block is not None:
                self.decode_chunks = [(slice(0, 1), None, (size, stride, first_block * bs * token), None)]
            else:
                blocks = block_tables[0, :-(-max_context_len // bs)].long()
                self.decode_chunks = [(slice(0, 1), blocks, (size, stride, 0), None)]
            return
        lens = context_lens[:B].tolist()
        row_bytes = 2 * -(-max_context_len // bs) * bs * token * self.k_caches[0].element_size()
        rows = max(1, min(B, DECODE_CHUNK_BYTES // row_bytes))
        max_len = -(-max_context_len // bs) * bs
        positions = torch.arange(max_len, device=context_lens.device)
        mask = torch.zeros(B, max_len, dtype=self.k_caches[0].dtype, device=context_lens.device)
        mask.masked_fill_(positions[None, :] >= context_lens[:B, None], float("-inf"))
        tables = block_tables[:B].long()
        for a in range(0, B, rows):
            b = min(B, a + rows)
            nb = -(-max(lens[a:b]) // bs)
            L = nb * bs
            view = ((b - a, Hkv, L, D), (L * token, D, token, 1), 0)
            self.decode_chunks.append((slice(a, b), tables[a:b, :nb].reshape(-1), view, mask[a:b, None, None, :L]))

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               scale: float) -> torch.Tensor:
        i = layer_idx - self.first_layer
        k_flat, v_flat = self._k_flat[i], self._v_flat[i]
        k_flat.index_copy_(0, self.slot_mapping, k)
        v_flat.index_copy_(0, self.slot_mapping, v)
        if self.batch_invariant:
            return self._attend_invariant(i, q, k, v, scale)
        return self._attend_stored(i, q, k, v, scale)

    def attend_rotary(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, *, scale: float) -> torch.Tensor:
        """`attend` of q and k before rotary (cos / sin [T, D // 2]): the fused op rotates them and writes the
        rotated k and v into the cache in one pass; the rotated k is materialised only for a step with prefill
        chunks that SDPA attends (their fresh sequences attend over their own k; `prefill_op` reads the cache)."""
        i = layer_idx - self.first_layer
        if self.direct_decode and self.decode_observer is None and not q.requires_grad:
            # a decode step's two C++ kernels called directly (the compiled decode step's every layer): ~5 us a call
            # less than through the wrappers, whose checks the kernels repeat; a call either kernel refuses goes
            # through the wrappers below, which adapt it or name the problem (both kernels write the same bits again)
            kc, vc, ext = self.k_caches[i], self.v_caches[i], cpu_ops.extension()
            try:
                q_rot, _ = ext.rotary_kv_write(q, k, v, cos, sin, self.slot_mapping, kc, vc, False)
                if q.shape[0] == self.num_single:  # (the decode kernel's rows are its tables', unchecked)
                    return ext.paged_decode_attention(q_rot, kc, vc, *self.decode_tables, scale,
                                                      self.max_context_len)
                return self._attend_stored(i, q_rot, None, v, scale)
            except RuntimeError:
                pass
        q, k = self.rotary_kv_write(q, k, v, cos, sin, self.slot_mapping, self.k_caches[i], self.v_caches[i],
                                    return_k=bool(self.prefills) and self.prefill_op is None)
        return self._attend_stored(i, q, k, v, scale)

    def _attend_stored(self, i: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor,
                       scale: float) -> torch.Tensor:
        """Attention of the step's queries once their k and v are in layer i's cache (k may be None in a step
        without prefill chunks or with `prefill_op`)."""
        nd = self.num_single
        if not self.prefills:
            return self._decode(i, q, scale)
        kc, vc = self.k_caches[i], self.v_caches[i]
        if self.prefill_call is not None:  # every chunk in one call, its keys read in the cache
            prefill = self.prefill_op(q[nd:], kc, vc, *self.prefill_call, scale)
            return torch.cat([self._decode(i, q[:nd], scale), prefill]) if nd else prefill
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self._decode(i, q[:nd], scale)
        group = q.shape[1] // v.shape[1]
        for c in self.prefill_plan:
            # 4-D inputs with repeated KV heads keep SDPA on its fused kernel (3-D inputs or
            # enable_gqa fall back to the unfused math path on CPU, about 2x slower here).
            if isinstance(c, PrefillRun) or c.block_ids is None:  # fresh sequences: their own k/v, causal
                count = c.count if isinstance(c, PrefillRun) else 1
                out[c.start:c.end] = _fresh_causal(q[c.start:c.end], k[c.start:c.end], v[c.start:c.end],
                                                   count=count, group=group, scale=scale)
                continue
            qs = q[c.start:c.end].transpose(0, 1)[None]  # [1, Hq, n, D]
            n, ctx = c.end - c.start, c.context_len
            ks = kc[c.block_ids].view(-1, self.num_kv_heads, self.head_dim)[:ctx]
            vs = vc[c.block_ids].view(-1, self.num_kv_heads, self.head_dim)[:ctx]
            if group > 1:
                ks, vs = ks.repeat_interleave(group, dim=1), vs.repeat_interleave(group, dim=1)
            q_pos = torch.arange(ctx - n, ctx, device=q.device)
            mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]  # [n, ctx]
            o = F.scaled_dot_product_attention(qs, ks.transpose(0, 1)[None], vs.transpose(0, 1)[None],
                                               attn_mask=mask, scale=scale)
            out[c.start:c.end] = o[0].transpose(0, 1)
        return out

    def _attend_invariant(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          scale: float) -> torch.Tensor:
        """Every query through `invariant.attention` over its sequence's keys from position 0."""
        if self.native_invariant:
            if self.invariant_call is None:
                return torch.empty_like(q)
            table, rows, positions = self.invariant_call
            return invariant.paged_attention(q, self.k_caches[i], self.v_caches[i], table, rows, positions,
                                             scale=scale)
        out = torch.empty_like(q)
        k_flat, v_flat = self._k_flat[i], self._v_flat[i]
        kc, vc = self.k_caches[i], self.v_caches[i]
        kc, vc = kc.view(kc.shape[0], -1), vc.view(vc.shape[0], -1)  # one row per cache block
        token = (self.num_kv_heads, self.head_dim)
        for a, b, blocks, length, pos in self.invariant_decode:
            kd = kc.index_select(0, blocks).view(b - a, -1, *token)[:, :length]
            vd = vc.index_select(0, blocks).view(b - a, -1, *token)[:, :length]
            out[a:b] = invariant.attention(q[a:b], kd, vd, pos, scale=scale)
        for c, (slots, pos) in zip(self.prefills, self.invariant_prefills):
            if slots is None:  # the chunk starts its sequence: its own k/v are positions 0..n-1
                ks, vs = k[c.start:c.end], v[c.start:c.end]
            else:
                ks, vs = k_flat.index_select(0, slots), v_flat.index_select(0, slots)
            out[c.start:c.end] = invariant.sequence_attention(q[c.start:c.end], ks, vs, pos, scale=scale)
        return out

    def _decode(self, i: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        """One query token per sequence: q [B, Hq, D] -> [B, Hq, D]."""
        B, Hq, D = q.shape
        if self.cpu_decode:
            out = cpu_ops.paged_decode_step(q, self.k_caches[i], self.v_caches[i], *self.decode_tables, scale,
                                            self.max_context_len)
        elif self.decode_op is not None:
            out = self.decode_op(q, self.k_caches[i], self.v_caches[i], self.block_tables[:B],
                                 self.context_lens[:B], scale)
        else:
            kc, vc = self.k_caches[i], self.v_caches[i]
            qg = q.view(B, self.num_kv_heads, Hq // self.num_kv_heads, D)
            whole = len(self.decode_chunks) == 1
            outs = []
            for rows, blocks, (size, stride, offset), mask in self.decode_chunks:
                if blocks is None:
                    k, v = kc.as_strided(size, stride, offset), vc.as_strided(size, stride, offset)
                else:  # index_select of flat block ids is ~1.7x faster than kc[blocks[B, nb]]
                    k = kc.index_select(0, blocks).as_strided(size, stride)
                    v = vc.index_select(0, blocks).as_strided(size, stride)
                outs.append(F.scaled_dot_product_attention(qg if whole else qg[rows], k, v, attn_mask=mask,
                                                           scale=scale))
            out = (outs[0] if len(outs) == 1 else torch.cat(outs)).view(B, Hq, D)
        if self.decode_observer is not None:
            self.decode_observer(i + self.first_layer, q, self.k_caches[i], self.v_caches[i],
                                 self.block_tables[:B], self.context_lens[:B], scale, out)
        return out
