"""The training forward's C++ RMSNorm, SwiGLU and rotary (kernels/cpu/train_elementwise.py): outputs and gradients
against the torch reference in float64, with error bounds from the fp32 arithmetic of each formula; strided and
odd shapes; the reference where the kernels do not apply; bad inputs refused by name. The AdamW step bit for bit
against torch.optim.AdamW's own."""

import functools

import pytest
import torch

from rl_engine import kernels
from rl_engine.kernels import cpu, reference, registry
from rl_engine.kernels.cpu import train_elementwise as te

EPS = torch.finfo(torch.float32).eps

pytestmark = pytest.mark.skipif(te.kernel() is None, reason="the C++ kernels do not build here")


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().double().requires_grad_()


def _within(err: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    if err.numel() == 0:
        return
    worst = (err - bound).max().item()
    assert worst <= 0, f"{what}: error exceeds its bound by {worst:.3g} (max error {err.max().item():.3g})"


def _strided(rows: int, width: int, *, pad: int) -> torch.Tensor:
    """[rows, width] fp32, a column slice of a wider tensor when pad > 0 (row stride width + pad)."""
    return torch.randn(rows, width + pad)[:, pad:] if pad else torch.randn(rows, width)


# widths 64 and 128 run the kernels' compile-time-width instances (1000 rows: more than one thread's share), the
# others the run-time width
@pytest.mark.parametrize("rows,width,pad", [(37, 64, 0), (1000, 64, 0), (300, 128, 5), (5, 37, 3), (1, 1, 0),
                                            (0, 16, 0), (300, 130, 7)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_the_float64_reference(rows, width, pad, with_residual):
    torch.manual_seed(rows + width)
    x = _strided(rows, width, pad=pad).requires_grad_()
    w = (1 + 0.3 * torch.randn(width)).requires_grad_()
    r = _strided(rows, width, pad=pad).requires_grad_() if with_residual else None
    out, total = te.rms_norm(x, w, 1e-6, r)
    g_out = torch.randn(rows, width)
    g_total = torch.randn(rows, width) if with_residual else None
    loss = (out * g_out).sum() + ((total * g_total).sum() if with_residual else 0)
    loss.backward()

    x64, w64, r64 = _f64(x), _f64(w), _f64(r)
    out64, total64 = reference.rms_norm(x64, w64, 1e-6, r64)
    loss64 = (out64 * g_out.double()).sum() + ((total64 * g_total.double()).sum() if with_residual else 0)
    loss64.backward()

    # fp32: h = x + r (1 rounding), the row's sum of squares (width roundings at most), rstd (a few), the
    # products (2): every result within (width + 8) eps of its terms' magnitudes, relative.
    n = width
    h = (x64 + r64 if with_residual else x64).detach()
    rstd = (h.pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt()
    xhat, gw = h * rstd, g_out.double() * w64.detach()
    k = (n + 8) * EPS
    _within((out.double() - out64).abs(), k * (w64.detach() * xhat).abs() + 1e-30, "out")
    if with_residual:
        assert torch.equal(total, (x + r).detach())  # one fp32 add, as torch's
    # dx = rstd (g w - xhat mean(g w xhat)) (+ g_total): bounded by the magnitudes of its terms
    dx_terms = rstd * (gw.abs() + xhat.abs() * (gw * xhat).abs().mean(-1, keepdim=True))
    dx_bound = k * dx_terms + (EPS * g_total.double().abs() if with_residual else 0) + 1e-30
    _within((x.grad.double() - x64.grad).abs(), dx_bound, "dx")
    if with_residual:
        _within((r.grad.double() - r64.grad).abs(), dx_bound, "d residual")
    # dw = sum over rows of g xhat: the rows' sum adds up to `rows` roundings
    dw_bound = (rows + n + 8) * EPS * (g_out.double() * xhat).abs().sum(0) + 1e-30
    _within((w.grad.double() - w64.grad).abs(), dw_bound, "dw")


@pytest.mark.parametrize("rows,d,pad", [(33, 48, 0), (7, 23, 5), (1, 1, 0), (0, 8, 0), (500, 192, 0)])
def test_silu_and_mul_matches_the_float64_reference(rows, d, pad):
    torch.manual_seed(rows + d)
    x = (4 * _strided(rows, 2 * d, pad=pad)).requires_grad_()  # gates to |a| ~ 12: sigmoid's saturated ends too
    out = te.silu_and_mul(x)
    g = torch.randn(rows, d)
    (out * g).sum().backward()
    x64 = _f64(x)
    out64 = reference.silu_and_mul(x64)
    (out64 * g.double()).sum().backward()

    a, b = x64.detach()[:, :d], x64.detach()[:, d:]
    sig = torch.sigmoid(a)
    # fast_exp within 2 ulp, then 1 + e, a / that, times up: 8 eps of |out|; the gradients ~16 eps of their terms
    _within((out.double() - out64).abs(), 8 * EPS * out64.abs() + 1e-30, "out")
    gd = g.double().abs()
    da_bound = 16 * EPS * gd * b.abs() * (1 + a.abs()) + 1e-30
    db_bound = 8 * EPS * gd * (a * sig).abs() + 1e-30
    _within((x.grad.double() - x64.grad)[:, :d].abs(), da_bound, "d gate")
    _within((x.grad.double() - x64.grad)[:, d:].abs(), db_bound, "d up")


@functools.cache
def _scalar_build():
    """train_elementwise.cpp built with AVX-512 off (its SwiGLU's scalar loops, as on an AVX2-only CPU), or None
    where this CPU has no AVX-512 (the native build is then that one)."""
    if "avx512f" not in cpu._cpu_flags().split():
        return None
    return cpu.isa_variant("avx2", te.SOURCE)  # a build failure here is a failure: the native build worked


@pytest.mark.parametrize("d,pad", [(768, 0), (1, 0), (15, 3), (16, 0), (17, 1), (33, 0), (100, 2), (192, 0)])
def test_silu_and_mul_has_the_scalar_loops_bits(d, pad):
    """SwiGLU's AVX-512 forward and backward (16 lanes, masked tail; the backward written over its input or into a
    fresh buffer) give the bits of the scalar loops, which a build without AVX-512 runs. Gates at scales 0.5 to
    1000 (fast_exp's clamp at -87.3 / 88 on both sides), the clamp's ends, +-0, +-inf and denormals; d with and
    without a 16-lane tail; rows strided."""
    scalar = _scalar_build()
    if scalar is None:
        pytest.skip("no AVX-512 here: the native build runs the scalar loops")
    torch.manual_seed(d)
    special = torch.tensor([0.0, -0.0, 87.3, -87.3, 88.0, -88.0, 87.29999, -88.00001, 1e30, -1e30,
                            float("inf"), float("-inf"), 1e-40, -1e-40, 3.4e38, -3.4e38])
    for scale in (0.5, 4.0, 30.0, 100.0, 1000.0):
        x = _strided(70, 2 * d, pad=pad) * scale
        x[0, :d] = special.repeat(d // 16 + 1)[:d]
        g = torch.randn(70, d) * scale
        g[1, :d] = special.repeat(d // 16 + 1)[:d]
        out, want_out = te.kernel().silu_and_mul_forward(x), scalar.silu_and_mul_forward(x)
        assert out.view(torch.int32).equal(want_out.view(torch.int32)), f"scale {scale}: forward"
        want = scalar.silu_and_mul_backward(g, x, False)
        dx = te.kernel().silu_and_mul_backward(g, x, False)
        assert dx.view(torch.int32).equal(want.view(torch.int32)), f"scale {scale}: backward"
        over = x.clone()  # contiguous, its own buffer
        written = te.kernel().silu_and_mul_backward(g, over, True)
        assert written.data_ptr() == over.data_ptr() and over.view(torch.int32).equal(want.view(torch.int32))
        over_scalar = x.clone()
        scalar.silu_and_mul_backward(g, over_scalar, True)
        assert over_scalar.view(torch.int32).equal(want.view(torch.int32)), f"scale {scale}: scalar in place"


@pytest.mark.parametrize("rows,d,pad", [(300, 192, 0), (33, 17, 3), (1, 1, 0), (0, 8, 0)])
def test_silu_and_mul_overwriting_its_input_gives_the_same_gradient(rows, d, pad):
    """`overwrite_input=True`: x's gradient is written over x (x then holds it, bit-equal to the gradient a fresh
    buffer gets, at x's stride), and the output is the same; a second backward (retain_graph) is refused by name."""
    torch.manual_seed(rows + d)
    leaf = (4 * _strided(rows, 2 * d, pad=pad)).requires_grad_()
    g = torch.randn(rows, d)
    out = te.silu_and_mul(leaf)
    (out * g).sum().backward()

    wide = torch.randn(rows, 2 * d + pad)
    wide[:, pad:] = leaf.detach()
    wide.requires_grad_()
    buf = wide * 1.0  # a non-leaf of its own, as gate_up's output
    x = buf[:, pad:]  # its columns after the pad: rows at stride 2d + pad
    out_over = te.silu_and_mul(x, overwrite_input=True)
    assert torch.equal(out_over, out)
    (out_over * g).sum().backward(retain_graph=True)
    assert wide.grad[:, pad:].view(torch.int32).equal(leaf.grad.view(torch.int32)) and not wide.grad[:, :pad].any()
    assert x.detach().view(torch.int32).equal(leaf.grad.view(torch.int32))  # x now holds its gradient
    assert torch.equal(buf.detach()[:, :pad], wide.detach()[:, :pad])  # and nothing outside x was written
    if rows:
        with pytest.raises(RuntimeError, match="second backward through it"):
            (out_over * g).sum().backward()


def test_the_mlp_backward_writes_over_its_gate_up_output_with_unchanged_gradients(monkeypatch):
    """SwiGLUMLP's training forward asks its SwiGLU to overwrite the gate_up output (read by nothing else): the
    MLP's output and its input's and weights' gradients are bit-equal to the run that does not."""
    from rl_engine.policy.moe import SwiGLUMLP
    from rl_engine.policy.parallel import SINGLE

    torch.manual_seed(0)
    mlp = SwiGLUMLP(64, 192, groups=SINGLE, dtype=torch.float32)
    x, residual, g = torch.randn(500, 64), torch.randn(500, 64), torch.randn(500, 64)
    asked = []
    real = mlp._silu_and_mul_train

    def spy(h, **kw):
        asked.append(kw.get("overwrite_input", False))
        return real(h, **kw)

    results = []
    for overwrite in (True, False):
        mlp.zero_grad(set_to_none=True)
        mlp._silu_and_mul_train = spy if overwrite else (lambda h, **kw: real(h))
        xi, ri = x.clone().requires_grad_(), residual.clone().requires_grad_()
        out = mlp(xi, ri)
        (out * g).sum().backward()
        results.append([out.detach(), xi.grad, ri.grad, *(p.grad for p in mlp.parameters())])
    assert asked == [True]
    for a, b in zip(*results):
        assert a.view(torch.int32).equal(b.view(torch.int32))


def _tables(tokens: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-width tables as RotaryEmbedding.tables makes them: views [T, 1, D] of one [T, 2, D] table."""
    angles = torch.rand(tokens, head_dim // 2) * 6
    cos, sin = angles.cos(), angles.sin()
    table = torch.stack((torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)), dim=1)
    return table[:, :1], table[:, 1:]


# head_dims 16 and 64 run the kernel's compile-time instances (300 tokens: more than one thread's share), the others
# the run-time one
@pytest.mark.parametrize("tokens,heads,head_dim,extra", [(29, 6, 16, 32), (300, 4, 64, 0), (3, 1, 2, 0), (17, 5, 6, 11),
                                                         (0, 2, 8, 0)])
def test_rotary_full_is_bit_equal_to_the_reference_forward_and_backward(tokens, heads, head_dim, extra):
    torch.manual_seed(tokens + heads)
    fused = torch.randn(tokens, heads * head_dim + extra, requires_grad=True)  # a view into a wider projection
    cos, sin = _tables(tokens, head_dim)
    out = te.rotary_full(fused[:, :heads * head_dim].view(tokens, heads, head_dim), cos, sin)
    g = torch.randn(tokens, heads, head_dim)
    (out * g).sum().backward()
    fused_ref = fused.detach().clone().requires_grad_()
    out_ref = reference.rotary_full(fused_ref[:, :heads * head_dim].view(tokens, heads, head_dim), cos, sin)
    (out_ref * g).sum().backward()
    assert torch.equal(out, out_ref)
    assert torch.equal(fused.grad, fused_ref.grad)
    with torch.no_grad():  # the no-grad call (the C++ forward alone) too
        assert torch.equal(te.rotary_full(fused[:, :heads * head_dim].view(tokens, heads, head_dim), cos, sin),
                           out_ref)
    # and the rotation itself, against float64
    x64 = fused.detach().double()[:, :heads * head_dim].view(tokens, heads, head_dim)
    ref64 = x64 * cos.double() + x64.roll(head_dim // 2, -1) * sin.double()
    _within((out.double() - ref64).abs(), 2 * EPS * (x64.abs() * cos.double().abs()
                                                    + x64.roll(head_dim // 2, -1).abs() * sin.double().abs()), "rot")


@pytest.mark.parametrize("tokens,q_heads,kv_heads,head_dim,pad", [(29, 4, 2, 16, 0), (17, 3, 1, 6, 5), (1, 1, 1, 2, 0),
                                                                   (0, 2, 1, 8, 0)])
@pytest.mark.parametrize("used", ["qkv", "qk", "v"])
def test_rotary_qkv_is_bit_equal_to_split_rotate_split(tokens, q_heads, kv_heads, head_dim, pad, used):
    # rotary_qkv's Function (the backward writing d qkv in place) against the path it replaces, with the torch
    # reference's rotary: split, rotary_full of q and k together, split; values and the gradient of qkv (a part unused
    # gets a zero gradient); pad: qkv a column slice of a wider tensor (row stride past its width)
    torch.manual_seed(tokens + q_heads)
    width = (q_heads + 2 * kv_heads) * head_dim
    base = torch.randn(tokens, width + pad, requires_grad=True)
    cos, sin = _tables(tokens, head_dim)
    grads = [torch.randn(tokens, h, head_dim) for h in (q_heads, kv_heads, kv_heads)]
    outs, dqkv = [], []
    for fused in (True, False):
        x = base.detach().clone().requires_grad_()
        qkv = x[:, pad:] * 1.0  # a non-leaf, as the projection's output
        if fused:
            parts = te.rotary_qkv(qkv, cos, sin, q_heads=q_heads, kv_heads=kv_heads)
            assert parts[0].grad_fn is not None and type(parts[0].grad_fn).__name__ == "_RotaryQKVBackward"
        else:
            qk, v = qkv.split([(q_heads + kv_heads) * head_dim, kv_heads * head_dim], dim=1)
            rotated = reference.rotary_full(qk.view(tokens, q_heads + kv_heads, head_dim), cos, sin)
            q, k = rotated.split([q_heads, kv_heads], 1)
            parts = (q, k, v.view(tokens, kv_heads, head_dim))
        chosen = {"qkv": (0, 1, 2), "qk": (0, 1), "v": (2,)}[used]
        sum((parts[i] * grads[i]).sum() for i in chosen).backward()
        outs.append(parts)
        dqkv.append(x.grad)
    for got, want in zip(*outs):
        assert torch.equal(got, want)
    assert torch.equal(dqkv[0], dqkv[1])
    with torch.no_grad():  # no autograd: the split path's values
        for got, want in zip(te.rotary_qkv(base[:, pad:], cos, sin, q_heads=q_heads, kv_heads=kv_heads), outs[1]):
            assert torch.equal(got, want)


def test_rms_norm_of_strided_heads_and_its_gradient():
    """qk-norm's input: [T, heads, D] views of the fused projection (not contiguous across heads)."""
    torch.manual_seed(0)
    qkv = torch.randn(11, 3 * 4 * 8, requires_grad=True)
    w = torch.rand(8, requires_grad=True)
    out, none = te.rms_norm(qkv[:, 32:64].view(11, 4, 8), w, 1e-6)
    assert none is None and out.shape == (11, 4, 8)
    out.square().sum().backward()
    qkv_ref, w_ref = qkv.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    reference.rms_norm(qkv_ref[:, 32:64].view(11, 4, 8), w_ref, 1e-6)[0].square().sum().backward()
    torch.testing.assert_close(qkv.grad, qkv_ref.grad, rtol=0, atol=40 * EPS * qkv_ref.grad.abs().max().item())
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=0, atol=100 * EPS * w_ref.grad.abs().max().item())


def test_a_last_dim_of_one_element_runs_at_any_stride():
    """`as_rows` passes a width-1 last dim as a view whatever its stride (it is never stepped along); the C++ checks
    take it too and give what the contiguous copy gives: RMSNorm of [rows, 1] with a residual, SwiGLU's [rows, 1]
    output gradient, the log-prob statistics of a one-column shard."""
    torch.manual_seed(0)
    x_base, r_base = torch.randn(2, 14, requires_grad=True), torch.randn(3, 14, requires_grad=True)
    x, r = x_base.t()[::2, :1], r_base.t()[::2, 1:2]  # [7, 1], strides (2, 14): rows strided too
    assert x.stride() == (2, 14) and r.stride() == (2, 14)
    xc, rc = (t.detach().contiguous().requires_grad_() for t in (x, r))
    w = torch.rand(1)
    g = torch.randn(1, 7)
    outs = []
    for a, b in ((x, r), (xc, rc)):
        out, total = te.rms_norm(a, w, 1e-6, b)
        (out.t() * g).sum().backward()  # the output gradient reaches the kernel as a [7, 1] view, strides (1, 7)
        outs.append((out, total))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert torch.equal(x_base.grad[0, ::2], xc.grad[:, 0]) and torch.equal(r_base.grad[1, ::2], rc.grad[:, 0])
    assert not x_base.grad[:, 1::2].any() and not x_base.grad[1].any()

    gate_up = torch.randn(7, 2, requires_grad=True)
    (te.silu_and_mul(gate_up).t() * g).sum().backward()
    ref = gate_up.detach().clone().requires_grad_()
    (te.silu_and_mul(ref) * g.t().contiguous()).sum().backward()
    assert torch.equal(gate_up.grad, ref.grad)

    logits, targets = x.detach(), torch.zeros(7, dtype=torch.long)
    got = te.logprob_shard_stats(logits, targets, temperature=1.0)
    want = te.logprob_shard_stats(logits.contiguous(), targets, temperature=1.0)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_the_reference_runs_where_the_kernels_do_not_apply(monkeypatch):
    x, w = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True), torch.ones(8, dtype=torch.bfloat16)
    assert torch.equal(te.rms_norm(x, w, 1e-6)[0], reference.rms_norm(x, w, 1e-6)[0])  # bf16
    x32 = torch.randn(4, 8)  # no gradient asked for (the trainer's no-grad passes): the recorded call's values
    recorded = x32.clone().requires_grad_()
    assert torch.equal(te.rms_norm(x32, torch.ones(8), 1e-6)[0], te.rms_norm(recorded, torch.ones(8), 1e-6)[0])
    assert torch.equal(te.silu_and_mul(x32), te.silu_and_mul(recorded))
    monkeypatch.setattr(te, "kernel", lambda: None)  # no extension (no compiler, a failed build)
    xg = x32.clone().requires_grad_()
    out = te.silu_and_mul(xg)
    assert out.grad_fn is not None and "SiluAndMul" not in type(out.grad_fn).__name__
    assert torch.equal(out, reference.silu_and_mul(x32))


def test_a_double_backward_is_refused():
    x = torch.randn(4, 8, requires_grad=True)
    grad_out = torch.randn(4, 4, requires_grad=True)
    (g,) = torch.autograd.grad(te.silu_and_mul(x), x, grad_outputs=grad_out, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


def test_bad_inputs_are_refused_by_name():
    x = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(ValueError, match=r"weight must be \[8\]"):
        te.rms_norm(x, torch.ones(6), 1e-6)
    with pytest.raises(ValueError, match="residual shape"):
        te.rms_norm(x, torch.ones(8), 1e-6, torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"last dim \(7\) must be even"):
        te.silu_and_mul(torch.randn(4, 7, requires_grad=True))
    cos, sin = _tables(4, 8)
    with pytest.raises(ValueError, match=r"cos and sin must be \[3, 1, 8\]"):
        te.rotary_full(torch.randn(3, 2, 8), cos, sin)
    with pytest.raises(RuntimeError, match="x must be a CPU fp32 tensor"):  # the C++ checks name theirs too
        te.kernel().silu_and_mul_forward(torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="grad shape"):
        te.kernel().silu_and_mul_backward(torch.randn(3, 4), torch.randn(4, 8), False)


def test_the_policy_trains_through_the_kernels_as_through_torch():
    """The tiny preset's packed training forward and backward: the C++ kernels (the CPU defaults) against the
    torch reference ops (overridden), same weights and tokens."""
    from rl_engine.policy.model import CausalLM
    from rl_engine.policy.presets import preset_config

    for op in ("rms_norm_train", "silu_and_mul_train", "rotary_full"):
        assert registry.default_registry().resolution(op, "cpu").backend == "cpu"
    torch.manual_seed(0)
    cfg = preset_config("tiny")
    fused = CausalLM(cfg)
    previous = kernels.default_registry().config
    kernels.set_backend_overrides({"rms_norm_train": "torch", "silu_and_mul_train": "torch", "rotary_full": "torch"})
    try:
        plain = CausalLM(cfg)
    finally:
        kernels.configure(previous)
    plain.load_state_dict(fused.state_dict())
    lens = [9, 30, 1, 17]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lens])
    ids = torch.randint(0, cfg.vocab_size, positions.shape)
    targets = torch.randint(0, cfg.vocab_size, positions.shape)
    results = []
    for model in (fused, plain):
        lp, _ = model.token_logprobs(model.hidden_states(ids, positions=positions, cu_seqlens=cu), targets)
        lp.sum().backward()
        results.append((lp.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (lp_f, grads_f), (lp_p, grads_p) = results
    # a few ulp per norm / SwiGLU, carried through two layers and the head: well inside 1e-5 of log-probs ~ -4.6
    torch.testing.assert_close(lp_f, lp_p, rtol=0, atol=1e-5)
    for name, grad in grads_p.items():
        torch.testing.assert_close(grads_f[name], grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item(), msg=name)


@pytest.mark.parametrize("temperature,vocab_start,vocab_size,pad", [(1.0, 0, None, 0), (0.7, 0, None, 5),
                                                                    (1.0, 40, 90, 0), (1.3, 101, 120, 3),
                                                                    (1.0, 120, 101, 0)])
def test_logprob_stats_and_grad_match_the_reference(temperature, vocab_start, vocab_size, pad):
    """One vocab shard of 101 columns starting at `vocab_start` (columns at or past `vocab_size` are padding, the
    last case all of them), targets inside and outside the shard, a -inf logit, strided rows."""
    from rl_engine.kernels import logprob

    torch.manual_seed(vocab_start + pad)
    rows, width = 67, 101
    logits = 3 * _strided(rows, width, pad=pad)
    logits[5, 7] = float("-inf")
    targets = torch.randint(0, 240, (rows,))
    kw = dict(temperature=temperature, vocab_start=vocab_start, vocab_size=vocab_size)
    got, want = te.logprob_shard_stats(logits, targets, **kw), logprob.logprob_shard_stats(logits, targets, **kw)
    assert torch.equal(got.max, want.max) and torch.equal(got.target_logit, want.target_logit)  # no rounding
    # S and A: up to `width` terms, each from fast_exp (2 ulp) of an exactly shifted z: (width + 4) eps of the
    # sums of magnitudes (A's terms are all <= 0, so that is |A|)
    k = (width + 4) * EPS
    _within((got.sum_exp - want.sum_exp).abs(), k * want.sum_exp.abs() + 1e-30, "S")
    _within((got.sum_exp_shifted_z - want.sum_exp_shifted_z).abs(), k * want.sum_exp_shifted_z.abs() + 1e-30, "A")

    lse, _, entropy = logprob.combine_shard_stats(want, None)
    lse, entropy = torch.where(torch.isinf(lse), 0.0, lse), torch.where(torch.isnan(entropy), 0.0, entropy)
    g_lp, g_h = torch.randn(rows), torch.randn(rows)
    got = te.logprob_entropy_grad(logits, targets, g_lp, g_h, lse, entropy, **kw)
    want = logprob.logprob_entropy_grad(logits, targets, g_lp, g_h, lse, entropy, **kw)
    # -p (g_lp + g_H (log p + H)): p within 2 ulp (fast_exp), a few roundings; p below exp's fp32 range is 0 here
    # (1e-38 at most in the reference)
    z = (logits / temperature).double()
    log_p = z - lse.double()[:, None]
    p = log_p.exp()
    g_lp_abs, g_h_abs, h_abs = (t.double().abs()[:, None] for t in (g_lp, g_h, entropy))
    terms = p * (g_lp_abs + g_h_abs * (log_p.abs() + h_abs))
    terms = torch.where(torch.isfinite(terms), terms, 0.0)
    bound = 8 * EPS * (terms + g_lp.double().abs()[:, None] / temperature) + 1e-37
    _within((got.double() - want.double()).abs(), bound, "grad")
    n_valid = logprob.num_valid_columns(width, vocab_start, vocab_size)
    assert not got[:, n_valid:].any() and got[5, 7] == 0  # padding and the -inf logit get no gradient


def test_the_policy_log_probs_take_the_cpp_statistics():
    for op in ("logprob_shard_stats", "logprob_entropy_grad"):
        assert registry.default_registry().resolution(op, "cpu").backend == "cpu"
    with pytest.raises(ValueError, match="temperature"):
        te.logprob_shard_stats(torch.randn(3, 5), torch.zeros(3, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="targets"):
        te.logprob_shard_stats(torch.randn(3, 5), torch.zeros(4, dtype=torch.long), temperature=1.0)


# ---- AdamW ---------------------------------------------------------------------------------------------------------

# odd sizes (vector tails), one over the kernel's grain of 32768 (split over threads), the tiny preset's shapes
ADAM_SHAPES = [(101, 64), (64,), (128, 64), (384, 64), (64, 192), (1,), (7,), (33,), (3, 5), (40000,), (70003,)]


def _adam_pair(shapes, seed=0, **hyper):
    """Two copies of the same parameters, each under its own torch.optim.AdamW."""
    g = torch.Generator().manual_seed(seed)
    ref = [torch.randn(s, generator=g) for s in shapes]
    mine = [p.clone() for p in ref]
    return ref, mine, torch.optim.AdamW(ref, **hyper), torch.optim.AdamW(mine, **hyper), g


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("hyper", [dict(lr=1e-3, weight_decay=0.01), dict(lr=1e-6, weight_decay=0.0),
                                   dict(lr=3e-4, betas=(0.3, 0.95), eps=1e-6, weight_decay=0.1),
                                   dict(lr=1e-2, betas=(0.5, 0.999), weight_decay=0.01),  # lerp's other branch
                                   dict(lr=1e-3, betas=(0.95, 0.9), weight_decay=1.0)])
def test_adamw_step_is_bit_equal_to_torch_adamw_over_many_steps(threads, hyper):
    was = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref, mine, opt_ref, opt_mine, g = _adam_pair(ADAM_SHAPES, **hyper)
        for step in range(150):  # gradients over seven decades, as a run's move from large to small
            grads = [torch.randn(s, generator=g) * 10.0 ** (step % 7 - 4) for s in ADAM_SHAPES]
            for a, b, grad in zip(ref, mine, grads):
                a.grad, b.grad = grad.clone(), grad.clone()
            opt_ref.step()
            # torch's first step makes the state; every later one is the kernel's
            assert te.adamw_step(opt_mine) is (step > 0)
            if step == 0:
                opt_mine.step()
        for a, b in zip(ref, mine):
            assert torch.equal(a, b), f"parameter {tuple(a.shape)}: {(a != b).sum().item()} elements differ"
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(opt_ref.state[a][key], opt_mine.state[b][key]), (tuple(a.shape), key)
        assert opt_ref.state_dict()["param_groups"] == opt_mine.state_dict()["param_groups"]
    finally:
        torch.set_num_threads(was)


def test_the_master_weights_optimizer_steps_through_the_kernel_with_torchs_bits(monkeypatch):
    from rl_engine.policy.optimizer import MasterWeightsAdamW

    calls = []
    monkeypatch.setattr(te, "adamw_step", lambda opt, f=te.adamw_step: calls.append(f(opt)) or calls[-1])
    ref, mine, opt_ref, _, g = _adam_pair([(64, 48), (48,)], lr=1e-3, weight_decay=0.01)
    opt = MasterWeightsAdamW(mine, lr=1e-3, weight_decay=0.01)
    for _ in range(5):
        for a, b in zip(ref, mine):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt_ref.step()
        opt.step()
    assert calls == [False, True, True, True, True]
    assert all(torch.equal(a, b) for a, b in zip(ref, mine))


@pytest.mark.parametrize("change", ["amsgrad", "maximize", "foreach", "tensor_lr", "no_state", "bf16", "strided_grad",
                                    "hook", "torch_rounds_otherwise"])
def test_adamw_step_leaves_what_it_does_not_take_to_torch(change, monkeypatch):
    shape = (8, 6)
    p = torch.randn(shape, dtype=torch.bfloat16 if change == "bf16" else torch.float32)
    hyper = {"lr": torch.tensor(1e-3) if change == "tensor_lr" else 1e-3}
    if change in ("amsgrad", "maximize", "foreach"):
        hyper[change] = True
    opt = torch.optim.AdamW([p], **hyper)
    p.grad = torch.randn(shape, dtype=p.dtype)
    if change != "no_state":
        opt.step()
    if change == "strided_grad":
        p.grad = torch.randn(shape[::-1]).t()
    if change == "hook":
        opt.register_step_pre_hook(lambda *a: None)
    if change == "torch_rounds_otherwise":  # a torch build whose AdamW bits the kernel's check found to differ
        monkeypatch.setattr(te, "_adamw_matches_torch", lambda: False)
    before = (p.clone(), {k: v.clone() for k, v in opt.state[p].items()})
    assert te.adamw_step(opt) is False
    assert torch.equal(p, before[0]) and all(torch.equal(opt.state[p][k], v) for k, v in before[1].items())
