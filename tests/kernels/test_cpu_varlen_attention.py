"""The C++ packed training attention (kernels/cpu/varlen_attention.py) against the torch references, forward and
gradients: plain packed causal sequences and shared-prefix groups, GQA, head dims 16 to 128, a value head dim of
its own (MLA), lengths from 0 and 1 to past one key chunk and one query block.

Tolerance: both sides run in fp32 and are compared with the float64 reference. torch's fp32 SDPA itself lands
within ~2e-7 to ~2e-6 of it (relative to the largest magnitude) on these shapes; the kernel sums the same
products in another order and its exp is within ~2 ulp, so its error is asserted to stay within 4x SDPA's
plus 1e-7 (a wrong mask, scale or missing gradient term is off by orders of magnitude more).

bf16 inputs: the kernel computes in fp32 and rounds its outputs once to bf16, so each element of the output and
of the gradients is compared with the float64 attention of the same bf16 inputs (and the same bf16 output
gradient) within u = 2^-8 of its magnitude (the rounding), plus, for dq and dk, the effect of the backward reading
the bf16-rounded output in rowsum(dO * O) (bounded per element from the measured output error, below), plus the
fp32 allowance above for the fp32 arithmetic."""

import pytest
import torch

from rl_engine.kernels import reference
from rl_engine.kernels.cpu import varlen_attention

pytestmark = pytest.mark.skipif(varlen_attention.kernel() is None, reason="the C++ extension cannot be built here")


