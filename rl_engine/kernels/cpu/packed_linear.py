"""Linears on prepacked weights for CPU inference: the registry's `dense` op.

`F.linear` on CPU hands MKL (fp32) or oneDNN (bf16) a plain [N, K] weight, which they re-block on
every call. vLLM's CPU backend packs each linear's weight once into oneDNN's blocked layout
(`dispatch_cpu_unquantized_gemm` -> `create_onednn_mm`); torch exposes the same through
`torch.ops.mkldnn._reorder_linear_weight` and `_linear_pointwise`. Measured on this repository's
2-core AVX-512 machine at 2 threads (through the measuring lock), the ~40M model's matmuls of one
decode step (8 layers' qkv, o, gate/up, down, and the 32k-vocab head) at 64 rows: fp32 79 ms with
F.linear, 38.5 ms packed; at 1 row 8.0 and 3.5 ms; bf16 18.5 / 13.7 ms at 64 rows, 4.3 / 1.3 ms at 1.

fp32 products of 2+ rows read the small-M GEMM (`small_gemm.py`, `csrc/small_gemm.cpp`: the weight in panels of
`small_gemm.PANEL` columns, AVX-512 register tiles, sequential-K fp32 sums) where its extension builds with its
AVX-512 micro-kernel (AVX-512 F/BW/VL), instead of oneDNN: the weight's one packed copy is then its panels. One
engine timed with either, alternated in one process, through the measuring lock at 1 thread (load 1.4-2.9),
generate.py's runs (128 new tokens, prefill included): the ~3.5M model batch 64 greedy 1.08x (per-pair median; best
1.11x), sampled 1.11x, compile_decode greedy 1.13x; batches 2-32 1.17-1.71x (oneDNN's ~15 us floor a call); the ~50M
model (`--large`) batch 64 greedy 1.05x and 1.13x (two runs of 3 pairs). Hot, one decode step's linears alone: 1.35x
oneDNN at 64 rows on the ~3.5M shapes, 1.13x on the ~50M; 1.6-2.3x at 2-16 rows; prefill-sized products about level
(0.97-1.06x at 256-2048 rows), so they take the panels too rather than a second copy. bf16 stays on oneDNN (the
small GEMM's bf16 is ~1.0x), as does fp32 without the extension (no compiler, `RL_ENGINE_CPU_KERNELS=0`, a failed
build) or with a build that lacks the AVX-512 micro-kernel (its portable loop measured 2.2-2.8x oneDNN's time at 64
rows): the reason logged once.

A packed copy is read only inside the steps of an engine that packs (`reading()`, the engine's model
runner around each step: a thread-local switch, so training, its no-grad passes and an engine over the
same model with `cpu_prepack_weights=False` read the parameters), and only for weights registered by
such an engine (`register`, counted per engine: the copy is dropped when the last engine that
registered it `release`s it, which the model runner does when it is garbage-collected). In compiled
steps (`compile_decode`) the linear is the custom op `rl_engine::packed_linear`, which checks the same
switch at run time. `linear` checks on every call that the weight is the one packed: same storage
(`data_ptr`) and version counter (every in-place write through the parameter or a view of it: optimizer
steps, `copy_` under no_grad, weight loading). Writes that bypass the counter (through `.data`, or a
staging region the parameter was repointed at) must be followed by `invalidate` (the engine's
`update_weights` does). bf16 weights are packed only where oneDNN's bf16 linear runs
(`torch.ops.mkldnn._is_mkldnn_bf16_supported()`: AVX-512 BW/VL/DQ or AVX-NE-CONVERT). Memory: one more
copy of every registered weight (an engine with `cpu_huge_pages`: the fp32 panels of the weights it registers
first in one arena on 2 MiB pages, `_arena`; a repack of an unchanged shape writes into its slot). Rounding:
oneDNN's and the small GEMM's fp32 products reduce in other orders than MKL's (the ~40M model's behavior
log-probs measured 1.2e-5..2.1e-5 from the trainer's F.linear recompute with oneDNN, up to 1.62e-5 with the
small GEMM, 2.9e-6..7.6e-6 unpacked), so engines that serve an RL run keep it off (the log-prob contract's 1e-5).

One-row products (a batch-1 decode step) skip both: oneDNN's prepacked linear costs a ~15-20 us floor per
call at 2 threads whatever the weight's size, and a Python custom op ~10 us more, where the C++ kernel
`rl_engine::cpu_gemv` (`csrc/cpu_ops.cpp`, loaded at the first `register`) reads the plain weight once:
through the measuring lock at 2 threads, the ~3.4M model's five weights 175 -> 59 us fp32, 152 -> 41 us
bf16; the ~40M model's 2,632 -> 2,324 and 558 -> 483 us (the 32k-vocab head, memory-bound, about level).
It runs under the same `reading()` switch (a C++ thread-local the switch sets) and has the same
fp32-accumulation contract; without the C++ extension (no compiler, `RL_ENGINE_CPU_KERNELS=0`, a failed
build) one-row products stay on the packed copy.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import torch
import torch.nn.functional as F

from rl_engine.kernels import cpu
from rl_engine.kernels.cpu import host_memory, small_gemm

logger = logging.getLogger(__name__)

_ATTR = "_rl_packed"
DTYPES = (torch.float32, torch.bfloat16)
_state = threading.local()  # .reading: inside a step of an engine that packs
_gemv = None  # the C++ extension once its one-row linear is loaded (`_load_gemv`); None: the packed copy for one row
_gemv_reason: str | None = None  # why it is not, once tried
_small = None  # the small-M GEMM's extension once loaded (`_load_small`); None: oneDNN for fp32 products too
_small_reason: str | None = None  # why it is not, once tried


@contextlib.contextmanager
def reading():
    """Linears of registered weights read their packed copies in this block (this thread only)."""
    previous = getattr(_state, "reading", False)
    _state.reading = True
    gemv = _gemv
    gemv_previous = gemv.set_reading(True) if gemv is not None else False
    try:
        yield
    finally:
        _state.reading = previous
        if gemv is not None:
            gemv.set_reading(gemv_previous)


def _load_gemv() -> None:
    """Load the C++ one-row linear (`rl_engine::cpu_gemv`) once, with its fake for torch.compile; log why not."""
    global _gemv, _gemv_reason
    if _gemv is not None or _gemv_reason is not None:
        return
    module, reason = cpu.load_source(cpu.SOURCE)
    if module is None:
        _gemv_reason = reason
        logger.info("one-row linears read oneDNN's packed copies: the C++ kernel is unavailable (%s)", reason)
        return
    torch.library.register_fake("rl_engine::cpu_gemv")(_gemv_fake)
    _gemv = module
    logger.info("one-row linears: the C++ kernel rl_engine::cpu_gemv (csrc/cpu_ops.cpp)")


def _load_small() -> None:
    """Load the small-M GEMM (`csrc/small_gemm.cpp`) once, where its AVX-512 micro-kernel is compiled in; else
    fp32 products of 2+ rows stay on oneDNN's packed copies, the reason logged. Its portable loop (one row at a
    time, the panel re-read for each) measured 2.2-2.8x oneDNN's time at 64 rows on the ~3.5M shapes."""
    global _small, _small_reason
    if _small is not None or _small_reason is not None:
        return
    module, reason = cpu.load_source(small_gemm.SOURCE)
    if module is not None and not module.has_avx512():
        module, reason = None, "built without its AVX-512 micro-kernel (this CPU or compiler lacks AVX-512 F/BW/VL)"
    if module is None:
        _small_reason = reason
        logger.info("fp32 linears of 2+ rows read oneDNN's packed copies: the small-M GEMM is unavailable (%s)", reason)
        return
    _small = module
    logger.info("fp32 linears of 2+ rows: the small-M GEMM (csrc/small_gemm.cpp)")


