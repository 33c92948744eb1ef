"""Runs one scheduled step on the policy model: the paged KV pool, the flat batch, the graph cache.

The model is the trainer's own `CausalLM` (same parameter tensors, never copied). Its KV pool is one
[num_blocks, block_size, num_kv_heads, head_dim] tensor per layer for k and for v (on CPU with
`cpu_huge_pages`, views of one buffer on 2 MiB pages: `_huge_page_kv_pool`), zero-initialised so
that stale or padding slots always hold finite values. A step whose sequences each compute one token
goes through the graph cache (padded to a bucket; on CPU with `compile_decode`, each bucket's step
compiled once: `compiled_decode.py`); any step with a longer prefill chunk runs eagerly on the exact
flat batch. Only rows that produce a token (a sequence's last uncomputed position) reach the
LM head, and in an eager step the last layer's attention output projection, MLP and the final norm.
A decode step that continues the last one (the same sequences minus those that stopped, as the engine
reports after sampling) takes its inputs from the last step's rows instead of reading the sequences
(`_continue_decode`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import weakref
from operator import attrgetter, itemgetter
from typing import TYPE_CHECKING

import numpy as np
import torch

from rl_engine.inference.attention import PagedAttention, PrefillChunk
from rl_engine.inference.config import EngineConfig
from rl_engine.inference.graph_cache import CudaGraphRunner, DecodeRunner, GraphCache, StaticInputs, default_buckets
from rl_engine.inference.latent_attention import PagedLatentAttention
from rl_engine.inference.sampler import DeferredLogits
from rl_engine.inference.sequence import SchedulerOutput, Sequence, is_remainder, without_rows

if TYPE_CHECKING:
    from rl_engine.policy import CausalLM

logger = logging.getLogger(__name__)


_num_computed = attrgetter("num_computed_tokens")
_token_ids = attrgetter("token_ids")
_block_table = attrgetter("block_table")
_last = itemgetter(-1)


def _rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """t's rows `rows` (ascending): all of t, a leading slice, or an index."""
    n = len(rows)
    if n == t.shape[0]:
        return t
    return t[:n] if rows[-1] == n - 1 else t[torch.tensor(rows, device=t.device)]


def kv_block_bytes(spec: dict, block_size: int) -> int:
    """Bytes of one block over all layers: K and V, or one latent row per token for MLA."""
    elem = torch.empty((), dtype=spec["dtype"]).element_size()
    copies = 1 if spec["kv_lora_rank"] else 2
    return copies * spec["num_layers"] * block_size * spec["num_kv_heads"] * spec["head_dim"] * elem


# Bytes between the end of one KV pool tensor and the start of the next in the huge-page pool: an odd number of
# 4 KiB pages plus a cache line, so that a block's K and V, and one layer's and the next's, do not sit at the same
# offset in their 2 MiB pages (the same L2 sets; `_huge_page_kv_pool`)
KV_POOL_STAGGER = 17 * 4096 + 64


