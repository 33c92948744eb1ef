"""Batch-invariant ops (model.batch_invariant): a row's / a query's result is the same bits whatever
else shares its call, they stay close to the ordinary ops, the model binds them at build, and the mode
refuses what did not go through them."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from rl_engine import kernels
from rl_engine.kernels import invariant as inv
from rl_engine.kernels import registry
from rl_engine.policy import CausalLM, ModelConfig

# (start, length) slices of a 300-row batch (tiles of 128 rows): alone, at odd offsets, across tile
# boundaries, and every call shape (1..128 rows, padded to 4, 8, ..., 128) at other offsets
ROWS = 2 * inv.ROW_TILE + 44
SLICES = [(0, 1), (5, 1), (3, 2), (3, 7), (10, 20), (31, 2), (1, 40), (7, 93), (120, 17), (0, 129), (9, 291)] + [
    (m % 13, m) for m in range(1, inv.ROW_TILE + 1, 3)] + [(0, ROWS)]


@pytest.fixture
def invariant_registry():
    before = kernels.set_batch_invariant(True)
    yield
    kernels.set_batch_invariant(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,n", [(64, 192), (256, 97), (1024, 512)])
def test_linear_rows_do_not_depend_on_the_batch(threads, dtype, k, n):
    gen = torch.Generator().manual_seed(k + n)
    x = torch.randn(ROWS, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    full = inv.linear(x, w, b)
    for start, length in SLICES:
        assert torch.equal(inv.linear(x[start:start + length], w, b), full[start:start + length]), (start, length)
    with torch.enable_grad():  # autograd takes the concatenating path, with the same bits
        assert torch.equal(inv.linear(x[3:], w.requires_grad_(), b), full[3:])
    # The same product as F.linear up to rounding: fp32 accumulation (k eps32 sum |x||w|), then the
    # product and the bias add each rounded to the dtype (eps_dtype (sum |x||w| + |result|)).
    exact = x.double() @ w.double().t() + b.double()
    magnitude = x.double().abs() @ w.double().abs().t()
    bound = k * torch.finfo(torch.float32).eps * magnitude + torch.finfo(dtype).eps * (magnitude + exact.abs())
    assert ((full.double() - exact).abs() <= bound + 1e-30).all()


def _attention_inputs(dtype, length=150, hq=4, hkv=2, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(length, h, d, generator=gen).to(dtype) for h in (hq, hkv, hkv))
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_query_sees_the_same_reduction_in_every_path(threads, dtype):
    q, k, v = _attention_inputs(dtype)
    n = q.shape[0]
    packed = inv.varlen_causal_attention(q, k, v, [0, n], 0.25)
    # prefill of the whole sequence = packed training forward; a query alone over only its prefix
    for p in (0, 5, 31, 32, 33, 100, n - 1):
        alone = inv.sequence_attention(q[p:p + 1], k[:p + 1], v[:p + 1], torch.tensor([p]), scale=0.25)
        assert torch.equal(alone[0], packed[p]), p
    # a chunk of a chunked prefill over its cached prefix
    chunk = inv.sequence_attention(q[40:91], k[:91], v[:91], torch.arange(40, 91), scale=0.25)
    assert torch.equal(chunk, packed[40:91])
    # paged decode: one key sequence per row, padded to the batch's longest
    block_size, rows = 16, [3, 77, n - 1, 31]
    blocks = -(-n // block_size)
    k_cache = torch.zeros(1 + blocks, block_size, *k.shape[1:], dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    table = torch.randperm(blocks, generator=torch.Generator().manual_seed(1)) + 1  # scattered blocks
    for pos in range(n):
        k_cache[table[pos // block_size], pos % block_size] = k[pos]
        v_cache[table[pos // block_size], pos % block_size] = v[pos]
    tables = table[None].repeat(len(rows), 1).int()
    decode = inv.paged_decode_attention(q[rows], k_cache, v_cache, tables, torch.tensor(rows) + 1, 0.25)
    assert torch.equal(decode, packed[rows])
    prefill = inv.paged_prefill_attention(q[60:90], k_cache, v_cache, tables[:1], torch.tensor([0, 30]),
                                          torch.tensor([90]), 0.25)
    assert torch.equal(prefill, packed[60:90])
    # and it is causal attention: close to SDPA's (fp32 accumulation in both)
    rep = q.shape[1] // k.shape[1]
    sdpa = F.scaled_dot_product_attention(
        q.float().transpose(0, 1)[None], k.float().repeat_interleave(rep, 1).transpose(0, 1)[None],
        v.float().repeat_interleave(rep, 1).transpose(0, 1)[None], is_causal=True, scale=0.25)[0].transpose(0, 1)
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps * sdpa.abs().max().item()
    assert (packed.float() - sdpa).abs().max() <= tol


def test_mode_refuses_products_and_attention_outside_the_invariant_ops():
    x, w = torch.randn(5, 8), torch.randn(3, 8)
    q, k = torch.randn(40, 2, 8), torch.randn(40, 1, 8)
    want_linear, want_attention = inv.linear(x, w), inv.varlen_causal_attention(q, k, k, [0, 40], 0.3)
    with inv.BatchInvariantMode():
        # the invariant implementations run their own products unseen, with the same result
        assert torch.equal(inv.linear(x, w), want_linear)
        assert torch.equal(inv.varlen_causal_attention(q, k, k, [0, 40], 0.3), want_attention)
        assert torch.equal(torch.nn.functional.silu(x) * 2, torch.nn.functional.silu(x) * 2)  # other ops run
        for name, fn in (("torch.nn.functional.linear", lambda: F.linear(x, w)),
                         ("torch.nn.functional.linear", lambda: torch.nn.Linear(8, 3)(x)),
                         ("matmul", lambda: x @ w.t()), ("torch.matmul", lambda: torch.matmul(x, w.t())),
                         ("torch.addmm", lambda: torch.addmm(torch.ones(3), x, w.t())),
                         ("torch.bmm", lambda: torch.bmm(x[None], w.t()[None])),
                         ("torch.einsum", lambda: torch.einsum("ij,kj->ik", x, w)),
                         ("scaled_dot_product_attention",
                          lambda: F.scaled_dot_product_attention(x[None, None], x[None, None], x[None, None]))):
            with pytest.raises(inv.BatchInvariantError, match=re.escape(name)):
                fn()


def _tiny_model() -> CausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="qwen2", vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8)
    return CausalLM(cfg).requires_grad_(False)


def _forward(model: CausalLM, n: int = 9) -> torch.Tensor:
    ids, pos = torch.arange(n) % 61, torch.arange(n)
    return model.compute_logits(model.hidden_states(ids, positions=pos, cu_seqlens=torch.tensor([0, n])))


def test_model_binds_the_invariant_ops_and_checks_only_its_first_forward_of_each_kind(invariant_registry):
    model = _tiny_model()
    assert model.batch_invariant
    mlp = model.layers[0].mlp
    assert mlp.gate_up_proj._dense is inv.linear and mlp.down_proj._dense is inv.linear
    assert model.lm_head.dense is inv.linear
    seen = []
    model.layers[0].register_forward_pre_hook(lambda *_: seen.append(torch._C._is_torch_function_mode_enabled()))
    first = _forward(model)
    assert torch.equal(_forward(model), first) and seen == [True, False]  # no mode in the hot path
    with torch.no_grad():  # another kind (autograd off): checked once
        _forward(model)
    assert seen == [True, False, True]


def test_a_model_rebinds_under_its_own_mode_when_moved():
    """`.to()` / `.float()` choose each layer's kernels again: a model keeps the mode it was built with
    even when the process registry's has changed since (tests and benchmarks build both kinds)."""
    before = kernels.set_batch_invariant(True)
    try:
        invariant_model = _tiny_model()
    finally:
        kernels.set_batch_invariant(before)
    default_model = _tiny_model()
    kernels.set_batch_invariant(False)
    invariant_model.float()
    assert invariant_model.layers[0].mlp.down_proj._dense is inv.linear and invariant_model.lm_head.dense is inv.linear
    before = kernels.set_batch_invariant(True)
    try:
        default_model.float()
    finally:
        kernels.set_batch_invariant(before)
    assert default_model.layers[0].mlp.down_proj._dense is not inv.linear and not default_model.batch_invariant
    assert not kernels.default_registry().config.batch_invariant  # the process's setting is left as it was


