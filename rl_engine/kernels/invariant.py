"""Batch-invariant ops: every reduction in the forward pass runs in an order that does not depend on
how many tokens share the batch or where a token sits in it (`model.batch_invariant`).

Why: a BLAS matmul picks its blocking by problem size (on CPU, MKL's sgemm gives a row a different
result when it is alone, M <= 3, than inside a larger M), and the engine's attention (one-token
decode, chunked prefill over a paged cache) splits the key reduction differently from the trainer's
packed forward. Then the trainer's recomputed log-probs differ from the engine's behavior log-probs
in the last bits, and RL is silently off-policy. The ops here fix the order:

- `linear` (the registry's `dense` op under the switch, bound by the layers at build): on CPU the C++
  kernel `csrc/invariant_linear.cpp` (fp32 / bf16 / fp16): each output element reduces over K in one
  order that depends on K alone (16 fp32 lanes, lane j adding k = j, j + 16, ... by fma, then a fixed
  pairwise tree over the lanes, then the bias), whatever M, the row's position, the tiling, the thread
  count or the instruction set (AVX-512, AVX2 and scalar fma give the same bits, so every x86-64
  machine does; bf16 follows AVX512_BF16's vdpbf16ps, emulated exactly without it). A lone decode row
  costs a gemv's work, not a padded 4-row product (`benchmarks/invariant_linear.py`, 1 thread: fp32
  0.44-0.64x F.linear's time at M = 1, 0.88-1.08x at M = 64, 1.03-1.22x at M = 512-2048; bf16
  0.15-0.35x, 0.94-1.37x, 1.10-1.54x). Its backward uses ordinary matmuls (F.linear's). When the kernel cannot be built (no compiler, `RL_ENGINE_CPU_KERNELS=0`,
  a failed build) and on other devices or dtypes, `_mm_rows` runs instead, chosen once per process
  (`linear_kernel`): the rows are cut into tiles of `ROW_TILE` rows and a last tile zero-padded to a
  multiple of `MIN_TILE`, one `mm` call per tile. Every call has one of ROW_TILE / MIN_TILE shapes (4,
  8, ..., 128 rows), and a row's K reduction is the same in each of them at every position: tested on
  MKL fp32 and oneDNN bf16 with 1 and 2 threads (`tests/kernels/test_invariant.py`). Calls of fewer
  than 4 rows are what breaks it (MKL fp32 gives such rows other bits, and so does oneDNN bf16 a lone
  row at K = 4864), and with 2 threads MKL fp32 also gives rows of 5-7 and 9-11 row calls other bits.
- attention: on CPU the C++ kernel `csrc/invariant_attention.cpp` (`attention_kernel`, chosen once per
  process): one routine per (query, kv head) for every path, reading each query's keys 0..pos in place
  (through a block table in the paged cache, or at an offset in contiguous k/v) with one reduction
  structure (16 fp32 lanes over the head dim then a fixed lane tree for q.k; the exact max; exp-sums and
  P.V over keys in increasing order), so its bits depend only on its q and its keys, on AVX-512, AVX2 and
  scalar fma alike. The engine makes one call per layer per step (`paged_attention`); the trainer's
  packed sequences (`varlen_causal_attention`) run it in an autograd Function whose backward recomputes
  fp32 attention with SDPA. A one-token decode call over 100 keys of the 3M model's layer costs 7.4 us
  at batch 1 and 249 us at batch 64 in fp32 (SDPA over the gathered blocks 32.8 and 244 us; the torch
  implementation below 108 and 5,473 us; `benchmarks/invariant_attention.py`, 1 thread). Without it
  (no compiler, `RL_ENGINE_CPU_KERNELS=0`, a failed build; and on other devices) the torch
  implementation `attention` runs everywhere: per query, scores against keys in blocks of `KEY_BLOCK`
  keys from position 0 (one fixed-shape [G, D] x [D, KEY_BLOCK] matmul per query, kv head and block),
  the exact global max, per-block exp-sums and per-block P @ V, then the blocks summed in order by
  `cumsum` (a sequential scan on CPU, so fully masked trailing blocks add exact zeros). The two give
  different bits, each invariant on its own: every process of a run must make the same choice.
- RMSNorm, softmax and the log-prob statistics reduce per row over a fixed length already
  (`reference.rms_norm`, `logprob.logprob_shard_stats`); rotary, SwiGLU and embedding are elementwise.

The layers call these through the kernel registry, resolved once at build, so the hot path runs no
per-op hook. `BatchInvariantMode` (a TorchFunctionMode) is the guard: the model runs the first forward
of each kind (training, engine step of each attention path, logits, log-probs; `CausalLM`) inside it,
and it refuses every matmul-family op and attention that reaches it with an error naming the op: the
ops here run theirs with torch functions disabled, so what the mode sees is model code that did not
go through an invariant implementation (`F.linear` of an `nn.Linear`, `F.scaled_dot_product_attention`,
`einsum`, ...) and would silently break invariance. Backward passes run in the autograd engine with
the ordinary kernels (only forward values must match). On CUDA these torch ops run but their bitwise
invariance is unverified (no GPU here).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from rl_engine.kernels import cpu as cpu_kernels
from rl_engine.kernels import op_inputs
from rl_engine.kernels.grad_mode import records_autograd

logger = logging.getLogger(__name__)

ROW_TILE = 128  # rows per matmul call at most
MIN_TILE = 4  # every call's row count is a multiple of this (MKL fp32 treats M <= 3 apart)
KEY_BLOCK = 32  # keys per attention block (split-KV at fixed positions: 0, 32, 64, ...)
_QUERY_CHUNK = 128  # queries per attention call in prefill/training (bounds the key copies)
_ATTENTION_SOURCE = Path(cpu_kernels.__file__).parent / "csrc" / "invariant_attention.cpp"


class BatchInvariantError(ValueError):
    """An op with no batch-invariant implementation ran under `model.batch_invariant`."""


# ---- matmul ----------------------------------------------------------------------------------------


def _mm_rows(x: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w_t [K, N] -> [M, N]: one mm per tile of ROW_TILE rows, the last tile zero-padded to
    a multiple of MIN_TILE rows."""
    m = x.shape[0]
    if m == 0:
        return x.new_empty(0, w_t.shape[1])
    x = x.contiguous()  # one memory layout for every caller: mm's kernel choice may follow strides
    if m <= ROW_TILE:
        pad = -m % MIN_TILE
        return torch.mm(F.pad(x, (0, 0, 0, pad)), w_t)[:m] if pad else torch.mm(x, w_t)
    if records_autograd(x, w_t):  # autograd: no out=
        return torch.cat([_mm_rows(t, w_t) for t in x.split(ROW_TILE)])
    out = x.new_empty(m + -m % MIN_TILE, w_t.shape[1])  # each tile's product written in place
    for a in range(0, m, ROW_TILE):
        tile = x[a:a + ROW_TILE]
        if tile.shape[0] % MIN_TILE:
            tile = F.pad(tile, (0, 0, 0, -tile.shape[0] % MIN_TILE))
        torch.mm(tile, w_t, out=out[a:a + tile.shape[0]])
    return out[:m]


