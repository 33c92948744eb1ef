"""The input checks and index math every paged-attention / sampling backend shares (`op_inputs`).

The same malformed call is refused with the same message by the torch reference, the Triton kernels
(under the interpreter on CPU) and the FlashInfer adapter (its checks run before FlashInfer is
imported, so on CPU too); the index math is checked against a token-by-token enumeration.
"""

from __future__ import annotations

import pytest
import torch

from rl_engine.kernels import flashinfer_adapter, op_inputs, reference


def _backend(name: str, op: str, request: pytest.FixtureRequest):
    if name == "triton":
        request.getfixturevalue("triton_device")  # skips, with the reason, where Triton cannot run
        from rl_engine.kernels.triton import paged_attention
        return getattr(paged_attention, op)
    return getattr(reference if name == "torch" else flashinfer_adapter, op)


def _decode_args() -> dict:
    return dict(q=torch.randn(2, 4, 8), k_cache=torch.randn(6, 4, 2, 8), v_cache=torch.randn(6, 4, 2, 8),
                block_tables=torch.tensor([[1, 2, -1], [3, -1, -1]], dtype=torch.int32),
                context_lens=torch.tensor([6, 3], dtype=torch.int32))


BAD_DECODE = {  # name -> (edit of the good arguments, words the error must contain)
    "v_cache_shape": (dict(v_cache=torch.randn(6, 4, 1, 8)), "k_cache/v_cache must both be"),
    "cache_not_4d": (dict(k_cache=torch.randn(6, 4, 16), v_cache=torch.randn(6, 4, 16)), "k_cache/v_cache must both be"),
    "head_dim": (dict(q=torch.randn(2, 4, 6)), "head_dim=8"),
    "heads_not_multiple": (dict(q=torch.randn(2, 3, 8)), "multiple of num_kv_heads=2"),
    "context_lens_length": (dict(context_lens=torch.tensor([6], dtype=torch.int32)), "context_lens [batch]"),
    "float_context_lens": (dict(context_lens=torch.tensor([6.0, 3.0])), "integer tensors"),
    "q_rows": (dict(q=torch.randn(3, 4, 8)), "one query per request"),
}


@pytest.mark.parametrize("backend", ["torch", "triton", "flashinfer"])
@pytest.mark.parametrize("case", sorted(BAD_DECODE))
def test_every_decode_backend_refuses_the_same_bad_input(request, backend, case):
    edit, words = BAD_DECODE[case]
    args = {**_decode_args(), **edit}
    decode = _backend(backend, "paged_decode_attention", request)
    with pytest.raises(ValueError, match="paged_decode_attention: ") as err:
        decode(**args, scale=0.5)
    assert words in str(err.value)


def test_good_decode_input_passes_every_check():
    dims = op_inputs.check_paged_decode(**_decode_args())
    assert dims == op_inputs.PagedDims(batch=2, num_heads=4, num_kv_heads=2, head_dim=8, block_size=4, group=2)
    out = reference.paged_decode_attention(**_decode_args(), scale=0.5)
    assert out.shape == (2, 4, 8) and torch.isfinite(out).all()


def test_reference_refuses_a_context_longer_than_its_block_table():
    """Request 0 needs ceil(13 / 4) = 4 blocks; the table has 3 columns (before: a shape error deep
    in einsum for decode, a silently short context for prefill)."""
    args = {**_decode_args(), "context_lens": torch.tensor([13, 3], dtype=torch.int32)}
    with pytest.raises(ValueError, match="needs 4 blocks of 4 but block_tables has only 3 columns"):
        reference.paged_decode_attention(**args, scale=0.5)
    with pytest.raises(ValueError, match="needs 4 blocks"):
        reference.paged_prefill_attention(args["q"], args["k_cache"], args["v_cache"], args["block_tables"],
                                          torch.tensor([0, 1, 2]), args["context_lens"], 0.5)
    with pytest.raises(ValueError, match="needs 4 blocks"):
        flashinfer_adapter.flashinfer_page_table(args["block_tables"], args["context_lens"], 4)


@pytest.mark.parametrize("backend", ["torch", "flashinfer"])
def test_prefill_backends_refuse_bad_cu_seqlens(request, backend):
    a = _decode_args()
    prefill = _backend(backend, "paged_prefill_attention", request)
    with pytest.raises(ValueError, match=r"paged_prefill_attention: cu_seqlens_q must be \[batch \+ 1\] = \[3\]"):
        prefill(a["q"], a["k_cache"], a["v_cache"], a["block_tables"], torch.tensor([0, 2]), a["context_lens"], 0.5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(("k_shape", "slots", "words"), [
    ((3, 1, 8), [0, 1, 2], "must be [tokens, num_kv_heads, head_dim]"),  # kv heads 1, cache has 2
    ((3, 2, 8), [0, 1], "slot_mapping must be [tokens] = [3]"),
])
def test_cache_write_backends_refuse_the_same_bad_input(request, backend, k_shape, slots, words):
    write = _backend(backend, "reshape_and_cache", request)
    k = torch.randn(k_shape)
    caches = torch.zeros(6, 4, 2, 8), torch.zeros(6, 4, 2, 8)
    with pytest.raises(ValueError, match="reshape_and_cache: ") as err:
        write(k, k.clone(), *caches, torch.tensor(slots))
    assert words in str(err.value)


def test_triton_refuses_a_strided_head_dim(request):
    decode = _backend("triton", "paged_decode_attention", request)
    args = _decode_args()
    args["q"] = torch.randn(2, 4, 16)[..., ::2]  # head_dim 8 with stride 2
    with pytest.raises(ValueError, match="unit stride in the last dimension of q"):
        decode(**args, scale=0.5)


@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
def test_index_math_matches_token_enumeration(block_size):
    lens = [0, 1, 3, 4, 5, 16, 17, 33]
    torch.manual_seed(block_size)
    table = torch.randperm(100)[:33].to(torch.int32)  # enough blocks for 33 tokens of block size 1
    lens_t = torch.tensor(lens, dtype=torch.int32)
    blocks = op_inputs.blocks_needed(lens_t, block_size)
    last = op_inputs.last_block_len(lens_t, block_size)
    for i, n in enumerate(lens):
        token_blocks = sorted({t // block_size for t in range(n)})
        assert int(blocks[i]) == len(token_blocks) == op_inputs.blocks_needed(n, block_size)
        assert int(last[i]) == (sum(1 for t in range(n) if t // block_size == token_blocks[-1]) if n else 0)
        expected = [int(table[t // block_size]) * block_size + t % block_size for t in range(n)]
        assert op_inputs.token_slots(table, n, block_size).tolist() == expected


def test_sampling_limits():
    k, p = op_inputs.sampling_limits(torch.tensor([0, -1, 3, 50, 10]), 0.9, batch=5, vocab=10, device=torch.device("cpu"))
    assert k.tolist() == [10, 10, 3, 10, 10] and k.dtype == torch.int64
    assert p.shape == (5,) and p.dtype == torch.float32 and torch.all(p == torch.tensor(0.9))
    k, p = op_inputs.sampling_limits(4, torch.tensor([0.5, 1.0]), batch=2, vocab=10, device=torch.device("cpu"))
    assert k.tolist() == [4, 4] and p.tolist() == [0.5, 1.0]
    with pytest.raises(ValueError, match=r"must be scalars or \[batch\] = \[2\]"):
        reference.top_k_top_p_sampling(torch.full((2, 10), 0.1), torch.tensor([1, 2, 3]), 1.0)