def _huge_page_kv_pool(shape: tuple[int, ...], dtype: torch.dtype, count: int) -> list[torch.Tensor] | None:
    """`count` zeroed CPU tensors of `shape`, the KV pool's layers (k then v), as views of one buffer on 2 MiB pages
    (`host_memory.huge_page_buffer`: a fresh anonymous mapping, zero when first read), each `KV_POOL_STAGGER` bytes
    past the end of the one before; None where huge pages cannot be had (the reason logged once there).

    Its pages are faulted in as the engine's steps first reach their blocks (~5 ms a 2 MiB page on this VM: faulting a
    1 GiB pool in at build took ~2.4 s against torch.zeros' ~0.6 s, so it is not done; a pool larger than the memory
    left fails when reached, not here). With the block manager handing out the lowest free ids after each reset, a run's
    KV stays on the pages the last run faulted in; with its old first-in-first-out reset, runs cycled through the whole
    pool and kept faulting (~3.5M batch 64 2-4% slower than the allocator's pages). Without the stagger the ~50M model's
    tensors (exactly 64 MiB each) all start on a 2 MiB boundary, and its batch-64 runs measured 1.5-3% slower than the
    allocator's pages; with it 1.01x (generate.py batch 64, 1 thread, one engine each way alternated in one process,
    5 pairs)."""
    from rl_engine.kernels.cpu import host_memory

    elem = torch.empty((), dtype=dtype).element_size()
    nbytes = elem * int(np.prod(shape))
    slot = -(-nbytes // 64) * 64 + KV_POOL_STAGGER
    buf = host_memory.huge_page_buffer(slot * (count - 1) + nbytes)
    if buf is None:
        return None
    with torch.inference_mode():
        return [buf[i * slot:i * slot + nbytes].view(dtype).view(shape) for i in range(count)]


class ModelRunner:
    def __init__(self, model: CausalLM, *, config: EngineConfig, max_model_len: int) -> None:
        if not (model.is_first_stage and model.is_last_stage):
            raise ValueError("the inference engine needs every layer on this rank (one pipeline stage); "
                             f"this model holds layers {model.layer_range}")
        self.model = model
        self.config = config
        self.device = next(model.parameters()).device
        spec = model.kv_cache_spec()
        bs = self.block_size = config.block_size
        self.max_blocks_per_seq = -(-max_model_len // bs)
        block_bytes = kv_block_bytes(spec, bs)
        if config.num_kv_blocks is not None:
            num_blocks = config.num_kv_blocks
        else:
            num_blocks = min(config.kv_cache_memory // block_bytes, config.max_num_seqs * self.max_blocks_per_seq + 1)
            if num_blocks < 2:
                raise ValueError(f"kv_cache_memory={config.kv_cache_memory} bytes holds {num_blocks} KV block(s); "
                                 f"one block of {bs} tokens needs {block_bytes} bytes and at least 2 are needed")
        self.num_blocks = num_blocks
        shape = (num_blocks, bs, spec["num_kv_heads"], spec["head_dim"])
        layers = range(spec["num_layers"])
        self.kv_bytes_per_token = block_bytes // bs
        latent = spec["kv_lora_rank"] > 0
        count = len(layers) * (1 if latent else 2)  # the k caches, then the v caches
        pool = None  # CPU with cpu_huge_pages: views of one buffer on 2 MiB pages, where they can be had
        if self.device.type == "cpu" and config.cpu_huge_pages:
            pool = _huge_page_kv_pool(shape, spec["dtype"], count)
        with torch.inference_mode():
            if pool is None:
                pool = [torch.zeros(shape, dtype=spec["dtype"], device=self.device) for _ in range(count)]
        self.k_caches = pool[:len(layers)]
        self.v_caches = pool[len(layers):]
        logger.info("KV pool: %d blocks of %d tokens (%.1f MiB, %d bytes per token%s)", num_blocks, bs,
                    num_blocks * block_bytes / 2**20, self.kv_bytes_per_token, ", latent (MLA)" if latent else "")

        # Under model.batch_invariant decode runs eagerly (the invariant attention gathers per step).
        use_graphs = (self.device.type == "cuda" and not config.enforce_eager and not model.config.is_moe
                      and not model.batch_invariant)
        decode_op = None
        cpu_decode = False
        if use_graphs or (self.device.type == "cpu" and not model.batch_invariant):
            from rl_engine.kernels import registry

            # An engine that would not take the C++ kernel (cpu_decode_kernel=False and not asked for) does not
            # resolve the op: resolving it on CPU loads the extension, built first on a cold cache (~30-60 s).
            if use_graphs or config.cpu_decode_kernel or registry.cpu_kernel_requested("paged_decode_attention"):
                resolution = registry.default_registry().resolution("paged_decode_attention", self.device)
                cpu_decode = resolution.backend == "cpu"  # the C++ kernel; else SDPA (CPU) or the op (CUDA)
                if use_graphs or cpu_decode:
                    decode_op = resolution.fn
            else:
                logger.info("paged decode attention: the torch path (cpu_decode_kernel=False)")
        rotary_kv_write = None  # the C++ rotary + KV cache write, where the registry picks it (its reason logged)
        if self.device.type == "cpu" and not model.batch_invariant and not latent:
            from rl_engine.kernels import registry

            # like the decode kernel: an engine with cpu_decode_kernel=False resolves it only when asked for
            if config.cpu_decode_kernel or registry.cpu_kernel_requested("rotary_kv_write"):
                resolution = registry.default_registry().resolution("rotary_kv_write", self.device)
                if resolution.backend == "cpu":
                    rotary_kv_write = resolution.fn
        prefill_op = None  # the C++ prefill attention (every chunk of a step in one call), gated likewise
        if self.device.type == "cpu" and not model.batch_invariant and not latent:
            from rl_engine.kernels import registry

            if config.cpu_decode_kernel or registry.cpu_kernel_requested("paged_prefill_attention"):
                resolution = registry.default_registry().resolution("paged_prefill_attention", self.device)
                if resolution.backend == "cpu":
                    prefill_op = resolution.fn
        if latent and model.batch_invariant:
            raise ValueError("model.batch_invariant=true: the latent (MLA, deepseek_v3) paged attention has no "
                             "batch-invariant implementation; turn model.batch_invariant off for this model")
        if latent:
            self.attn = PagedLatentAttention(self.k_caches, first_layer=model.layer_range[0],
                                             kv_lora_rank=spec["kv_lora_rank"])
        else:
            self.attn = PagedAttention(self.k_caches, self.v_caches, first_layer=model.layer_range[0],
                                       decode_op=decode_op, batch_invariant=model.batch_invariant,
                                       cpu_decode=cpu_decode, rotary_kv_write=rotary_kv_write,
                                       prefill_op=prefill_op)
        buckets = config.graph_batch_sizes or default_buckets(config.max_num_seqs)
        inputs = StaticInputs(max(buckets), max_blocks=self.max_blocks_per_seq, device=self.device)
        # What the static block tables' rows hold (`_write_block_tables`): each row's block-table list (its id, 0
        # for none) and how many of its blocks were written; the lists themselves are kept so the ids stay theirs.
        self._table_ids = np.zeros(max(buckets), dtype=np.int64)
        self._table_widths = np.zeros(max(buckets), dtype=np.int64)
        self._table_lists: list[list[int]] = []
        self._rows = np.arange(max(buckets))  # (a decode step's row indices: a slice of it)
        # The persistent decode batch (`_continue_decode`): what the last decode step ran (its scheduled sequences,
        # them in row order, their positions and block tables), and what the engine reported after it (`decoded`:
        # the sampled tokens and the rows that stopped). Both are taken, and cleared, by every step (and by
        # `forget_decoded`, once the engine has no request left).
        self._last_decode: tuple[list[Sequence], list[Sequence], np.ndarray, np.ndarray] | None = None
        self._decoded: tuple[list[int], list[int]] | None = None
        self._continue_inputs = None  # (`continue_decode_inputs` for this device, resolved at first use)
        graph_pool = torch.cuda.graph_pool_handle() if use_graphs else None

        runner_class = DecodeRunner
        if config.compile_decode and self.device.type == "cpu":
            from rl_engine.inference.compiled_decode import CompiledDecodeRunner, check_compilable

            check_compilable(model, latent=latent)
            runner_class = CompiledDecodeRunner
        elif config.compile_decode:
            logger.warning("compile_decode=True is ignored on %s (CUDA captures a graph per bucket instead)",
                           self.device)

        self._direct_decode = None  # (built below, once the packed weights are registered; runners are made lazily)

        def make_runner(batch_size: int) -> DecodeRunner:
            if not use_graphs:
                runner = runner_class(batch_size, inputs=inputs, model=model, attn=self.attn)
                if runner_class is DecodeRunner:  # (eager: the direct forward where it serves the model)
                    runner.direct = self._direct_decode
                return runner
            runner = CudaGraphRunner(batch_size, inputs=inputs, model=model, attn=self.attn)
            return self._captured(runner, pool=graph_pool)  # every bucket's graph shares one memory pool

        self.graphs = GraphCache(buckets, make_runner)
        # CPU: linears read prepacked weights in this runner's steps (fp32: the small-M GEMM's panels, bf16:
        # oneDNN's layout; kernels/cpu/packed_linear.py; packed at first use, repacked when they change, dropped
        # when the last runner that registered them is collected)
        self.packed_weights: list[torch.Tensor] = []
        self._reading_packed = contextlib.nullcontext
        # eager CPU decode steps return their logits as a `DeferredLogits` (set by the engine, which reads them
        # through its sampler: an all-greedy step without log-probs then skips most of the head's product)
        self.defer_logits = False
        if self.device.type == "cpu" and config.cpu_prepack_weights and not model.batch_invariant:
            from rl_engine.kernels.cpu import packed_linear

            self.packed_weights = packed_linear.register([p for p in model.parameters() if p.dim() == 2],
                                                         batch_size=config.max_num_seqs,
                                                         huge_pages=config.cpu_huge_pages)
            if self.packed_weights:
                self._reading_packed = packed_linear.reading
                weakref.finalize(self, packed_linear.release, self.packed_weights)
        # CPU eager decode steps: the model's forward as direct calls of its C++ kernels, where they serve it
        # (`direct_decode.py`; handed to each eager bucket's runner as it is made)
        if self.device.type == "cpu" and not config.compile_decode and self.packed_weights:
            from rl_engine.inference.direct_decode import DirectDecode

            self._direct_decode, reason = DirectDecode.build(model, self.attn, packed=self.packed_weights)
            if self._direct_decode is None:
                logger.info("eager decode steps run the model's forward: %s", reason)
        self.threads = None  # CPU: torch's thread count follows the free cores (EngineConfig.cpu_threads)
        if self.device.type == "cpu" and config.cpu_threads == "auto":
            from rl_engine.kernels.cpu.threads import FreeCoreThreads

            self.threads = FreeCoreThreads()
        # hidden_sink(layout, hidden): sees every step's final hidden states [rows, H] with the layout
        # [(seq, first position, rows)] in row order (the MTP drafter reads the target's states).
        self.hidden_sink = None
        # `_run_flat` asks the model for the sampled rows' final hidden states only (not under sequence
        # parallelism, where a rank holds a slice of the rows)
        self._select_rows = not model.groups.sequence_parallel
        # After a decode step in which every row samples: each sampled sequence's length, the position of the token it
        # samples, in the order of the returned sequences (a view of the step's context lengths); else None
        self.sampled_lengths: np.ndarray | None = None
        if use_graphs:
            with torch.inference_mode():
                self.graphs.build_all()  # capture every bucket up front

    def execute(self, sched: SchedulerOutput, *,
                record_routing: bool = False) -> tuple[torch.Tensor | None, list[Sequence]]:
        """Run one step. Returns logits of the sequences that produce a token, and those sequences in
        the same order: one row each, or 1 + num_draft_tokens consecutive rows for one verifying drafts."""
        with self._reading_packed():
            return self._execute(sched, record_routing=record_routing)

    def _execute(self, sched: SchedulerOutput, *,
                 record_routing: bool) -> tuple[torch.Tensor | None, list[Sequence]]:
        seqs, nd = sched.seqs, sched.num_single
        if self.threads is not None:
            self.threads.poll()
        routing = None
        if record_routing:
            from rl_engine.policy import RoutingRecord

            routing = RoutingRecord(mode="record")
        runner = self.graphs.lookup(nd) if nd == len(seqs) else None
        self.sampled_lengths = None
        last, decoded = self._last_decode, self._decoded
        self._last_decode = self._decoded = None
        logits = None  # a compiled decode step computes every row's logits in its graph
        if runner is not None:
            fast = None
            if last is not None and decoded is not None and routing is None:
                fast = self._continue_decode(runner, seqs, last, decoded)
            if fast is None:
                fast = self._run_decode(runner, seqs, routing)
            hidden, logits, sample_rows, sample_seqs, layout = fast
        else:
            hidden, sample_rows, sample_seqs, layout = self._run_flat(sched, routing)
        if self.hidden_sink is not None:
            self.hidden_sink(layout, hidden)
        if routing is not None:
            self._store_routing(sched, routing)
        if not sample_seqs:
            return None, []
        if logits is not None:
            return _rows(logits, sample_rows), sample_seqs
        # (_run_flat computed the sampled rows' hidden states only: sample_rows None)
        rows = hidden if sample_rows is None else _rows(hidden, sample_rows)
        if self.defer_logits and runner is not None:  # an eager decode step: the sampler computes what it needs
            return DeferredLogits(self.model, rows, self._reading_packed), sample_seqs
        return self.model.compute_logits(rows), sample_seqs

    def decoded(self, tokens: list[int], stopped: list[int]) -> None:
        """After a decode step in which every row sampled (the engine's `_emit_decode`): each row's sampled token, in
        the order of the sequences `execute` returned, and the rows whose sequence stopped (ascending). Read by the
        next step only (`_continue_decode`)."""
        if self._last_decode is not None and len(tokens) == len(self._last_decode[1]):
            self._decoded = (tokens, stopped)

    def forget_decoded(self) -> None:
        """Drop the last decode step's sequences and tables and the engine's report on them: the next step builds
        its inputs afresh (the engine's call once no request is left, so finished and aborted sequences are not
        kept until a next step)."""
        self._last_decode = self._decoded = None

    def weights_updated(self) -> None:
        """The model's weights changed (possibly bypassing their version counters): repack at next use."""
        if self.packed_weights:
            from rl_engine.kernels.cpu import packed_linear

            packed_linear.invalidate(self.packed_weights)

    def copy_kv_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Every layer's KV cache: block dst <- block src for each (src, dst) of `pairs` (forked samples' copies of
        their leader's partial prompt block); every dst differs from every src."""
        src = torch.tensor([p[0] for p in pairs], device=self.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.device)
        with torch.inference_mode():
            for cache in itertools.chain(self.k_caches, self.v_caches):
                cache.index_copy_(0, dst, cache.index_select(0, src))

    def compile_seconds(self) -> dict[int, float]:
        """compile_decode: bucket -> seconds its compiling steps took (compilation included), summed over the
        torch thread counts it compiled at (a step is compiled once per count, `compiled_decode`)."""
        return {b: r.compile_seconds for b, r in sorted(self.graphs.runners.items())
                if getattr(r, "compile_seconds", None) is not None}

    def _run_decode(self, runner: DecodeRunner, seqs: list[Sequence], routing):
        """Fill the runner's first rows with one token per sequence, pad the rest, run it."""
        n, bs = len(seqs), self.block_size
        sched_seqs = seqs
        if n > 2 and routing is None:
            # Shortest context first: attention pads each chunk of rows to its longest context, so
            # rows of similar length should share chunks. (Recorded routing is stored in step order.)
            seqs = sorted(seqs, key=_num_computed)  # (stable: the order persists between steps)
        computed = list(map(_num_computed, seqs))
        token_lists = list(map(_token_ids, seqs))
        tables = list(map(_block_table, seqs))
        # Each row's token is its sequence's first uncomputed one, at most its last (len >= computed + 1): when the
        # lengths add up to computed + 1 each, every row's token is the last and every row samples.
        all_sample = sum(map(len, token_lists)) == sum(computed) + n
        runner.pad(n)
        runner.np_input_ids[:n] = (list(map(_last, token_lists)) if all_sample else
                                   [t[p] for t, p in zip(token_lists, computed)])
        positions = runner.np_positions[:n]
        positions[:] = computed
        runner.np_context_lens[:n] = positions + 1
        self._write_block_tables(runner.np_block_tables, tables)
        # each row's slot: its position's block (from the table just written) * block_size + the offset in it
        block_index, offsets = np.divmod(positions, bs)
        slots = runner.np_slot_mapping[:n]
        np.multiply(runner.np_block_tables[self._rows[:n], block_index], bs, out=slots, dtype=np.int64)
        slots += offsets
        first_block = None
        if n == 1:  # a fresh pool hands out consecutive blocks: attention then reads a view
            table = seqs[0].block_table
            if table == list(range(table[0], table[0] + len(table))):
                first_block = table[0]
        hidden, logits = runner.run(max_context_len=max(computed) + 1, routing=routing, first_block=first_block)
        if all_sample:
            sample_rows, sample_seqs = list(range(n)), seqs
            self.sampled_lengths = runner.np_context_lens[:n]  # computed + 1 = len(token_ids)
        else:
            sample_rows = [i for i, (t, p) in enumerate(zip(token_lists, computed)) if p + 1 == len(t)]
            sample_seqs = [seqs[i] for i in sample_rows]
        layout = None if self.hidden_sink is None else [(s, p, 1) for s, p in zip(seqs, computed)]
        if all_sample and n > 2 and routing is None and self.hidden_sink is None:
            width = int(positions[-1]) // bs + 1  # (sorted: the last row's context is the longest)
            self._last_decode = (sched_seqs, seqs, positions.copy(), runner.np_block_tables[:n, :width].copy())
        return hidden, logits, sample_rows, sample_seqs, layout

    def _continue_decode(self, runner: DecodeRunner, sched_seqs: list[Sequence], last, decoded):
        """`_run_decode` of a decode step that continues the last one (the persistent decode batch): when this step's
        sequences are exactly the last decode step's minus the rows that stopped (`decoded`), in the same order,
        each computes the token it sampled, at its last position + 1, and its block table is last step's (block
        tables change in place only by appending; a sequence whose blocks are freed or replaced leaves the running
        set), plus, for a row whose position starts a block, that block (appended by the scheduler). So the rows
        are last step's, compacted by the stopped rows, in the same order (`_run_decode`'s sort by computed tokens is
        stable and every row advanced by one), without reading the sequences' tokens, lengths or tables. Anything
        else that changed the batch (an admission, a preemption, an abort, a prefill chunk, a step that was not a
        decode step: `_execute` forgets the state at every step) fails the check: None, and `_run_decode` runs."""
        prev_sched, prev_seqs, prev_positions, prev_tables = last
        tokens, stopped = decoded
        n = len(sched_seqs)
        if (n <= 2 or self.hidden_sink is not None
                or not is_remainder(sched_seqs, prev_sched, [prev_seqs[i] for i in stopped])):
            return None
        seqs = without_rows(prev_seqs, stopped) if stopped else prev_seqs
        if self._continue_inputs is None:  # (the registry's for the runner's device: on CPU one C++ pass)
            from rl_engine.kernels import registry

            self._continue_inputs = registry.resolve("continue_decode_inputs", self.device)
        runner.pad(n)
        positions, tables = self._continue_inputs(tokens, stopped, prev_positions, prev_tables, seqs, self.block_size,
                                                  runner.np_input_ids, runner.np_positions, runner.np_context_lens,
                                                  runner.np_slot_mapping, runner.np_block_tables)
        self._table_ids[:] = 0  # (`_write_block_tables` writes every row next time)
        hidden, logits = runner.run(max_context_len=int(positions[-1]) + 1)
        self.sampled_lengths = runner.np_context_lens[:n]
        self._last_decode = (sched_seqs, seqs, positions, tables)
        return hidden, logits, list(range(n)), seqs, None

    def _captured(self, runner: CudaGraphRunner, *, pool) -> CudaGraphRunner:
        """Capture a bucket's graph. Its `pad(0)` makes the bucket's rows of the shared static block tables padding,
        so what `_write_block_tables` recorded about the rows is forgotten and the next step writes them whole (a
        bucket captured lazily, after decode steps ran, would otherwise leave their first blocks stale)."""
        runner.capture(pool=pool)
        self._table_ids[:] = 0
        return runner

    def _write_block_tables(self, np_tables: np.ndarray, tables: list[list[int]]) -> None:
        """Rows 0..n-1 of the static block tables (shared by every bucket) <- `tables`, writing only what changed
        since the last decode step: a row that holds the same block-table list as then (the list object, kept alive
        in `_table_lists` so that its id is not reused) needs only the blocks appended to it since. Block tables
        change in place only by appending (`BlockManager.allocate`); every other change gives the sequence a new
        list. Rows past n were overwritten by `pad`, so they are forgotten."""
        n = len(tables)
        ids = np.fromiter(map(id, tables), dtype=np.int64, count=n)
        widths = np.fromiter(map(len, tables), dtype=np.int64, count=n)
        same = ids == self._table_ids[:n]
        grown = np.flatnonzero(same & (widths != self._table_widths[:n]))
        for r in grown.tolist():  # (a few rows a step: one new block each, every block_size steps)
            start = int(self._table_widths[r])
            np_tables[r, start:widths[r]] = tables[r][start:]
        new = np.flatnonzero(~same)
        if len(new):  # one scatter of these rows' blocks (a per-row slice assignment costs ~1 us a row)
            new_tables = [tables[r] for r in new.tolist()] if len(new) < n else tables
            w = widths[new]
            flat = np.fromiter(itertools.chain.from_iterable(new_tables), dtype=np.int32, count=int(w.sum()))
            np_tables[np.repeat(new, w), np.arange(len(flat)) - np.repeat(np.cumsum(w) - w, w)] = flat
        self._table_ids[:n] = ids
        self._table_ids[n:] = 0
        self._table_widths[:n] = widths
        self._table_lists = tables

    def _run_flat(self, sched: SchedulerOutput, routing):
        seqs, nd, bs = sched.seqs, sched.num_single, self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        block_tables = context_lens = None
        max_ctx = 0
        if nd:
            singles = seqs[:nd]
            computed = [s.num_computed_tokens for s in singles]
            ids = [s.token_ids[p] for s, p in zip(singles, computed)]
            positions = list(computed)
            slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(singles, computed)]
            width = max(len(s.block_table) for s in singles)
            block_tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in singles],
                                        dtype=torch.int32, device=self.device)
            context_lens = torch.tensor([p + 1 for p in computed], dtype=torch.int32, device=self.device)
            max_ctx = max(computed) + 1
            sample_rows = [i for i, (s, p) in enumerate(zip(singles, computed)) if p + 1 == s.num_tokens]
        sample_seqs = [seqs[i] for i in sample_rows]
        prefills: list[PrefillChunk] = []
        row = nd
        for seq, n in zip(seqs[nd:], sched.num_new_tokens[nd:]):
            p, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            table = seq.block_table
            ids.extend(seq.token_ids[p:end])
            positions.extend(range(p, end))
            slots.extend([table[q // bs] * bs + q % bs for q in range(p, end)])
            block_ids = None
            if p > 0:
                block_ids = torch.tensor(table[:-(-end // bs)], dtype=torch.int64, device=self.device)
            prefills.append(PrefillChunk(row, row + n, end, block_ids))
            row += n
            if end == seq.num_tokens:  # a verify chunk's drafts need every row's logits (speculative)
                sample_rows.extend(range(row - 1 - seq.num_draft_tokens, row))
                sample_seqs.append(seq)
        dev = self.device
        slot_mapping = torch.tensor(slots, dtype=torch.int64, device=dev)
        self.attn.prepare(slot_mapping=slot_mapping, num_single=nd, block_tables=block_tables,
                          context_lens=context_lens, max_context_len=max_ctx, prefills=prefills)
        # Only the sampled rows' final hidden states are read (unless a hidden sink reads every row's): the last
        # layer computes its attention output projection and MLP, and the final norm, for those rows only
        # (`hidden_states(rows=...)`; every row's K/V is still written). A prefill step's chunks sample one row
        # each (or none), so that is most of a layer's matmuls skipped.
        rows = None
        if self.hidden_sink is None and self._select_rows and len(sample_rows) < len(ids):
            rows = torch.tensor(sample_rows, dtype=torch.int64, device=dev)
        hidden = self.model.hidden_states(torch.tensor(ids, dtype=torch.int64, device=dev),
                                          positions=torch.tensor(positions, dtype=torch.int64, device=dev),
                                          attn_context=self.attn, routing=routing, rows=rows)
        layout = [(s, s.num_computed_tokens, n) for s, n in zip(seqs, sched.num_new_tokens)]
        return hidden, None if rows is not None else sample_rows, sample_seqs, layout

    def _store_routing(self, sched: SchedulerOutput, routing) -> None:
        """Keep the experts chosen for each computed token ([n, num_moe_layers, k] per chunk)."""
        if not routing.topk_ids:
            return
        chosen = torch.stack([routing.topk_ids[layer] for layer in sorted(routing.topk_ids)], dim=1).cpu()
        row = 0
        for seq, n in zip(sched.seqs, sched.num_new_tokens):
            start = seq.num_computed_tokens
            if start == 0 or seq.routing is None:
                seq.routing = {}
            seq.routing[start] = chosen[row:row + n].clone()
            row += n


def continue_decode_inputs(tokens: list[int], stopped: list[int], prev_positions: np.ndarray, prev_tables: np.ndarray,
                           seqs: list[Sequence], block_size: int, input_ids: np.ndarray, positions: np.ndarray,
                           context_lens: np.ndarray, slot_mapping: np.ndarray,
                           block_tables: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A continued decode step's inputs (`ModelRunner._continue_decode`): the last decode step's rows (their
    positions `prev_positions` [m] and block tables `prev_tables` [m, w]) less the rows that `stopped` (ascending),
    in order; each computes the token it sampled (`tokens`, one per last row) at its last position + 1, and a row
    whose position starts a block gets that block from its sequence's block table (`seqs`: this step's rows).
    Writes rows 0..n-1 of the runner's `input_ids`, `positions`, `context_lens`, `slot_mapping` and `block_tables`;
    returns this step's (positions [n], block tables [n, width]), arrays of their own (the next step's `prev_*`).
    The registry's `continue_decode_inputs` reference (on CPU its C++ pass, `kernels/cpu/ops.py`)."""
    n = len(seqs)
    ids = np.fromiter(tokens, dtype=np.int64, count=len(prev_positions))
    if stopped:
        keep = np.ones(len(prev_positions), dtype=bool)
        keep[stopped] = False
        keep = np.flatnonzero(keep)
        new_positions, tables = prev_positions.take(keep), prev_tables.take(keep, axis=0)
        ids = ids.take(keep)
    else:
        new_positions, tables = prev_positions.copy(), prev_tables
    new_positions += 1
    block_index, offsets = np.divmod(new_positions, block_size)
    starts = np.flatnonzero(offsets == 0)  # rows whose position starts a block: its new block
    if len(starts):
        width = int(block_index[-1]) + 1  # (rows sorted by position: the last row's context is the longest)
        if width > tables.shape[1]:
            tables = np.concatenate([tables, np.zeros((n, width - tables.shape[1]), dtype=tables.dtype)], axis=1)
        elif not stopped:
            tables = tables.copy()  # (last step's arrays are not written)
        for r in starts.tolist():
            b = int(block_index[r])
            tables[r, b] = seqs[r].block_table[b]
    input_ids[:n] = ids
    positions[:n] = new_positions
    context_lens[:n] = new_positions + 1
    block_tables[:n, :tables.shape[1]] = tables
    slots = slot_mapping[:n]
    np.multiply(tables[np.arange(n), block_index], block_size, out=slots, dtype=np.int64)
    slots += offsets
    return new_positions, tables
