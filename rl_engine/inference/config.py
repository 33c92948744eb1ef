"""The engine's settings: one typed dataclass, validated where it is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rl_engine.inference.speculative.config import SpeculativeConfig


@dataclass(kw_only=True)
class EngineConfig:
    block_size: int = 16
    # KV pool size: `num_kv_blocks` if given, else as many blocks as `kv_cache_memory` bytes hold
    # (capped at what max_num_seqs sequences of max_model_len tokens could ever use).
    kv_cache_memory: int = 1 << 30
    num_kv_blocks: int | None = None
    max_num_seqs: int = 256  # sequences in one batch
    max_num_batched_tokens: int = 2048  # tokens in one step (prefill chunks + decodes)
    max_model_len: int | None = None  # default: the model's context length
    enable_prefix_caching: bool = True
    graph_batch_sizes: list[int] | None = None  # decode buckets; default 1, 2, 4, 8, 16, ... max_num_seqs
    enforce_eager: bool = False  # CUDA: never capture graphs
    # CPU: compile each decode bucket's step with torch.compile (static shapes, inductor C++), lazily on the
    # bucket's first use (seconds to a minute each; inductor caches on disk). Not with model.batch_invariant,
    # MoE or latent attention. False: the eager runner.
    compile_decode: bool = False
    seed: int = 0  # the engine's generator, used by requests without a seed
    record_routing: bool = False  # MoE: return the experts chosen for every processed token
    # vLLM-style dict or SpeculativeConfig: {"method": "ngram" | "draft_model", "num_speculative_tokens": k, ...}
    speculative_config: SpeculativeConfig | dict[str, Any] | None = None
    # CPU: "auto" lowers torch's thread count to the cores other processes leave free (re-measured every
    # 0.5 s, never above the count when the engine was built; kernels/cpu/threads.py); "fixed" keeps it.
    # A busy core makes every OpenMP barrier wait for a descheduled thread. Either way a small model's
    # decode steps run on one thread or all of them, whichever its first steps of their size measured
    # faster (threads.StepThreads; the count changes no bit of a step, so a run stays repeatable), and its
    # other small steps on one thread, the count restored after each.
    cpu_threads: str = "auto"
    # CPU: the engine's steps read a prepacked copy of each matmul weight (fp32: the small-M GEMM's panels,
    # bf16: oneDNN's layout; made at its first use, redone when the weight changes; kernels/cpu/packed_linear.py),
    # ~2x faster matmuls here, one more copy of the matmul weights in memory. Not with model.batch_invariant.
    # False: F.linear on the parameters. Engines serving an RL run (trainer, rollout workers) set False: the packed
    # products' fp32 rounding order took the ~40M model's behavior log-probs 1.2e-5..2.1e-5 from the trainer's
    # recompute (oneDNN; contract: 1e-5).
    cpu_prepack_weights: bool = True
    # CPU: the small-M GEMM's packed weights (fp32 panels, `cpu_prepack_weights`) of each engine sit in one arena
    # advised madvise(MADV_HUGEPAGE) before first written, so where transparent huge pages are `madvise` or `always`
    # they are on 2 MiB pages (a batch-64 decode step of the ~3.5M model reads ~3.5k 4 KiB pages of them, far beyond
    # the TLB; kernels/cpu/host_memory.py, packed_linear.py): generate.py batch 64, one engine each way alternated in
    # one process, 1 thread: ~3.5M greedy 1.04x, sampled 1.03-1.09x, ~50M 1.03x. The KV pool likewise: its layers' K
    # and V as views of one buffer on 2 MiB pages, staggered so that a block's K and V do not share cache sets
    # (model_runner._huge_page_kv_pool; the figures there, with the block manager's lowest-ids-first reset beside it).
    # Off Linux, where THP is `never` or madvise fails: the allocator's pages, the reason logged once. The same values
    # either way. False: each packed weight a tensor of its own, and a torch.zeros tensor each for the KV pool. (The
    # huge-page pool is claimed as its blocks are first reached, not at build: a pool larger than the memory left
    # fails then, mid-run, where torch.zeros fails in LLM(...); size kv_cache_memory / num_kv_blocks to the machine.)
    cpu_huge_pages: bool = True
    # CPU: decode attention by the C++ kernel that reads K/V in place in their blocks, and rotary fused with the
    # KV cache write by another (kernels/cpu, the registry's CPU defaults where they build; else the torch paths,
    # the reason logged). False: the torch paths (gather + SDPA; the model's rotary and index_copy_) unless a
    # C++ kernel is asked for explicitly (RL_ENGINE_CPU_KERNELS=1, an override).
    # Engines serving an RL run take `rollout.cpu_decode_kernel` (default True): both paths are within the
    # log-prob contract.
    cpu_decode_kernel: bool = True
    # n > 1: the samples forked from a request's leader share its full prompt blocks and each, when the scheduler
    # admits it while the leader still holds that KV, takes a copy of the block holding the rest of its prompt but
    # the last token (its block taken at admission, as the prefill's would be), so each computes only that token
    # (a decode row) instead of prefilling the partial block's tokens; within the log-prob contract, not bit for
    # bit with the prefill. Not with a draft model or a hidden-state sink. False: the partial block's tokens are
    # prefilled.
    # Engines serving an RL run take `rollout.fork_copy_partial_block` (default True).
    fork_copy_partial_block: bool = True
    # CPU: each step's tensors come from a caching arena (kernels/cpu/host_memory.py `step_arena`) that keeps the
    # blocks the step frees for the next step, where glibc unmapped or trimmed them and the next step faulted fresh
    # zeroed pages in (~3.5M batch-64 greedy generate: ~4.6k faults a run -> 0, run CPU time 1.2-1.8% shorter; the
    # ~50M model level). While a step runs the process's CPU allocator is the arena, which serves only the thread
    # inside the step; it holds at most 256 MiB (STEP_ARENA_BUDGET) for the process's life
    # (`host_memory.release_step_arena()` frees the idle blocks). Its blocks are invisible to torch.profiler's memory
    # view. The same bits either way. False: torch's allocator.
    cpu_step_arena: bool = True

    def __post_init__(self) -> None:
        def positive(name: str, value) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in ("enable_prefix_caching", "enforce_eager", "compile_decode", "record_routing",
                     "cpu_prepack_weights", "cpu_huge_pages", "cpu_decode_kernel", "fork_copy_partial_block",
                     "cpu_step_arena"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        positive("block_size", self.block_size)
        positive("kv_cache_memory", self.kv_cache_memory)
        positive("max_num_seqs", self.max_num_seqs)
        positive("max_num_batched_tokens", self.max_num_batched_tokens)
        if self.num_kv_blocks is not None and (not isinstance(self.num_kv_blocks, int) or self.num_kv_blocks < 2):
            raise ValueError(f"num_kv_blocks must be an integer >= 2 (block 0 is the padding block), "
                             f"got {self.num_kv_blocks!r}")
        if self.max_model_len is not None:
            positive("max_model_len", self.max_model_len)
        if self.speculative_config is not None:
            self.speculative_config = SpeculativeConfig.from_dict(self.speculative_config)
            if self.record_routing:
                raise ValueError("record_routing=True cannot be combined with speculative_config (the routing "
                                 "of rejected draft positions would be recorded); turn one of them off")
        if self.cpu_threads not in ("auto", "fixed"):
            raise ValueError(f"cpu_threads must be 'auto' or 'fixed', got {self.cpu_threads!r}")
        if self.graph_batch_sizes is not None:
            if not isinstance(self.graph_batch_sizes, (list, tuple)) or not self.graph_batch_sizes:
                raise ValueError(f"graph_batch_sizes must be a non-empty list of positive integers (or None for "
                                 f"1, 2, 4, ... max_num_seqs), got {self.graph_batch_sizes!r}")
            for b in self.graph_batch_sizes:
                positive("graph_batch_sizes entry", b)
