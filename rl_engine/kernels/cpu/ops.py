"""The registry's "cpu" implementations: thin wrappers over the C++ kernels of `csrc/cpu_ops.cpp`.

Signatures are the torch references' (`reference.py`). The C++ kernels have no backward, so a call
that autograd must record (grad mode on and an input that requires grad: the trainer's forward)
runs the torch reference instead, as does any input the kernels do not take (a dtype other than
fp32/bf16/fp16, mixed dtypes, a non-CPU tensor). Results equal the reference's up to fp32 summation
order (tests/kernels/test_cpu_ops.py).

Each kernel is also a torch.library custom op (`rl_engine::cpu_paged_decode_attention`,
`cpu_rotary_kv_write`, which declares the caches it writes as mutated) with a fake implementation (output
shapes only), so torch.compile (the engine's `compile_decode`) keeps it as one opaque node of its graph: dynamo cannot trace the
pybind module or the cpp_extension loader behind `extension()` ("marked as skipped"), and the op's
body, which loads the extension, runs only when the compiled graph runs. Eager calls skip the custom
op's dispatch (a few microseconds a call, paid per layer) and call the extension directly.
"""

from __future__ import annotations

import numpy as np
import torch

from rl_engine.kernels import op_inputs, reference
from rl_engine.kernels.cpu import extension
from rl_engine.kernels.grad_mode import records_autograd

DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the C++ kernels here; others take the reference


@torch.library.custom_op("rl_engine::cpu_paged_decode_attention", mutates_args=())
def _paged_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, max_context_len: int) -> torch.Tensor:
    return extension().paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                              max_context_len)


@_paged_decode_op.register_fake
def _paged_decode_fake(q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len):
    return q.new_empty(q.shape)


@torch.library.custom_op("rl_engine::cpu_rotary_kv_write", mutates_args=("k_cache", "v_cache"))
def _rotary_kv_write_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        return_k: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ rotary + KV cache write: (rotated q, rotated k or an empty tensor without `return_k`)."""
    q_rot, k_rot = extension().rotary_kv_write(q, k, v, cos, sin, slot_mapping, k_cache, v_cache, return_k)
    return q_rot, (k_rot if return_k else q.new_empty(0))


@_rotary_kv_write_op.register_fake
def _rotary_kv_write_fake(q, k, v, cos, sin, slot_mapping, k_cache, v_cache, return_k):
    return q.new_empty(q.shape), (k.new_empty(k.shape) if return_k else k.new_empty(0))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           max_context_len: int | None = None) -> torch.Tensor:
    """The reference's contract; `max_context_len` (the longest of `context_lens`, when the caller
    knows it) saves reading it back from the tensor (under torch.compile it must be given: a traced
    graph cannot read a tensor's value)."""
    op_inputs.check_paged_decode(q, k_cache, v_cache, block_tables, context_lens)
    if (records_autograd(q) or q.dtype not in DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype
            or q.device.type != "cpu"):
        return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
    if max_context_len is None:
        if torch.compiler.is_compiling():
            raise ValueError("paged_decode_attention under torch.compile needs max_context_len (the longest of "
                             "context_lens, known to the caller): a traced graph cannot read it from the tensor")
        max_context_len = int(context_lens.max()) if context_lens.numel() else 0
        if max_context_len:
            op_inputs.check_block_capacity(block_tables, context_lens, k_cache.shape[1])
    if q.stride(-1) != 1:
        q = q.contiguous()
    args = (q, k_cache.contiguous(), v_cache.contiguous(), block_tables.to(torch.int32),
            context_lens.to(torch.int32).contiguous(), scale, max_context_len)
    if torch.compiler.is_compiling():
        return _paged_decode_op(*args)
    return extension().paged_decode_attention(*args)


def decode_tables(block_tables: torch.Tensor, context_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step's block tables [B, >= blocks] and context lengths [B] as the C++ kernel reads them (int32,
    table rows and lengths contiguous), checked once: every layer's `paged_decode_step` call shares them."""
    op_inputs.check_tables("paged_decode_attention", block_tables, context_lens)
    tables = block_tables.to(torch.int32)
    return (tables if tables.stride(-1) == 1 else tables.contiguous()), context_lens.to(torch.int32).contiguous()


def paged_decode_step(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      context_lens: torch.Tensor, scale: float, max_context_len: int) -> torch.Tensor:
    """`paged_decode_attention` of the engine's decode step, one call per layer on tables from `decode_tables`: the
    C++ kernel is called directly (~1.5 us a call where the checked wrapper costs ~9: 8 layers a step). The shapes
    the kernel does not check are compared here; anything else it refuses (dtype, layout, a block outside the
    cache) goes through the checked wrapper, which adapts it (a strided q, mixed dtypes: the reference) or names it in
    its error. Inference only (no autograd)."""
    if (q.dim() != 3 or q.dtype not in DTYPES or context_lens.shape[0] != q.shape[0]
            or block_tables.shape[0] != q.shape[0] or k_cache.dim() != 4 or k_cache.shape[3] != q.shape[2]
            or q.shape[1] % k_cache.shape[2] or v_cache.shape != k_cache.shape):
        return paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len)
    try:
        return extension().paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                                  max_context_len)
    except RuntimeError:  # the kernel's TORCH_CHECK refused an argument: the wrapper adapts it or names it
        return paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len)