@pytest.mark.parametrize("unbound,name", [("linear", "torch.nn.functional.linear"),
                                          ("attention", "scaled_dot_product_attention")])
def test_model_refuses_a_layer_that_bypasses_the_invariant_ops(invariant_registry, unbound, name):
    """A layer whose product or attention is not the registry's invariant one fails at its first
    forward, with the op named (it would otherwise break invariance silently)."""
    model = _tiny_model()
    attn = model.layers[1].self_attn
    if unbound == "linear":
        model.layers[1].mlp.down_proj._dense = F.linear
    else:
        def sdpa(q, k, v, cu_seqlens, scale):
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1).transpose(0, 1) for t in (k, v))
            return F.scaled_dot_product_attention(q.transpose(0, 1), k, v, is_causal=True, scale=scale).transpose(0, 1)
        attn._varlen_attention = sdpa
    for _ in range(2):  # and again: a refused kind is never taken as checked
        with pytest.raises(inv.BatchInvariantError, match=re.escape(name)):
            _forward(model)
    kernels.set_batch_invariant(False)  # the default model runs the same code without a check
    _forward(_tiny_model())


def test_registry_resolves_invariant_implementations_and_refuses_the_rest(invariant_registry):
    assert kernels.resolve("varlen_causal_attention", "cpu") is inv.varlen_causal_attention
    assert kernels.resolve("paged_decode_attention", "cpu") is inv.paged_decode_attention
    assert registry.default_registry().resolution("rms_norm", "cpu").reason.startswith("batch-invariant")
    with pytest.raises(ValueError, match="top_k_top_p_sampling has no batch-invariant implementation"):
        kernels.resolve("top_k_top_p_sampling", "cpu")
    reg = registry.KernelRegistry(registry.KernelConfig(overrides={"rms_norm": "triton"}, batch_invariant=True))
    with pytest.raises(ValueError, match="rms_norm='triton' has no batch-invariant implementation"):
        reg.resolve("rms_norm", "cpu")