# The C++ kernel (`csrc/invariant_linear.cpp`) on CPU for fp32 / bf16 / fp16 when it builds, else the
# MKL tiles above; the choice is made once per process (`linear_kernel`), so a process's engine and
# trainer run the same one. The two give different bits (each is invariant on its own).
_LINEAR_SOURCE = Path(cpu_kernels.__file__).parent / "csrc" / "invariant_linear.cpp"
_LINEAR_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def linear_kernel() -> ModuleType | None:
    """The C++ batch-invariant linear (built once per machine into the torch extensions cache), or None
    when it cannot be built (no compiler, a failed build, `RL_ENGINE_CPU_KERNELS=0`): then the MKL tiles
    run everywhere, and the reason is logged once."""
    module, reason = cpu_kernels.load_source(_LINEAR_SOURCE)
    if module is None:
        logger.warning("batch-invariant linear: C++ kernel unavailable (%s); using MKL tiles of 4-128 rows", reason)
    else:
        logger.info("batch-invariant linear: C++ kernel (%s lanes)", module.isas()[0])
    return module


class _NativeLinear(torch.autograd.Function):
    """The C++ forward; backward by the same matmuls as F.linear's autograd (only forward values must
    match between engine and trainer)."""

    @staticmethod
    def forward(ctx, x2, weight, bias):  # x2 [M, K] contiguous
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        return linear_kernel().linear(x2, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x2, weight = ctx.saved_tensors
        with torch._C.DisableTorchFunction():  # BatchInvariantMode guards forwards only
            grad = grad.contiguous()
            grad_x = grad.mm(weight) if ctx.needs_input_grad[0] else None
            grad_w = grad.t().mm(x2) if ctx.needs_input_grad[1] else None  # as mm's for a transposed mat2
            grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` (x [..., K], weight [N, K], bias [N]) with a batch-invariant row reduction."""
    with torch._C.DisableTorchFunction():  # trusted: BatchInvariantMode must not see its products
        out_shape = (*x.shape[:-1], weight.shape[0])
        x2 = x.reshape(-1, x.shape[-1])
        if (x.device.type == "cpu" and x.dtype in _LINEAR_DTYPES and weight.dtype == x.dtype
                and (bias is None or bias.dtype == x.dtype) and linear_kernel() is not None):
            x2, weight = x2.contiguous(), weight.contiguous()
            bias = None if bias is None else bias.contiguous()
            if records_autograd(x, weight, bias):
                return _NativeLinear.apply(x2, weight, bias).view(out_shape)
            return linear_kernel().linear(x2, weight, bias).view(out_shape)
        y = _mm_rows(x2, weight.t()).view(out_shape)
        return y if bias is None else y + bias


_MATMULS = {f: name for f, name in (
    (F.linear, "torch.nn.functional.linear (an nn.Linear?)"), (F.bilinear, "torch.nn.functional.bilinear"),
    (torch.matmul, "torch.matmul"), (torch.Tensor.matmul, "Tensor.matmul"), (torch.Tensor.__matmul__, "@"),
    (torch.Tensor.__rmatmul__, "@"), (torch.mm, "torch.mm"), (torch.Tensor.mm, "Tensor.mm"),
    (torch.bmm, "torch.bmm"), (torch.Tensor.bmm, "Tensor.bmm"), (torch.addmm, "torch.addmm"),
    (torch.Tensor.addmm, "Tensor.addmm"), (torch.Tensor.addmm_, "Tensor.addmm_"), (torch.baddbmm, "torch.baddbmm"),
    (torch.Tensor.baddbmm, "Tensor.baddbmm"), (torch.addbmm, "torch.addbmm"), (torch.addmv, "torch.addmv"),
    (torch.mv, "torch.mv"), (torch.Tensor.mv, "Tensor.mv"), (torch.einsum, "torch.einsum"),
    (torch.tensordot, "torch.tensordot"), (torch.inner, "torch.inner"), (torch.linalg.multi_dot, "multi_dot"),
)}
_ATTENTION = {
    F.scaled_dot_product_attention: "torch.nn.functional.scaled_dot_product_attention",
    F.multi_head_attention_forward: "torch.nn.functional.multi_head_attention_forward",
}


class BatchInvariantMode(TorchFunctionMode):
    """Inside: any matmul-family or attention op that is not inside one of this module's invariant
    implementations raises `BatchInvariantError` naming it; other ops run unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _MATMULS:
            raise BatchInvariantError(
                f"{_MATMULS[func]} ran outside the batch-invariant matmul: model.batch_invariant=true needs every "
                "product of the forward to go through the kernel registry's `dense` op, resolved at build "
                "(kernels.resolve('dense', device)); change this layer, or turn model.batch_invariant off")
        if func in _ATTENTION:
            raise BatchInvariantError(
                f"{_ATTENTION[func]} has no batch-invariant implementation: model.batch_invariant=true cannot run "
                "this model path (use the registry's attention ops, or turn model.batch_invariant off)")
        return func(*args, **(kwargs or {}))


# ---- attention ---------------------------------------------------------------------------------------
# The C++ kernel (`csrc/invariant_attention.cpp`) on CPU when it builds, else the torch implementation
# below; the choice is made once per process (`attention_kernel`), so a process's engine and trainer
# run the same one. The two give different bits (each is invariant on its own).


@functools.cache
def attention_kernel() -> ModuleType | None:
    """The C++ batch-invariant attention (built once per machine into the torch extensions cache), or
    None when it cannot be built (no compiler, a failed build, `RL_ENGINE_CPU_KERNELS=0`): then the torch
    implementation runs everywhere, and the reason is logged once."""
    module, reason = cpu_kernels.load_source(_ATTENTION_SOURCE)
    if module is None:
        logger.warning("batch-invariant attention: C++ kernel unavailable (%s); using the torch implementation",
                       reason)
    else:
        logger.info("batch-invariant attention: C++ kernel (%s lanes)", module.isa)
    return module


def kernel_choice() -> tuple[str, str]:
    """(identity, reason) of the batch-invariant kernels this process runs on CPU. Every process of a run
    must make the same choice (the C++ kernels and the fallbacks give different bits), so the actors
    compare `identity` at registration. It names the choice and, for the C++ kernels, a digest of their
    sources and the flags that shape their arithmetic, never the instruction set (AVX-512, AVX2 and
    scalar builds give the same bits); the fallbacks by torch's version (their matmuls are its MKL's).
    It also names torch's version and CPU capability, which the torch ops around the kernels follow
    (softmax and log_softmax vectorised for AVX2 and for AVX-512 give different bits; RMSNorm, the
    log-prob statistics, the MoE router): processes on AVX2 and AVX-512 nodes differ unless they set one
    `ATEN_CPU_CAPABILITY`. `reason`: why each kernel was chosen."""
    flags = " ".join(f for f in cpu_kernels.build_flags() if not f.startswith("-march"))
    parts, reasons = [], []
    for name, source, kernel, fallback in (("linear", _LINEAR_SOURCE, linear_kernel, "MKL tiles"),
                                           ("attention", _ATTENTION_SOURCE, attention_kernel, "torch")):
        if kernel() is not None:
            digest = hashlib.sha256(source.read_bytes() + flags.encode()).hexdigest()[:12]
            parts.append(f"{name}=C++ {digest}")
            reasons.append(f"{name}: C++ kernel built")
        else:
            parts.append(f"{name}={fallback} (torch {torch.__version__})")
            reasons.append(f"{name}: {cpu_kernels.load_source(source)[1]}")
    parts.append(f"torch {torch.__version__} on {torch.backends.cpu.get_cpu_capability()}")
    return ", ".join(parts), "; ".join(reasons)


class KernelMismatch(RuntimeError):
    """Processes of one run chose different batch-invariant kernels."""


def check_same_kernels(choices: dict[str, tuple[str, str]]) -> None:
    """Raise `KernelMismatch` unless every process (name -> `kernel_choice()`) made the same choice; the
    error names each group of processes, its choice and why, and the fix."""
    groups: dict[str, list[str]] = {}
    for name, (identity, _) in choices.items():
        groups.setdefault(identity, []).append(name)
    if len(groups) <= 1:
        return
    lines = [f"  {', '.join(names)}: {identity} ({choices[names[0]][1]})" for identity, names in groups.items()]
    raise KernelMismatch(
        "model.batch_invariant=true, but the processes of this run chose different batch-invariant kernels, "
        "which give different bits (the trainer's log-probs would silently differ from the behavior "
        "log-probs):\n" + "\n".join(lines) + "\nMake every process choose the same: install a C++ compiler "
        f"(g++, or set CXX) where it is missing, or set {cpu_kernels.ENV_SWITCH}=0 for every process of the run "
        "(the torch fallbacks everywhere); where torch's version or CPU capability differs, the same torch "
        "everywhere and ATEN_CPU_CAPABILITY set alike (e.g. avx2) for every process.")


def native_attention(device: torch.device | str) -> bool:
    """True when batch-invariant attention on `device` runs the C++ kernel (CPU, and it built)."""
    return torch.device(device).type == "cpu" and attention_kernel() is not None


def _int32(x: torch.Tensor) -> torch.Tensor:
    return x.to(dtype=torch.int32).contiguous()


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """[T, H, D] with each token's H * D elements contiguous (any token stride: views of a fused qkv)."""
    return x if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] else x.contiguous()


class _ContiguousAttention(torch.autograd.Function):
    """Forward: the C++ kernel (bits); backward: plain fp32 causal attention under autograd
    (`_math_attention`): only the forward values must be invariant."""

    @staticmethod
    def forward(ctx, q, k, v, key_starts, positions, scale):
        ctx.save_for_backward(q, k, v, key_starts, positions)
        ctx.scale = scale
        return attention_kernel().contiguous(q, k, v, key_starts, positions, scale)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, key_starts, positions = ctx.saved_tensors
        with torch.enable_grad(), torch._C.DisableTorchFunction():
            inputs = [t.detach().requires_grad_() for t in (q, k, v)]
            out = _math_attention(*inputs, key_starts, positions, ctx.scale)
            grads = torch.autograd.grad(out, inputs, grad)
        return (*grads, None, None, None)


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_starts: torch.Tensor,
                    positions: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain causal attention in fp32 (differentiable, SDPA): query n over k/v rows key_starts[n] +
    0..positions[n], one call per run of consecutive queries with the same start (a sequence of a packed
    batch; causal when its positions are 0, 1, ..., else with a boolean mask)."""
    cuts = (torch.nonzero(key_starts[1:] != key_starts[:-1]).view(-1) + 1).tolist()
    outs = []
    group = q.shape[1] // k.shape[1]
    for a, b in zip([0, *cuts], [*cuts, q.shape[0]]):
        start, pos = int(key_starts[a]), positions[a:b].long()
        length = int(pos.max()) + 1
        causal = length == b - a and int(pos[0]) == 0 and bool((pos[1:] > pos[:-1]).all())
        # 4-D inputs with repeated kv heads keep SDPA on its fused kernel (see inference/attention.py)
        ks, vs = (t[start:start + length].float().repeat_interleave(group, 1).transpose(0, 1)[None] for t in (k, v))
        mask = None if causal else torch.arange(length, device=q.device) <= pos[:, None]  # [n, L]
        o = F.scaled_dot_product_attention(q[a:b].float().transpose(0, 1)[None], ks, vs, attn_mask=mask,
                                           is_causal=causal, scale=scale)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs).to(q.dtype)


def contiguous_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_starts: torch.Tensor,
                         positions: torch.Tensor, *, scale: float) -> torch.Tensor:
    """C++ kernel (`native_attention`): query n of q [N, Hq, D] over rows key_starts[n] + 0..positions[n]
    of k [Tk, Hkv, D], v [Tk, Hkv, Dv] -> [N, Hq, Dv] in q's dtype; differentiable (backward in torch)."""
    q = q if q.stride(-1) == 1 else q.contiguous()
    k, v, key_starts, positions = _token_rows(k), _token_rows(v), _int32(key_starts), _int32(positions)
    if records_autograd(q, k, v):
        with torch._C.DisableTorchFunction():
            return _ContiguousAttention.apply(q, k, v, key_starts, positions, scale)
    return attention_kernel().contiguous(q, k, v, key_starts, positions, scale)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    table_rows: torch.Tensor, positions: torch.Tensor, *, scale: float) -> torch.Tensor:
    """C++ kernel (`native_attention`): query n of q [N, Hq, D] over positions 0..positions[n] of the
    paged cache through block_tables[table_rows[n]] (int32 [rows, max_blocks]); positions[n] < 0: zeros.
    A table entry within a query's context outside the cache is refused. No backward (the engine's)."""
    q = q if q.stride(-1) == 1 else q.contiguous()
    return attention_kernel().paged(q, k_cache, v_cache, _int32(block_tables), _int32(table_rows),
                                    _int32(positions), scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor, *,
              scale: float) -> torch.Tensor:
    with torch._C.DisableTorchFunction():  # trusted: fixed-shape matmuls (BatchInvariantMode must not see them)
        return _attention(q, k, v, q_positions, scale=scale)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor, *,
               scale: float) -> torch.Tensor:
    """Causal attention with a fixed reduction order per query.

    q: [N, Hq, D] queries at absolute positions `q_positions` [N]; k: [Nk, L, Hkv, D] and v:
    [Nk, L, Hkv, Dv] the keys/values at positions 0..L-1 (Nk = 1: shared by every query; Nk = N: one
    key sequence per query), L a multiple of KEY_BLOCK. Query n sees keys 0..q_positions[n]; keys
    past it may hold anything finite. Returns [N, Hq, Dv] in q's dtype (math in fp32).
    """
    n, hq, d = q.shape
    nk, length, hkv, dv = v.shape
    g, nb = hq // hkv, length // KEY_BLOCK
    assert length % KEY_BLOCK == 0 and nk in (1, n), (tuple(k.shape), n)
    if n == 0:
        return q.new_empty(0, hq, dv)
    qg = q.float().reshape(n, hkv, 1, g, d)
    # [Nk, Hkv, nb, D, KB] and [Nk, Hkv, nb, KB, Dv], contiguous so every path hands matmul one layout
    kb = k.float().reshape(nk, nb, KEY_BLOCK, hkv, d).permute(0, 3, 1, 4, 2).contiguous()
    vb = v.float().reshape(nk, nb, KEY_BLOCK, hkv, dv).permute(0, 3, 1, 2, 4).contiguous()
    if nk == 1 and n > 1:  # one [G, D] x [D, KB] product per (query, head, block), as for Nk = N
        kb, vb = kb.expand(n, *kb.shape[1:]).contiguous(), vb.expand(n, *vb.shape[1:]).contiguous()
    scores = torch.matmul(qg, kb) * scale  # [N, Hkv, nb, G, KB]
    key_pos = torch.arange(length, device=q.device).view(1, 1, nb, 1, KEY_BLOCK)
    visible = key_pos <= q_positions.view(n, 1, 1, 1, 1)
    scores = scores.masked_fill(~visible, float("-inf"))
    top = scores.amax(dim=(2, 4), keepdim=True)  # exact in any order; key 0 is always visible
    p = torch.exp(scores - top)
    sums = p.sum(-1)  # [N, Hkv, nb, G]: fixed length KEY_BLOCK
    outs = torch.matmul(p, vb)  # [N, Hkv, nb, G, Dv]
    # blocks in order, by a sequential scan: masked trailing blocks add exact zeros
    total = sums.cumsum(2)[:, :, -1]  # [N, Hkv, G]
    out = outs.cumsum(2)[:, :, -1]  # [N, Hkv, G, Dv]
    return (out / total[..., None]).reshape(n, hq, dv).to(q.dtype)


def padded_length(length: int) -> int:
    return -(-length // KEY_BLOCK) * KEY_BLOCK


def _pad_keys(x: torch.Tensor, length: int) -> torch.Tensor:
    """[L, H, D] -> [length, H, D], zero rows appended."""
    if x.shape[0] == length:
        return x
    return torch.cat([x, x.new_zeros(length - x.shape[0], *x.shape[1:])])


def sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor, *,
                       scale: float) -> torch.Tensor:
    """Queries of one sequence over its keys k, v [L, Hkv, D] (positions 0..L-1), in query chunks."""
    if native_attention(q.device):
        return contiguous_attention(q, k, v, torch.zeros_like(q_positions), q_positions, scale=scale)
    length = padded_length(k.shape[0])
    kp, vp = _pad_keys(k, length)[None], _pad_keys(v, length)[None]
    outs = [attention(qc, kp, vp, pc, scale=scale)
            for qc, pc in zip(q.split(_QUERY_CHUNK), q_positions.split(_QUERY_CHUNK))]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def varlen_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            cu_seqlens: torch.Tensor | list[int], scale: float) -> torch.Tensor:
    """The registry op's batch-invariant implementation (training's packed sequences): chunks of
    queries across sequences, each query with its own sequence's keys gathered from position 0 (keys
    past a query's position belong to anything and are masked), so many short sequences take one call."""
    bounds = cu_seqlens if isinstance(cu_seqlens, torch.Tensor) else torch.tensor(cu_seqlens)
    bounds = bounds.to(device=q.device, dtype=torch.int64)
    total = q.shape[0]
    if total == 0:
        return torch.empty_like(q)
    lengths = bounds[1:] - bounds[:-1]
    starts = torch.repeat_interleave(bounds[:-1], lengths)  # [T]: each token's sequence start
    positions = torch.arange(total, device=q.device) - starts
    if native_attention(q.device):
        return contiguous_attention(q, k, v, starts, positions, scale=scale)
    outs = []
    for a in range(0, total, _QUERY_CHUNK):
        b = min(total, a + _QUERY_CHUNK)
        length = padded_length(int(positions[a:b].max()) + 1)
        index = (starts[a:b, None] + torch.arange(length, device=q.device)).clamp(max=total - 1)  # [n, L]
        outs.append(attention(q[a:b], k[index], v[index], positions[a:b], scale=scale))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def paged_slots(block_tables: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """[B, length] flat cache slots of positions 0..length-1 of each row's block table. Positions past
    a row's context (key-block padding) read whatever slot the table gives them (-1 entries: block 0,
    past the table: its last column): finite values that attention masks."""
    pos = torch.arange(length, device=block_tables.device)
    blocks = block_tables.long()[:, :-(-length // block_size)].clamp(min=0)
    index = (pos // block_size).clamp(max=blocks.shape[1] - 1)  # padding past the table: any block
    return blocks[:, index] * block_size + pos % block_size


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The registry op's batch-invariant implementation: one query per row at position
    context_len - 1 over its paged keys. Rows with context_len 0 (padding) get zeros."""
    dims = op_inputs.check_paged_decode(q, k_cache, v_cache, block_tables, context_lens)
    op_inputs.check_block_capacity(block_tables, context_lens, dims.block_size)
    batch = q.shape[0]
    if native_attention(q.device):
        rows = torch.arange(batch, dtype=torch.int32, device=q.device)
        return paged_attention(q, k_cache, v_cache, block_tables, rows, context_lens.long() - 1, scale=scale)
    max_len = int(context_lens.max()) if batch else 0
    if max_len == 0:
        return torch.zeros_like(q)
    length = padded_length(max_len)
    slots = paged_slots(block_tables, length, k_cache.shape[1]).reshape(-1)
    k = k_cache.flatten(0, 1).index_select(0, slots).view(batch, length, *k_cache.shape[2:])
    v = v_cache.flatten(0, 1).index_select(0, slots).view(batch, length, *v_cache.shape[2:])
    lens = context_lens.to(q.device).long()
    out = attention(q, k, v, (lens - 1).clamp(min=0), scale=scale)
    return out.masked_fill((lens == 0)[:, None, None], 0.0)


def prefill_query_rows(cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, *,
                       num_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`paged_attention`'s (table_rows, positions) for a `paged_prefill_attention` call: request i's
    queries read row i of its block table at positions context_lens[i] - n_q .. context_lens[i] - 1;
    the rows past cu_seqlens_q[-1] (up to `num_queries`) get position -1 (zeros). Both int32 [num_queries]."""
    n_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    dev = cu_seqlens_q.device
    rows = torch.repeat_interleave(torch.arange(len(n_q), dtype=torch.int32, device=dev), n_q)
    first = torch.repeat_interleave((context_lens.long() - n_q - cu_seqlens_q[:-1].long()).to(torch.int32), n_q)
    total = len(rows)
    if total == num_queries:
        return rows, first + torch.arange(total, dtype=torch.int32, device=dev)
    positions = torch.full((num_queries,), -1, dtype=torch.int32, device=dev)
    positions[:total] = first + torch.arange(total, dtype=torch.int32, device=dev)
    return torch.cat([rows, rows.new_zeros(num_queries - total)]), positions


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The registry op's batch-invariant implementation: request i's queries are the last ones of its
    context_lens[i] cached tokens."""
    dims = op_inputs.check_paged_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens)
    op_inputs.check_block_capacity(block_tables, context_lens, dims.block_size)
    if native_attention(q.device):
        rows, positions = prefill_query_rows(cu_seqlens_q, context_lens, num_queries=q.shape[0])
        return paged_attention(q, k_cache, v_cache, block_tables, rows, positions, scale=scale)
    out = torch.zeros_like(q)
    bounds = cu_seqlens_q.tolist()
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        n_q, ctx = end - start, int(context_lens[i])
        if n_q == 0:
            continue
        slots = paged_slots(block_tables[i:i + 1], ctx, k_cache.shape[1])[0]
        k = k_cache.flatten(0, 1).index_select(0, slots)
        v = v_cache.flatten(0, 1).index_select(0, slots)
        pos = torch.arange(ctx - n_q, ctx, device=q.device)
        out[start:end] = sequence_attention(q[start:end], k, v, pos, scale=scale)
    return out