# the C++ greedy pick's widest row: its vector paths keep int32 lane indices
ARGMAX_MAX_COLUMNS = 2**31 - 1


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """The reference's contract (each row's first maximum, ties and NaN as `torch.max`); fp32 and bf16 rows
    of 1 .. ARGMAX_MAX_COLUMNS logits by the C++ kernel (~60-75 us for [64, 32k] at 2 threads against torch's
    ~0.85 ms), anything else by the reference."""
    if (logits.dim() != 2 or logits.dtype not in (torch.float32, torch.bfloat16) or logits.device.type != "cpu"
            or not 0 < logits.shape[1] <= ARGMAX_MAX_COLUMNS or torch.compiler.is_compiling()):
        return reference.greedy_argmax(logits)
    return extension().argmax_rows(logits if logits.stride(1) == 1 else logits.contiguous())


def inverse_cdf_sample(z: torch.Tensor, uniforms: torch.Tensor, *,
                       logprobs: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference's contract, one pass per row in C++ (its exp a few ulp from torch's: a token differs from the
    reference's only where the draw falls within that rounding of a boundary; log-probs within ~1e-7). AVX-512
    builds sum 16 rows abreast (the same bits as row by row): 1 thread, [64, 2048] 172 -> 66 us, [64, 32000] 2.8
    -> 1.1 ms, the RL rollout's [128, 101] 21 -> 11 us (the reference's dozen small ops: ~80-130 us there).
    fp32 rows on CPU; anything else by the reference."""
    if (z.dim() != 2 or z.dtype != torch.float32 or z.device.type != "cpu" or z.shape[1] == 0
            or torch.compiler.is_compiling()):
        return reference.inverse_cdf_sample(z, uniforms, logprobs=logprobs)
    tokens, lps = extension().sample_rows(z if z.stride(1) == 1 else z.contiguous(),
                                          uniforms.to(torch.float64).contiguous(), logprobs)
    return tokens, lps if logprobs else None


def token_uniforms_at(base: np.ndarray, positions) -> np.ndarray:
    """`inference.sampler.token_uniforms_at`'s contract (bit for bit: the same uint64 operations and rounding) in
    one C++ loop, where numpy takes a dozen calls over the rows (128 rows: ~4 us against ~7 us, called alone).
    `positions`: an int64 array (a decode step's context lengths) or a list of ints."""
    positions = np.asarray(positions, dtype=np.int64)
    if base.dtype != np.uint64 or base.ndim != 1 or base.shape != positions.shape:
        from rl_engine.inference.sampler import token_uniforms_at as numpy_form

        return numpy_form(base, positions)
    return extension().token_uniforms(torch.from_numpy(np.ascontiguousarray(base).view(np.int64)),
                                      torch.from_numpy(np.ascontiguousarray(positions))).numpy()


def seeded_inverse_cdf_sample(z: torch.Tensor, base: np.ndarray, positions, *,
                              logprobs: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`inverse_cdf_sample(z, token_uniforms_at(base, positions))` in one C++ call (the same uniforms, bit for bit,
    and the same tokens and log-probs): a seeded decode step's draw and pick, without the uniforms' round trip through
    Python. Each C++ call costs ~5x its hot time inside a decode step, whose kernels leave the caches cold (the grpo
    rollout's 128 rows: token_uniforms_at ~31-42 us a call there, against ~3.3 us called alone). Inputs the two
    kernels would not take go through those two calls."""
    positions = np.asarray(positions, dtype=np.int64)
    if (base.dtype != np.uint64 or base.ndim != 1 or base.shape != positions.shape or z.dim() != 2
            or z.dtype != torch.float32 or z.device.type != "cpu" or z.shape[0] != base.shape[0] or z.shape[1] == 0
            or torch.compiler.is_compiling()):
        return inverse_cdf_sample(z, torch.as_tensor(token_uniforms_at(base, positions), dtype=torch.float64),
                                  logprobs=logprobs)
    tokens, lps = extension().sample_rows_seeded(z if z.stride(1) == 1 else z.contiguous(),
                                                 torch.from_numpy(np.ascontiguousarray(base).view(np.int64)),
                                                 torch.from_numpy(np.ascontiguousarray(positions)), logprobs)
    return tokens, lps if logprobs else None


def continue_decode_inputs(tokens: list[int], stopped: list[int], prev_positions: np.ndarray,
                           prev_tables: np.ndarray, seqs: list, block_size: int, input_ids: np.ndarray,
                           positions: np.ndarray, context_lens: np.ndarray, slot_mapping: np.ndarray,
                           block_tables: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`inference.model_runner.continue_decode_inputs`'s contract (the same arrays) in one C++ pass over the rows,
    where numpy takes ~25 calls of 1-2 us each (the grpo rollout's 128 rows). The runner's arrays are written in
    place: their dtypes and layout are the static inputs' (int64, int32 context lengths and block tables,
    C-contiguous); other arrays take numpy."""
    if not (input_ids.dtype == positions.dtype == slot_mapping.dtype == np.int64
            and context_lens.dtype == block_tables.dtype == np.int32 and block_tables.flags.c_contiguous):
        from rl_engine.inference.model_runner import continue_decode_inputs as numpy_form

        return numpy_form(tokens, stopped, prev_positions, prev_tables, seqs, block_size, input_ids, positions,
                          context_lens, slot_mapping, block_tables)
    return extension().continue_decode_inputs(tokens, stopped, prev_positions, prev_tables, seqs, block_size,
                                               input_ids, positions, context_lens, slot_mapping, block_tables)


def rotary_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                    return_k: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference's contract, in one pass over q, k and v read in place (strided views with a contiguous
    head dim: the fused qkv projection's parts); the same bits as the reference in every dtype (no fused
    multiply-adds; tests/kernels/test_rotary_kv_write.py). The kernel checks its arguments itself: the Python
    checks (~7 us, as much as the kernel at decode sizes) run only when it refuses one, to name the problem."""
    if records_autograd(q, k, v) or q.dtype not in DTYPES or q.device.type != "cpu":
        return reference.rotary_kv_write(q, k, v, cos, sin, slot_mapping, k_cache, v_cache, return_k=return_k)
    if torch.compiler.is_compiling():
        op_inputs.check_rotary_kv_write(q, k, v, cos, sin, slot_mapping, k_cache, v_cache)  # at trace time
        q_rot, k_rot = _rotary_kv_write_op(q, k, v, cos, sin, slot_mapping, k_cache, v_cache, return_k)
        return q_rot, (k_rot if return_k else None)
    try:
        return extension().rotary_kv_write(q, k, v, cos, sin, slot_mapping, k_cache, v_cache, return_k)
    except RuntimeError as error:  # the kernel's TORCH_CHECK refused an argument
        op_inputs.check_rotary_kv_write(q, k, v, cos, sin, slot_mapping, k_cache, v_cache)
        op_inputs.check_slots_in_cache("rotary_kv_write", slot_mapping, k_cache)
        raise ValueError(f"{error}".split("\n")[0]) from error


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                            scale: float) -> torch.Tensor:
    """The reference's contract in one call for every request: the tiled C++ kernel of
    `csrc/prefill_attention.cpp` (`kernels/cpu/prefill_attention.py`), each query reading its keys in place in
    their cache blocks, threads over (chunk, kv head, 32 query positions), every key tile widened and transposed
    once for the GQA group's heads, online softmax in fp32, rounded once. At generate.py's 64 vs-vLLM prompts
    (4,497 tokens, 40M, heads 8 / 2 of dim 64, 2 threads) a prefill's attention took 61.3 -> 46.7 ms in bf16 and
    62.0 -> 57.3 ms in fp32 (best of 6, in-engine A/B) against the per-query kernel of
    `csrc/invariant_attention.cpp` it replaced (which was ~2x the engine's earlier per-sequence SDPA calls). The
    reference runs where the kernel does not take the input or did not build, and under autograd or
    torch.compile. The kernel checks its arguments itself: the Python checks run only when it refuses one, to
    name the problem."""
    from rl_engine.kernels.cpu import prefill_attention

    if (records_autograd(q) or q.dtype not in DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype
            or q.device.type != "cpu" or torch.compiler.is_compiling() or prefill_attention.kernel() is None):
        return reference.paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens,
                                                 scale)
    try:
        return prefill_attention.kernel().paged_prefill(
            q if q.stride(-1) == 1 else q.contiguous(), k_cache.contiguous(), v_cache.contiguous(),
            block_tables.to(torch.int32).contiguous(), cu_seqlens_q.to(torch.int32).contiguous(),
            context_lens.to(torch.int32).contiguous(), scale)
    except RuntimeError as error:  # the kernel's TORCH_CHECK refused an argument
        dims = op_inputs.check_paged_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens)
        op_inputs.check_block_capacity(block_tables, context_lens, dims.block_size)
        raise ValueError(f"paged_prefill_attention: {error}".split("\n")[0]) from error