def _layout(prompts: list[int], completions: list[list[int]]) -> tuple[list[int], list[int]]:
    """Segment lengths and prefix_of: the prompts first, then each prompt's completions."""
    lengths, prefix = list(prompts), [-1] * len(prompts)
    for p, comps in enumerate(completions):
        lengths += comps
        prefix += [p] * len(comps)
    return lengths, prefix


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach(), ref.detach()
    return float((x.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def _check(lengths, prefix, *, heads: int, kv_heads: int, head_dim: int, v_head_dim: int | None = None,
           strided: bool = True) -> None:
    torch.manual_seed(sum(lengths) + heads + head_dim)
    T, Dv = sum(lengths), v_head_dim or head_dim
    widths = [heads * head_dim, kv_heads * head_dim, kv_heads * Dv]
    qkv = torch.randn(T, sum(widths), dtype=torch.float64)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    prefix_of = torch.tensor(prefix, dtype=torch.int64)
    grad = torch.randn(T, heads, Dv, dtype=torch.float64)

    def run(fn, dtype):
        x = qkv.to(dtype, copy=True).requires_grad_()
        q, k, v = x.split(widths, dim=1)  # strided views, as the model's fused projection gives them
        q, k, v = q.view(T, heads, head_dim), k.view(T, kv_heads, head_dim), v.view(T, kv_heads, Dv)
        if not strided:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = fn(q, k, v)
        out.backward(grad.to(dtype))
        return out, x.grad

    if any(p >= 0 for p in prefix):
        kernel = lambda q, k, v: varlen_attention.shared_prefix_attention(q, k, v, cu, prefix_of, 0.3)  # noqa: E731
        torch_ref = lambda q, k, v: reference.shared_prefix_attention(q, k, v, cu, prefix_of, 0.3)  # noqa: E731
    else:
        kernel = lambda q, k, v: varlen_attention.varlen_causal_attention(q, k, v, cu, 0.3)  # noqa: E731
        torch_ref = lambda q, k, v: reference.varlen_causal_attention(q, k, v, cu, 0.3)  # noqa: E731
    exact = run(torch_ref, torch.float64)
    sdpa = run(torch_ref, torch.float32)
    ours = run(kernel, torch.float32)
    for name, a, b, e in zip(("output", "grad"), ours, sdpa, exact):
        bound = 4 * _rel(b, e) + 1e-7
        assert _rel(a, e) <= bound, f"{name}: {_rel(a, e):.2e} from float64, torch fp32 {_rel(b, e):.2e}"


_U_BF16 = 2.0**-8  # bf16's unit roundoff: one round-to-nearest of x is within u |x|


def _check_bf16(lengths, prefix, *, heads: int, kv_heads: int, head_dim: int, v_head_dim: int | None = None) -> None:
    """bf16 q, k, v (strided views of one fused tensor): output and gradients, elementwise against float64.

    The backward's delta_i = sum_d dO_id O_id reads the kernel's bf16 output, off the exact one by e_i =
    sum_d dO_id (O_id - O*_id) (measured here). dS_ij = P_ij (dP_ij - delta_i) is then off by P_ij e_i, so dq_i =
    scale sum_j dS_ij k_j by at most scale |e_i| sum_j P_ij |k_j| (the attention of |k| as values), and dk_j =
    scale sum_i dS_ij q_i by at most scale sum_i P_ij |e_i| |q_i| (the value gradient of the attention for the
    output gradient |e_i| |q_i|); both computed with the float64 reference."""
    torch.manual_seed(sum(lengths) + heads + head_dim)
    T, Dv = sum(lengths), v_head_dim or head_dim
    widths = [heads * head_dim, kv_heads * head_dim, kv_heads * Dv]
    qkv = torch.randn(T, sum(widths), dtype=torch.float64).bfloat16()
    grad = torch.randn(T, heads, Dv, dtype=torch.float64).bfloat16()
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    prefix_of = torch.tensor(prefix, dtype=torch.int64)
    scale = 0.3
    shared = any(p >= 0 for p in prefix)

    def split(x):
        q, k, v = x.split(widths, dim=1)
        return q.view(T, heads, head_dim), k.view(T, kv_heads, head_dim), v.view(T, kv_heads, Dv)

    def attend(module, q, k, v):
        if shared:
            return module.shared_prefix_attention(q, k, v, cu, prefix_of, scale)
        return module.varlen_causal_attention(q, k, v, cu, scale)

    def run(module, dtype):
        x = qkv.to(dtype, copy=True).requires_grad_()
        out = attend(module, *split(x))
        out.backward(grad.to(dtype))
        return out, x.grad

    ours, exact = run(varlen_attention, torch.bfloat16), run(reference, torch.float64)
    fp32 = run(reference, torch.float32)
    assert ours[0].dtype == ours[1].dtype == torch.bfloat16
    q, k, _ = (t.detach() for t in split(qkv.double()))
    e = (grad.double() * (ours[0].double() - exact[0])).sum(-1)  # [T, heads]
    values = k.abs().requires_grad_()
    pk = attend(reference, q, k, values)  # sum_j P_ij |k_j|
    pk.backward(e.abs()[..., None] * q.abs())
    dq_off = scale * e.abs()[..., None] * pk.detach()
    dk_off = scale * values.grad
    delta_off = torch.cat((dq_off.reshape(T, -1), dk_off.reshape(T, -1), torch.zeros(T, kv_heads * Dv)), dim=1)
    for name, a, ref, ref32, off in (("output", *(x[0].detach() for x in (ours, exact, fp32)), 0.0),
                                     ("grad", *(x[1] for x in (ours, exact, fp32)), delta_off)):
        fp32_allowance = (4 * _rel(ref32, ref) + 1e-7) * float(ref.abs().max())
        bound = _U_BF16 * (ref.abs() + off) + off + fp32_allowance
        err = (a.double() - ref).abs()
        assert (err <= bound).all(), f"{name}: worst error / bound {float((err / bound).max()):.2f}"


@pytest.mark.parametrize(("lengths", "prefix", "heads", "kv_heads", "head_dim", "v_head_dim"), [
    ([5, 17, 1, 30, 0, 22, 3, 70], [-1] * 8, 4, 2, 64, None),  # GQA, packed causal
    ([200, 7, 131], [-1] * 3, 8, 1, 32, None),  # past a query block and a key chunk
    (*_layout([13, 1, 80], [[64 - i % 5 * 13 for i in range(16)], [1] * 16, [70 - 3 * i for i in range(16)]]),
     4, 2, 16, None),  # shared-prefix groups of 16
    (*_layout([9, 4], [[12, 40], [3]]), 4, 4, 24, 16),  # MLA's value head dim of its own
])
def test_bf16_matches_float64_within_the_bf16_roundings(lengths, prefix, heads, kv_heads, head_dim, v_head_dim):
    _check_bf16(lengths, prefix, heads=heads, kv_heads=kv_heads, head_dim=head_dim, v_head_dim=v_head_dim)


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (8, 1)])
def test_packed_causal_matches_reference(head_dim, heads, kv_heads):
    _check([5, 17, 1, 30, 0, 22, 3, 70], [-1] * 8, heads=heads, kv_heads=kv_heads, head_dim=head_dim)


