"""kernels/cpu/packed_linear.greedy_pick (csrc/small_gemm.cpp's greedy_screen): each row's first maximum of the
logits `linear` computes from the small-M GEMM's fp32 panels, screened by a bf16 product with a proven error
bound: the same token ids as `greedy_argmax(linear(x, W))` on random weights and on adversarial ones (exact
ties from duplicated rows, near-ties an ulp apart, huge and tiny norms, zero rows), None (the caller computes
the logits) where it cannot decide (NaN / inf, norms outside its range, too many candidates), and a fresh bf16
copy after the weight changes in place or is invalidated."""

from __future__ import annotations

import pytest
import torch

from rl_engine.kernels.cpu import ops, packed_linear

pytestmark = pytest.mark.skipif(not packed_linear.available()[0], reason=packed_linear.available()[1])


@pytest.fixture
def screen():
    """Register weights for the test's duration; skip where the screen is not compiled in (no avx512_bf16)."""
    registered = []

    def register(w):
        registered.extend(packed_linear.register([w], batch_size=64))
        if packed_linear._small is None or not packed_linear._small.has_screen():
            pytest.skip("greedy_screen needs the small-M GEMM with avx512_bf16")
        return w

    yield register
    packed_linear.release(registered)


def _pick(x, w):
    """(the screened pick or None, the reference: argmax_rows of the GEMM's logits)."""
    with torch.inference_mode(), packed_linear.reading():
        ref = ops.greedy_argmax(packed_linear.linear(x, w))
        return packed_linear.greedy_pick(x, w), ref


@pytest.mark.parametrize("rows,k,n", [(64, 256, 2048), (8, 100, 37), (3, 17, 1000), (20, 64, 48 * 5 + 16)])
@pytest.mark.parametrize("seed", range(3))
def test_random_weights_same_ids(screen, rows, k, n, seed):
    gen = torch.Generator().manual_seed(seed)
    w = screen(torch.randn(n, k, generator=gen) * 0.05)
    x = torch.nn.functional.rms_norm(torch.randn(rows, k, generator=gen), (k,)) * (1 + seed)
    got, ref = _pick(x, w)
    assert got is not None and torch.equal(got, ref)


def test_exact_ties_take_the_first_row(screen):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(512, 64, generator=gen)
    w[300] = w[7]
    w[100] = w[7]  # three equal rows: logits bit-equal
    w = screen(w)
    x = w[7].repeat(4, 1) + 1e-3 * torch.randn(4, 64, generator=gen)  # row 7's direction wins
    got, ref = _pick(x, w)
    assert torch.equal(ref, torch.full((4,), 7)) and torch.equal(got, ref)


def test_near_ties_an_ulp_apart(screen):
    """Rows that differ from the winner in one element's last bit (logits equal or an ulp or two apart, far
    inside the bf16 product's error): the pick is still the GEMM's first maximum."""
    gen = torch.Generator().manual_seed(2)
    k = 256
    base = torch.randn(k, generator=gen)
    w = torch.randn(1024, k, generator=gen) * 0.1
    for i, v in enumerate(range(500, 532)):
        row = base.clone()
        j = i % k
        row[j] = torch.nextafter(row[j], torch.tensor(float("inf") if i % 2 else float("-inf")))
        w[v] = row
    w = screen(w)
    x = base.repeat(16, 1) + 1e-6 * torch.randn(16, k, generator=gen)
    got, ref = _pick(x, w)
    assert got is not None and torch.equal(got, ref)


def test_huge_tiny_and_zero_norms(screen):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(300, 48, generator=gen)
    w[10] = 0  # a zero row: logit exactly 0
    w[20] *= 1e6
    w[30] *= 1e-20
    w = screen(w)
    for scale in (1e-9, 1e-3, 1.0, 1e6, 1e9):
        x = torch.randn(6, 48, generator=gen) * scale
        x[0] = -w[20] / 1e6 * scale  # row 20 loses: the zero row or another wins
        got, ref = _pick(x, w)
        assert got is not None and torch.equal(got, ref), scale
    # row norms outside [SCREEN_NORM_MIN, SCREEN_NORM_MAX] (or overflowing): not decided
    for x in (torch.full((2, 48), 1e-30), torch.full((2, 48), 1e30)):
        assert _pick(x, w)[0] is None


def test_non_finite_rows_are_not_decided(screen):
    gen = torch.Generator().manual_seed(4)
    w = screen(torch.randn(200, 32, generator=gen))
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(5, 32, generator=gen)
        x[3, 7] = bad
        assert _pick(x, w)[0] is None
    w2 = torch.randn(200, 32, generator=gen)
    w2[5, 0] = float("nan")
    w2 = screen(w2)
    assert _pick(torch.randn(5, 32, generator=gen), w2)[0] is None


def test_too_many_candidates_is_not_decided(screen, monkeypatch):
    """Every row equal: all logits tie, so every vocab row is a candidate."""
    w = screen(torch.ones(100, 16))
    x = torch.randn(3, 16)
    monkeypatch.setattr(packed_linear, "SCREEN_MAX_CANDIDATES", 99)
    assert _pick(x, w)[0] is None
    monkeypatch.setattr(packed_linear, "SCREEN_MAX_CANDIDATES", 100)
    got, ref = _pick(x, w)
    assert torch.equal(got, ref) and torch.equal(ref, torch.zeros(3, dtype=torch.long))


def test_weight_changes_are_seen(screen):
    gen = torch.Generator().manual_seed(5)
    w = screen(torch.randn(400, 64, generator=gen))
    x = torch.randn(8, 64, generator=gen)
    before, ref = _pick(x, w)
    assert torch.equal(before, ref)
    with torch.no_grad():
        w.mul_(-1)  # in place: a new version
    after, ref = _pick(x, w)
    assert torch.equal(after, ref) and not torch.equal(after, before)
    # a change the version counter does not show, then `invalidate`
    with torch.no_grad():
        w.data.copy_(torch.randn(400, 64, generator=gen))
    packed_linear.invalidate([w])
    again, ref = _pick(x, w)
    assert torch.equal(again, ref) and not torch.equal(again, after)


def test_outside_the_gemm_path_is_not_decided(screen):
    w = screen(torch.randn(100, 32))
    x = torch.randn(4, 32)
    assert packed_linear.greedy_pick(x, w) is None  # outside reading(): linear would not read the panels
    with torch.inference_mode(), packed_linear.reading():
        assert packed_linear.greedy_pick(x[:1], w) is None  # one row: the gemv, not the panels
        assert packed_linear.greedy_pick(x.double(), w) is None
