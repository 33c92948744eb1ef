"""kernels/cpu/packed_linear: the registry's `dense` op reads a packed copy of a registered weight (fp32: the
small-M GEMM's panels, bf16: oneDNN's layout) only inside `reading()` under inference mode (an engine's step),
equals F.linear up to fp32
accumulation order, never serves a stale copy (in-place writes, repointed storage and `invalidate` all
repack), and drops the copy when the last engine that registered it releases it; with huge_pages the fp32 panels
sit in one arena advised for huge pages, repacks of an unchanged shape written into their slots."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from inference_helpers import vm_flags
from rl_engine import kernels
from rl_engine.kernels.cpu import host_memory, packed_linear, small_gemm

pytestmark = pytest.mark.skipif(not packed_linear.available()[0], reason=packed_linear.available()[1])


def _inputs(dtype, rows=5, k=96, n=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    w = torch.nn.Parameter(torch.randn(n, k, generator=gen).to(dtype))
    b = torch.randn(n, generator=gen).to(dtype)
    r = torch.randn(rows, n, generator=gen).to(dtype)
    return x, w, b, r


def _bound(x, w, extra, dtype):
    """fp32 accumulation in any order (a sum of k products, each FMA or add one rounding of u32 = eps32 / 2:
    within k u32 sum |x||w| to first order; k eps32 keeps a factor 2), then one rounding of the result and of
    each added term to the dtype. oneDNN's blocked sums and the small-M GEMM's sequential ones both hold it."""
    magnitude = x.double().abs() @ w.double().abs().t()
    eps = torch.finfo(dtype).eps
    return x.shape[1] * torch.finfo(torch.float32).eps * magnitude + eps * (magnitude + extra.abs()) * 2


def _packed(w) -> bool:
    entry = getattr(w, "_rl_packed", None)
    return entry is not None and entry.packed is not None


def test_dense_is_the_packed_linear_and_rowparallel_fuses_its_residual():
    assert kernels.resolve("dense", "cpu") is packed_linear.linear
    assert packed_linear.linear.fuses_residual


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 7, 64, 300])
def test_packed_product_equals_f_linear_up_to_rounding(dtype, rows):
    x, w, b, r = _inputs(dtype, rows=rows)
    assert packed_linear.register([w], batch_size=16) == [w]
    with torch.inference_mode(), packed_linear.reading():
        y, y_res = packed_linear.linear(x, w, b), packed_linear.linear(x, w, residual=r)
    assert _packed(w) == (rows > 1 or packed_linear._gemv is None)  # one row: the C++ gemv, no copy
    exact = x.double() @ w.double().t()
    assert ((y.double() - (exact + b.double())).abs() <= _bound(x, w, exact + b.double(), dtype)).all()
    assert ((y_res.double() - (exact + r.double())).abs() <= _bound(x, w, exact + r.double(), dtype)).all()
    x3 = x.view(1, rows, -1)  # [..., K] inputs keep their leading dims
    with torch.inference_mode(), packed_linear.reading():
        assert torch.equal(packed_linear.linear(x3, w, b), y.view(1, rows, -1))


def test_a_small_gemm_built_without_avx512_leaves_fp32_products_on_onednn(monkeypatch):
    """small_gemm.cpp's portable loop (a build without the AVX-512 micro-kernel) is slower than oneDNN's packed
    linear: fp32 products then stay on oneDNN, the reason kept for the log."""
    class Portable:
        def has_avx512(self):
            return False

    monkeypatch.setattr(packed_linear, "_small", None)
    monkeypatch.setattr(packed_linear, "_small_reason", None)
    monkeypatch.setattr(packed_linear.cpu, "load_source", lambda source: (Portable(), ""))
    packed_linear._load_small()
    assert packed_linear._small is None and "AVX-512" in packed_linear._small_reason


@pytest.mark.parametrize("rows", [2, 7, 64, 300])
def test_fp32_products_read_the_small_gemm_panels_and_bf16_onednn(rows, monkeypatch):
    """fp32 products of 2+ rows read the small-M GEMM (small_gemm.py) on its panels, the weight's one packed
    copy, eager and through the traced op: small_gemm.linear's bits; bf16 reads oneDNN's copy. Without the
    extension fp32 reads oneDNN's copy too (the copy is remade in the layout its reader needs)."""
    x, w, b, r = _inputs(torch.float32, rows=rows)
    packed_linear.register([w], batch_size=16)
    if packed_linear._small is None:
        pytest.skip(f"no small-M GEMM: {packed_linear._small_reason}")
    panels = small_gemm.pack(w, panel=small_gemm.PANEL)
    with torch.inference_mode(), packed_linear.reading():
        outs = [packed_linear.linear(x, w, b), packed_linear.linear(x, w, residual=r),
                packed_linear.packed_linear(x, w, b, None), packed_linear.packed_linear(x, w, None, r)]
    want = [small_gemm.linear(x, panels, b), small_gemm.linear(x, panels, residual=r)]
    for got, expected in zip(outs, want + want):
        assert torch.equal(got, expected)
    assert w._rl_packed.panels and torch.equal(w._rl_packed.packed, panels.data)
    monkeypatch.setattr(packed_linear, "_small", None)  # as where the extension does not build
    with torch.inference_mode(), packed_linear.reading():
        y = packed_linear.linear(x, w, b)
    assert not w._rl_packed.panels
    assert torch.equal(y, torch.ops.mkldnn._linear_pointwise(x, w._rl_packed.packed, b, "none", [], ""))
    packed_linear.release([w])
    x16, w16, b16, _ = _inputs(torch.bfloat16, rows=rows)
    if packed_linear.register([w16], batch_size=16):
        with torch.inference_mode(), packed_linear.reading():
            packed_linear.linear(x16, w16, b16)
        assert _packed(w16) and not w16._rl_packed.panels
        packed_linear.release([w16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,n", [(96, 40), (100, 41), (7, 3), (512, 1), (112, 43)])
def test_one_row_cpp_gemv_equals_f_linear_up_to_rounding(dtype, k, n):
    """The one-row C++ kernel (vector tails of K, avx512_bf16's 32-element steps then a 16-lane step (112), and
    the rows after the 4 streams included) in an engine's step,
    eager and as the traced op; outside `reading()` the op is F.linear itself (same bits)."""
    x, w, b, r = _inputs(dtype, rows=1, k=k, n=n, seed=k + n)
    packed_linear.register([w], batch_size=1)
    if packed_linear._gemv is None:
        pytest.skip(f"no C++ kernels: {packed_linear._gemv_reason}")
    exact = x.double() @ w.detach().double().t()
    op = torch.ops.rl_engine.cpu_gemv
    with torch.inference_mode(), packed_linear.reading():
        outs = {"eager": packed_linear.linear(x, w, b), "eager_res": packed_linear.linear(x, w, residual=r),
                "op": op(x, w, b, None), "op_res": op(x, w, None, r), "op_both": op(x, w, b, r)}
    assert not _packed(w)
    for name, extra in [("eager", b), ("eager_res", r), ("op", b), ("op_res", r), ("op_both", b + r)]:
        want = exact + extra.double()
        assert ((outs[name].double() - want).abs() <= _bound(x, w.detach(), want, dtype) * 2).all(), name
    with torch.inference_mode():  # not an engine's step (an engine that does not pack): F.linear's bits
        assert torch.equal(op(x, w, b, None), F.linear(x, w, b))
        assert torch.equal(op(x, w, None, r), torch.addmm(r, x, w.t()))
    packed_linear.release([w])


def test_only_an_engine_step_reads_a_packed_copy():
    x, w, b, _ = _inputs(torch.float32)
    packed_linear.register([w], batch_size=8)
    with torch.no_grad():  # the trainer's no-grad passes (proximal / reference log-probs)
        assert torch.equal(packed_linear.linear(x, w, b), F.linear(x, w, b))
    with torch.inference_mode():  # an engine that does not pack (cpu_prepack_weights=False)
        assert torch.equal(packed_linear.linear(x, w, b), F.linear(x, w, b))
    y = packed_linear.linear(x, w, b)  # autograd: F.linear, gradients flow
    y.sum().backward()
    assert w.grad is not None and not _packed(w)
    unregistered = torch.nn.Parameter(w.detach().clone())
    with torch.inference_mode(), packed_linear.reading():
        assert torch.equal(packed_linear.linear(x, unregistered, b), F.linear(x, unregistered, b))


def test_the_last_release_drops_the_copy_and_bf16_needs_onednn_support(monkeypatch):
    x, w, _, _ = _inputs(torch.float32)
    packed_linear.register([w], batch_size=8)
    packed_linear.register([w], batch_size=8)  # a second engine over the same model
    with torch.inference_mode(), packed_linear.reading():
        packed_linear.linear(x, w)
    packed_linear.release([w])
    assert _packed(w)
    packed_linear.release([w])
    assert getattr(w, "_rl_packed", None) is None
    monkeypatch.setattr(packed_linear, "_dtypes", lambda: (torch.float32,))  # a CPU without oneDNN bf16
    _, w16, _, _ = _inputs(torch.bfloat16)
    assert packed_linear.register([w16, w], batch_size=8) == [w]


def test_changed_weights_are_repacked():
    x, w, _, _ = _inputs(torch.float32)
    packed_linear.register([w], batch_size=8)

    def check():
        with torch.inference_mode(), packed_linear.reading():
            y = packed_linear.linear(x, w)
        exact = x.double() @ w.detach().double().t()
        assert ((y.double() - exact).abs() <= _bound(x, w.detach(), exact, torch.float32)).all()

    check()
    with torch.no_grad():  # an optimizer step: the version counter moves
        w.mul_(-2.0)
    check()
    with torch.no_grad():
        w[:3].copy_(torch.zeros(3, w.shape[1]))  # through a view: the same counter
    check()
    w.data = torch.randn_like(w)  # repointed storage
    check()
    w.data.copy_(torch.randn_like(w))  # bypasses the counter: the engine's update_weights invalidates
    packed_linear.invalidate([w])
    check()
    packed_linear.release([w])
    assert getattr(w, "_rl_packed", None) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_HUGEPAGE) is Linux's")
def test_arena_holds_the_panels_and_repacks_write_into_their_slots():
    x, w, _, _ = _inputs(torch.float32, rows=6)
    _, w2, _, _ = _inputs(torch.float32, rows=6, n=70, seed=1)
    _, w16, _, _ = _inputs(torch.bfloat16)
    registered = packed_linear.register([w, w2, w16], batch_size=8, huge_pages=True)
    if packed_linear._small is None or host_memory._no_huge_pages() is not None:
        assert all(getattr(v, "_rl_packed").slot is None for v in registered)
        packed_linear.release(registered)
        pytest.skip("no small-M GEMM or no huge pages here: no arena")
    slot, slot2 = w._rl_packed.slot, w2._rl_packed.slot
    assert w16._rl_packed.slot is None  # bf16 reads oneDNN's layout
    assert slot.untyped_storage().data_ptr() == slot2.untyped_storage().data_ptr()  # one arena
    assert slot.data_ptr() % host_memory.HUGE_PAGE == 0 and "hg" in vm_flags(slot2.data_ptr())

    def check(weight, in_slot):
        with torch.inference_mode(), packed_linear.reading():
            y = packed_linear.linear(x, weight)
        assert (weight._rl_packed.packed.data_ptr() == weight._rl_packed.slot.data_ptr()) == in_slot
        assert torch.equal(weight._rl_packed.packed, small_gemm.pack(weight.detach()).data)
        exact = x.double() @ weight.detach().double().t()
        assert ((y.double() - exact).abs() <= _bound(x, weight.detach(), exact, torch.float32)).all()

    check(w, True)
    check(w2, True)
    with torch.no_grad():  # in place (an optimizer step): repacked into the slot
        w2.mul_(-2.0)
    check(w2, True)
    w2.data.copy_(torch.randn_like(w2))  # bypasses the counter: invalidated, repacked into the slot
    packed_linear.invalidate([w2])
    check(w2, True)
    w.data = torch.randn(w.shape[0] + 16, w.shape[1])  # repointed at a larger shape: a copy of its own
    check(w, False)
    packed_linear.release(registered)
    assert getattr(w, "_rl_packed", None) is None


def test_traced_step_calls_the_packed_op():
    """compile_decode traces the model without autograd: a registered weight becomes the opaque
    `rl_engine::packed_linear` op, which packs and reads the copy at run time (backend="eager" runs
    dynamo's graph as traced, without inductor's compile)."""
    x, w, b, r = _inputs(torch.float32)
    packed_linear.register([w], batch_size=8)

    def step(x, r):
        return packed_linear.linear(x, w, b), packed_linear.linear(x, w, residual=r)

    compiled = torch.compile(step, backend="eager", fullgraph=True, dynamic=False)
    with torch.no_grad():
        compiled(x, r)
    assert not _packed(w)  # outside an engine's step the op reads the parameter
    with torch.no_grad(), packed_linear.reading():
        y, y_res = compiled(x, r)
    assert _packed(w)  # only the op's run could have packed it
    exact = x.double() @ w.detach().double().t()
    assert ((y.double() - exact - b.double()).abs() <= _bound(x, w.detach(), exact + b.double(), torch.float32)).all()
    assert ((y_res.double() - exact - r.double()).abs() <= _bound(x, w.detach(), exact + r.double(), torch.float32)).all()


def test_traced_one_row_step_calls_the_cpp_gemv():
    """A bucket of one row (static shapes) traces to `rl_engine::cpu_gemv`, which reads the parameter: a
    weight changed in place is seen at the next call, and no packed copy is made."""
    x, w, b, r = _inputs(torch.float32, rows=1)
    packed_linear.register([w], batch_size=1)
    if packed_linear._gemv is None:
        pytest.skip(f"no C++ kernels: {packed_linear._gemv_reason}")
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    compiled = torch.compile(lambda x, r: packed_linear.linear(x, w, b, residual=None) + packed_linear.linear(
        x, w, residual=r), backend=backend, fullgraph=True, dynamic=False)
    with torch.no_grad(), packed_linear.reading():
        y = compiled(x, r)
        w.mul_(0.5)
        y_half = compiled(x, r)
    assert seen.count("rl_engine.cpu_gemv") == 2 and not _packed(w)
    exact = x.double() @ w.detach().double().t()
    want = 2 * exact + b.double() + r.double()
    assert ((y_half.double() - want).abs() <= 2 * _bound(x, w.detach(), want, torch.float32)).all()
    assert not torch.allclose(y, y_half)


def test_swiglu_mlp_takes_many_rows_in_slices_with_the_same_bits(monkeypatch):
    """SwiGLUMLP's inference forward with a residual (a prefill's MLP) takes more than MLP_ROW_CHUNK rows in slices
    where both products read the small GEMM's panels (each row's sums its own): the whole forward's bits. Outside
    `reading()` (oneDNN / F.linear, whose sums may depend on the row count) and under autograd it takes no slices."""
    from rl_engine.policy import moe
    from rl_engine.policy.parallel import SINGLE

    torch.manual_seed(0)
    mlp = moe.SwiGLUMLP(64, 96, groups=SINGLE, dtype=torch.float32)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, 0.1)
    packed_linear.register([mlp.gate_up_proj.weight, mlp.down_proj.weight], batch_size=16)
    if packed_linear._small is None:
        pytest.skip(f"no small-M GEMM: {packed_linear._small_reason}")
    x, res = torch.randn(300, 64), torch.randn(300, 64)
    rows: list[int] = []
    mlp.gate_up_proj.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    monkeypatch.setattr(moe, "MLP_ROW_CHUNK", 64)
    with torch.inference_mode(), packed_linear.reading():
        sliced = mlp(x, res)
        assert rows == [64, 64, 64, 64, 44]
        monkeypatch.setattr(moe, "MLP_ROW_CHUNK", 1 << 30)
        whole = mlp(x, res)
    assert rows[-1] == 300 and torch.equal(sliced, whole)
    rows.clear()  # a one-row remainder joins the slice before it (one row would take the C++ gemv, not the panels)
    monkeypatch.setattr(moe, "MLP_ROW_CHUNK", 64)
    with torch.inference_mode(), packed_linear.reading():
        sliced = mlp(x[:257], res[:257])
    assert rows == [64, 64, 64, 65] and torch.equal(sliced, whole[:257])
    monkeypatch.setattr(moe, "MLP_ROW_CHUNK", 64)
    rows.clear()
    with torch.inference_mode():  # not reading the panels
        mlp(x, res)
    with torch.enable_grad():
        mlp(x.requires_grad_(), res)
    assert rows == [300, 300]