def test_long_sequences_cross_chunks_and_blocks():
    """Past one query block (32 rows) and one key chunk (64 keys), with the online softmax across chunks."""
    _check([200, 7, 131], [-1, -1, -1], heads=4, kv_heads=2, head_dim=32)


@pytest.mark.parametrize("n", [1, 16])
@pytest.mark.parametrize("head_dim", [16, 64])
def test_shared_prefix_groups_match_reference(n, head_dim):
    """Prompts of mixed lengths (1 to 80) each with n completions of mixed lengths (1 to 70), and an unshared sample."""
    lengths, prefix = _layout([13, 1, 80], [[64 - i % 5 * 13 for i in range(n)], [1] * n, [70 - 3 * i for i in range(n)]])
    lengths.insert(3, 9)  # a sample without a prefix among the prefix-free segments
    prefix.insert(3, -1)
    prefix = [p + (p >= 3) if p >= 0 else p for p in prefix]
    _check(lengths, prefix, heads=4, kv_heads=2, head_dim=head_dim)


def test_value_head_dim_of_its_own_and_contiguous_inputs():
    """MLA's expanded form: q and k of 24 dims (16 + 8 rotary), v of 16; head dims that are not multiples of 16."""
    lengths, prefix = _layout([9, 4], [[12, 40], [3]])
    _check(lengths, prefix, heads=4, kv_heads=4, head_dim=24, v_head_dim=16, strided=False)
    _check([9, 33], [-1, -1], heads=2, kv_heads=1, head_dim=20, v_head_dim=8)


def test_other_dtypes_and_no_grad_take_the_reference_or_match_it():
    """fp16 runs the torch reference (the kernel takes fp32 and bf16); a no-grad fp32 call gives the same output as
    with grad."""
    q = torch.randn(12, 2, 16)
    cu = torch.tensor([0, 5, 12])
    half = q.half()
    torch.testing.assert_close(varlen_attention.varlen_causal_attention(half, half, half, cu, 0.25),
                               reference.varlen_causal_attention(half, half, half, cu, 0.25), atol=0, rtol=0)
    with torch.no_grad():
        no_grad = varlen_attention.varlen_causal_attention(q, q, q, cu, 0.25)
    assert torch.equal(no_grad, varlen_attention.varlen_causal_attention(q.requires_grad_(), q, q, cu, 0.25).detach())


def test_bad_layout_is_refused_by_name():
    q = torch.randn(6, 2, 16)
    with pytest.raises(RuntimeError, match="must start at 0 and end at T"):
        varlen_attention.varlen_causal_attention(q, q, q, torch.tensor([0, 2, 5]), 0.25)
    with pytest.raises(RuntimeError, match=r"prefix_of\[1\] = 2 must be -1 or another segment without a prefix"):
        varlen_attention.shared_prefix_attention(q, q, q, torch.tensor([0, 2, 4, 6]), torch.tensor([-1, 2, 0]), 0.25)