def _gemv_fake(x, weight, bias, residual):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _one_row(x: torch.Tensor) -> bool:
    return _gemv is not None and x.dim() >= 1 and x.numel() == x.shape[-1]


def _reading() -> bool:
    return getattr(_state, "reading", False)


def _dtypes() -> tuple[torch.dtype, ...]:
    bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return DTYPES if bf16 is not None and bf16() else (torch.float32,)


def available() -> tuple[bool, str]:
    """(usable, reason): this torch build has oneDNN and its prepacked-linear ops."""
    if not torch.backends.mkldnn.is_available():
        return False, "this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)"
    if not (hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False, "this torch build lacks torch.ops.mkldnn._reorder_linear_weight / _linear_pointwise"
    return True, "oneDNN prepacked linears"


class _Packed:
    """A weight's packed copy, its layout (`panels`) and the (storage, version) it was made from; `stale` forces
    a repack, as does a read that needs the other layout. `slot`: where its panels are written, a view of its
    engine's arena (`register(huge_pages=True)`), or None (each packing a tensor of its own)."""

    __slots__ = ("batch_size", "data_ptr", "version", "packed", "panels", "stale", "owners", "slot", "screen")

    def __init__(self, batch_size: int) -> None:
        self.owners = 0  # engines that registered the weight
        self.batch_size = batch_size
        self.data_ptr = -1
        self.version = -1
        self.packed: torch.Tensor | None = None
        self.panels = False  # the copy is the small-M GEMM's panels (else oneDNN's layout)
        self.stale = True
        self.slot: torch.Tensor | None = None
        self.screen: _Screen | None = None  # greedy_pick's bf16 copy and bounds of this packing (made at first use)

    def current(self, weight: torch.Tensor, panels: bool) -> torch.Tensor:
        ptr, version = weight.data_ptr(), weight._version
        if self.stale or ptr != self.data_ptr or version != self.version or panels != self.panels:
            self.packed = self.screen = None  # the old copies go before the new one is made
            w = weight.detach()
            slot = self.slot  # (panels into the slot while the weight fits it; another shape: their own)
            fits = panels and slot is not None and slot.dtype == w.dtype and slot.numel() == _small.packed_size(
                w, small_gemm.PANEL)
            with host_memory.outside_step_arena():  # (packed at a prefill step's first read: it outlives the step)
                self.packed = (torch.ops.mkldnn._reorder_linear_weight(w, self.batch_size) if not panels
                               else _small.pack(w, small_gemm.PANEL, slot if fits else None))
            self.data_ptr, self.version, self.stale, self.panels = ptr, version, False, panels
        return self.packed


def register(weights, *, batch_size: int, huge_pages: bool = False) -> list[torch.Tensor]:
    """Mark 2-D CPU fp32/bf16 weights for packing (packed lazily, at their first read in `reading()`).
    `batch_size`: the rows oneDNN's layout is tuned for (any row count works). `huge_pages`: the small-M GEMM's
    panels of the weights not registered yet go into one arena on 2 MiB pages (`_arena`). Returns the weights
    registered; hand them to `release` when the engine goes."""
    ok, reason = available()
    if not ok:
        logger.info("linears read their weights unpacked: %s", reason)
        return []
    dtypes = _dtypes()
    if torch.bfloat16 not in dtypes and any(w.dtype == torch.bfloat16 for w in weights):
        logger.info("bf16 linears read their weights unpacked: oneDNN's bf16 linear needs AVX-512 BW/VL/DQ or "
                    "AVX-NE-CONVERT (torch.ops.mkldnn._is_mkldnn_bf16_supported() is False)")
    _load_gemv()
    _load_small()
    registered, new = [], []
    for w in weights:
        if w.dim() == 2 and w.device.type == "cpu" and w.dtype in dtypes:
            entry = getattr(w, _ATTR, None)
            if entry is None:
                entry = _Packed(batch_size)
                setattr(w, _ATTR, entry)
                new.append(w)
            entry.owners += 1
            registered.append(w)
    if huge_pages:
        _arena(new)
    return registered


_SLOT_ALIGN = 64  # bytes: each slot starts on a cache line


def _arena(weights: list[torch.Tensor]) -> None:
    """Give the fp32 weights among `weights` (those the small-M GEMM reads) slots in one buffer on 2 MiB pages
    (`host_memory.huge_page_buffer`), advised before their panels are first written: a batch-64 decode step of
    the ~3.5M model reads ~14 MiB of panels, ~3.5k 4 KiB pages (a Zen 4 core's L2 TLB holds 3,072, shared with
    the step's KV pages), and 7 huge ones. Nothing where the small-M GEMM did not load or huge pages cannot be had
    (logged once there). The buffer lives as long as a slot does (each a view of it)."""
    if _small is None:
        return
    weights = [w for w in weights if w.dtype == torch.float32]
    sizes = [_small.packed_size(w, small_gemm.PANEL) * w.element_size() for w in weights]
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += -(-size // _SLOT_ALIGN) * _SLOT_ALIGN
    if total == 0:
        return
    arena = host_memory.huge_page_buffer(total)
    if arena is None:
        return
    for w, offset, size in zip(weights, offsets, sizes):
        getattr(w, _ATTR).slot = arena[offset:offset + size].view(w.dtype)


def release(weights) -> None:
    """An engine that registered these weights goes: the last one drops each packed copy."""
    for w in weights:
        entry = getattr(w, _ATTR, None)
        if entry is not None:
            entry.owners -= 1
            if entry.owners <= 0:
                delattr(w, _ATTR)


def invalidate(weights) -> None:
    """The weights changed in a way their version counters do not show: repack at next use."""
    for w in weights:
        entry = getattr(w, _ATTR, None)
        if entry is not None:
            entry.stale = True
            entry.packed = None


def _onednn(packed: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None,
            residual: torch.Tensor | None) -> torch.Tensor:
    if residual is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed, None, "add")
    return torch.ops.mkldnn._linear_pointwise.default(x, packed, bias, "none", [], "")  # (.default: no overload search)


def _read(entry: _Packed, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
          residual: torch.Tensor | None) -> torch.Tensor:
    """A registered weight's product through its packed copy: fp32 the small-M GEMM's panels where it loaded,
    else (bf16, or no extension) oneDNN's prepacked layout."""
    if _small is not None and x.dtype == torch.float32:
        return _small.linear(x, entry.current(weight, True), weight.shape[0], small_gemm.PANEL, small_gemm.ROW_BLOCK,
                             bias, residual, small_gemm.MIN_MACS_PER_THREAD)
    return _onednn(entry.current(weight, False), x, bias, residual)


def reads_panels(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
    """Whether `linear(x, weight, residual=residual)` (no bias) reads the small-M GEMM's panels: eager, fp32, 2+
    rows, inside `reading()` under inference mode. Each row's product is then a sequential-K sum of that row alone,
    so the rows can be taken in slices with the same bits (`SwiGLUMLP`'s row chunks)."""
    return (_small is not None and x.dtype == torch.float32 and getattr(weight, _ATTR, None) is not None
            and _packable(x, weight, None, residual) and not torch.compiler.is_compiling() and _reading()
            and torch.is_inference_mode_enabled() and not _one_row(x))


# greedy_pick: at most this many candidates a row (more: the caller computes the logits), and the row norms
# ||x_m||_2 it decides for (outside: the same); the weight's row norms must be <= SCREEN_NORM_MAX too
SCREEN_MAX_CANDIDATES = 64
SCREEN_NORM_MIN, SCREEN_NORM_MAX = 2.0**-40, 2.0**40
# the screen's estimates by AMX tiles (TDPBF16PS) where the small-M GEMM's build has them and the kernel permits
# them (`has_amx()`), else by its VDPBF16PS panels; False: the panels always (tests compare the two)
SCREEN_AMX = True


class _Screen:
    """greedy_pick's view of one packing of a [N, K] fp32 weight W: W rounded to bf16 in the small-M GEMM's
    panels (`packed`), or as AMX tiles (`amx`, `packed` then empty: one bf16 copy either way), `bound` [N] =
    c * ||w_v||_2 and `slack` [N] = K 2^-124 (1 + ||w_v||_2), each rounded up to fp32 (`packed` None: some row
    norm is non-finite or above SCREEN_NORM_MAX, and greedy_pick never decides).

    The bound. For a row x and vocab row w (K elements), let l = the fp32 logit the small-M GEMM computes (one
    fma chain over k in order: |l - x.w| <= g S, g = K u / (1 - K u), u = 2^-24, S = sum_k |x_k w_k| <= ||x||
    ||w|| by Cauchy-Schwarz) and a = the screen's estimate: x and w rounded to bf16 (relative error <= 2^-8
    each, so |x'_k w'_k - x_k w_k| <= (2^-7 + 2^-16) |x_k w_k|), their exact products summed in fp32 by
    VDPBF16PS (<= 2 g (1 + 2^-7 + 2^-16) S, counting a rounding per add twice over), or by AMX's TDPBF16PS
    (`SCREEN_AMX`: the same terms and roundings in another order, a term through fewer than 2 K adds). Denormal
    inputs read as zero and denormal sums flush: each term loses <= 2^-126 (|w_k| + |x_k|) (1 + 2^-8), each add <= 2^-126;
    the fp32 chain's own underflow adds <= 2^-150 a step (under torch.set_flush_denormal as much as the bf16
    side's, 2^-126 (1 + |x_k| + |w_k|)); with sum_k |x_k| <= sqrt(K) ||x||, in all <= 3 K 2^-126 (1 + ||x||)
    (1 + ||w||) <= K 2^-124 (1 + ||x||)(1 + ||w||) (the slack). The kernel forms a +- e in fp32 (<= 2^-23 ||x||
    ||w|| more) and e from ||x|| summed and rooted in fp32 (relative <= (K/2 + 2) u) and two more roundings: c =
    (2^-7 + 2^-16 + 2 g (1 + 2^-7 + 2^-16) + g + 2^-22) (1 + (K + 16) 2^-23) covers all of it, so e_v =
    ||x|| bound_v + (1 + ||x||) slack_v >= |a_v - l_v| for every v, as computed.

    The pick. Let v* be a first maximum of the l_v. For every u: a_v* + e_v* >= l_v* >= l_u >= a_u - e_u, so
    every maximum of l, v* included, is a candidate {v : a_v + e_v >= max_u (a_u - e_u)}; the candidates'
    logits, computed as the GEMM's lane computes them (the same bits), compared in index order give v*."""

    __slots__ = ("packed", "amx", "bound", "slack")

    def __init__(self, weight: torch.Tensor) -> None:
        n, k = weight.shape
        norms = torch.linalg.vector_norm(weight.detach().double(), dim=1)
        self.packed = self.amx = self.bound = self.slack = None
        if not bool(torch.isfinite(norms).all()) or (n and float(norms.max()) > SCREEN_NORM_MAX):
            return
        u = 2.0**-24
        g = k * u / (1 - k * u)
        bf = 2.0**-7 + 2.0**-16
        c = (bf + 2 * g * (1 + bf) + g + 2.0**-22) * (1 + (k + 16) * 2.0**-23)
        inf = torch.tensor(float("inf"))
        self.bound = torch.nextafter((c * norms).float(), inf)  # rounded down by at most an ulp: one up
        self.slack = torch.nextafter((k * 2.0**-124 * (1 + norms)).float(), inf)
        rounded = weight.detach().to(torch.bfloat16)
        if SCREEN_AMX and _small.has_amx():  # the estimates by AMX tiles (the same terms and bound), no panels
            self.amx = _small.amx_pack(rounded)
            self.packed = rounded.new_empty(0)
        else:
            self.packed = _small.pack(rounded, small_gemm.PANEL)


def greedy_pick(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """Each row's first maximum of `linear(x, weight)` ([M] int64: `argmax_rows` of those logits, the same ids)
    without computing every logit, where `linear` reads the small-M GEMM's fp32 panels (`reads_panels`, x 2-D)
    and this CPU has avx512_bf16: a bf16 product screens the vocabulary with a proven error bound, and only
    the candidates' fp32 logits are computed, as the GEMM computes them (`_Screen`, csrc/small_gemm.cpp's
    greedy_screen). None where it does not decide (not that path; a non-finite estimate or logit, a row norm
    outside [SCREEN_NORM_MIN, SCREEN_NORM_MAX], more than SCREEN_MAX_CANDIDATES candidates): compute the
    logits then. The bf16 copy is made per packing of the weight (`_Packed.current`: a new version, storage
    or `invalidate` drops it)."""
    if (x.dim() != 2 or not reads_panels(x, weight) or not weight.is_contiguous() or x.shape[1] != weight.shape[1]
            or not _small.has_screen()):
        return None
    entry = getattr(weight, _ATTR)
    entry.current(weight, True)
    screen = entry.screen
    if screen is None:
        screen = entry.screen = _Screen(weight)
    if screen.packed is None:
        return None
    tokens = _small.greedy_screen(x.contiguous(), screen.packed, weight.detach(), screen.bound, screen.slack,
                                  small_gemm.PANEL, small_gemm.ROW_BLOCK, SCREEN_MAX_CANDIDATES, SCREEN_NORM_MIN,
                                  SCREEN_NORM_MAX, small_gemm.MIN_MACS_PER_THREAD, screen.amx)
    return tokens if tokens.numel() else None


# screen_pays' measured choices: (vocab, hidden, torch threads, rows rounded up to a power of two) -> whether
# greedy_pick beat the logits and their argmax
_screen_pays: dict[tuple[int, int, int, int], bool] = {}
_SCREEN_TIMINGS = 3  # alternated timings of each side, the best of each compared


def screen_pays(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `greedy_pick(x, weight)` is faster on this CPU than the product it replaces (`linear(x, weight)`'s
    logits and their argmax), measured once per process for each head shape, thread count and row count rounded up
    to a power of two, at the first such call (three timings of each, alternated: ~6 of the head's products, ~2-4 ms
    once a row bucket for the ~3.5M model's head) and logged. Both give the same ids (greedy_pick's bound), so the
    choice changes the speed only. Why it is measured: the screen reads half the weight's bytes (bf16), which pays
    where the product is memory-bound (few rows), and its bf16 product (VDPBF16PS) is faster than the fp32 one
    where the core runs it at twice the FMA's rate, not where it runs it at the same rate: [64 x 256] x [256 x 2048]
    at 1 thread took 354 us against 598 for the fp32 product + argmax on the machine it was written on (fbe4b58),
    676-702 us against 376-433 for the fp32 product alone on an Intel Xeon with AMX (session 25; there 69 against
    106 us at 2 rows), where skipping it at 64 rows made generate.py's ~3.5M batch-64 greedy run 5.5% shorter
    (8 of 8 pairs). Call inside `reading()` under inference mode, as greedy_pick."""
    key = (weight.shape[0], weight.shape[1], torch.get_num_threads(), 1 << (x.shape[0] - 1).bit_length())
    pays = _screen_pays.get(key)
    if pays is None:
        pays = _time_screen(x, weight, key)
        if pays is None:  # the screen did not decide for this x: no measure, and no screen for it either
            return False
        _screen_pays[key] = pays
    return pays


def _time_screen(x: torch.Tensor, weight: torch.Tensor, key: tuple[int, int, int, int]) -> bool | None:
    from rl_engine.kernels.cpu import ops

    if greedy_pick(x, weight) is None:  # (also makes the screen, untimed) undecided or not that path: None
        return None
    screen_s, logits_s = [], []
    for _ in range(_SCREEN_TIMINGS):
        t0 = time.perf_counter()
        greedy_pick(x, weight)
        t1 = time.perf_counter()
        ops.greedy_argmax(linear(x, weight))
        t2 = time.perf_counter()
        screen_s.append(t1 - t0)
        logits_s.append(t2 - t1)
    pays = min(screen_s) < min(logits_s)
    logger.info("greedy decode steps %s the bf16-screened head pick: %.0f us against %.0f us for the logits and "
                "their argmax (vocab %d, hidden %d, %d threads, %d rows)", "take" if pays else "skip",
                min(screen_s) * 1e6, min(logits_s) * 1e6, key[0], key[1], key[2], x.shape[0])
    return pays


def _plain(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           residual: torch.Tensor | None) -> torch.Tensor:
    if residual is None:
        return F.linear(x, weight, bias)
    if bias is None and x.dim() == 2:
        return torch.addmm(residual, x, weight.t())
    return residual + F.linear(x, weight, bias)


def _packable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              residual: torch.Tensor | None) -> bool:
    return (x.dtype == weight.dtype and x.device.type == "cpu"
            and (residual is None or (residual.dtype == x.dtype and bias is None)))


def _packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   residual: torch.Tensor | None) -> torch.Tensor:
    """`linear` of a registered weight as one opaque op of a compiled graph (compile_decode): the graph
    passes the parameter itself and the op reads its packed copy (repacked when stale) at run time."""
    entry = getattr(weight, _ATTR, None)
    if entry is None or not _reading() or not _packable(x, weight, bias, residual):
        return _plain(x, weight, bias, residual)
    return _read(entry, x, weight, bias, residual)


def _packed_linear_fake(x, weight, bias, residual):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# Defined on the dispatcher with its Python kernel registered directly (torch.library.Library), not through
# `torch.library.custom_op`, whose wrapper adds ~3 us a call (the compiled step's every linear: ~33 a step).
_LIB = torch.library.Library("rl_engine", "FRAGMENT")
_LIB.define("packed_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? residual) -> Tensor")
_LIB.impl("packed_linear", _packed_linear, "CompositeExplicitAutograd")
torch.library.register_fake("rl_engine::packed_linear", _packed_linear_fake, lib=_LIB)
packed_linear = torch.ops.rl_engine.packed_linear.default


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """x weight^T (+ bias) (+ residual), x [..., K], weight [N, K]: F.linear's contract. A registered
    weight inside `reading()` under inference mode reads its packed copy (the residual add fused into the
    call), or for one row reads the weight itself through the C++ `gemv` when it is loaded; traced by
    torch.compile without autograd (the engine's compiled steps), it becomes the `rl_engine::packed_linear`
    op (one row: `rl_engine::cpu_gemv`), which checks `reading()` when it runs."""
    entry = getattr(weight, _ATTR, None)
    if entry is not None and _packable(x, weight, bias, residual):
        if torch.compiler.is_compiling():  # (dynamo traces neither is_inference_mode_enabled nor the switch)
            if not torch.is_grad_enabled():  # (shapes are static: a bucket of one row takes the C++ kernel)
                if _one_row(x):
                    return torch.ops.rl_engine.cpu_gemv(x, weight, bias, residual)
                return packed_linear(x, weight, bias, residual)
        elif _reading() and torch.is_inference_mode_enabled():
            if _one_row(x):
                return _gemv.gemv(x, weight, bias, residual)
            return _read(entry, x, weight, bias, residual)
    return _plain(x, weight, bias, residual)


linear.fuses_residual = True  # RowParallelLinear passes its residual in (one op less per block)
