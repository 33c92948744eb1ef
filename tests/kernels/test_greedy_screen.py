"""kernels/cpu/packed_linear.greedy_pick (csrc/small_gemm.cpp's greedy_screen): each row's first maximum of the logits
`linear` computes from the small-M GEMM's fp32 panels, screened by a bf16 product with a proven error bound: the
same token ids as `greedy_argmax(linear(x, W))` on random weights and on adversarial ones (exact ties from
duplicated rows, near-ties an ulp apart, huge and tiny norms, zero rows, an estimate error at ~0.9 of the bound,
products the bf16 dot flushes that only the slack covers), None (the caller computes the logits) where it cannot
decide (NaN / inf, norms outside its range, too many candidates), and a fresh bf16 copy after the weight changes in
place or is invalidated."""

from __future__ import annotations

import pytest
import torch

from rl_engine.kernels.cpu import ops, packed_linear, small_gemm

pytestmark = pytest.mark.skipif(not packed_linear.available()[0], reason=packed_linear.available()[1])


@pytest.fixture(params=["panels", "amx"])
def screen(request, monkeypatch):
    """Register weights for the test's duration, the screen's estimates by its VDPBF16PS panels or by AMX tiles
    (`SCREEN_AMX`); skip where the screen is not compiled in (no avx512_bf16) or AMX is not (has_amx())."""
    registered = []
    monkeypatch.setattr(packed_linear, "SCREEN_AMX", request.param == "amx")

    def register(w):
        registered.extend(packed_linear.register([w], batch_size=64))
        if packed_linear._small is None or not packed_linear._small.has_screen():
            pytest.skip("greedy_screen needs the small-M GEMM with avx512_bf16")
        if request.param == "amx" and not packed_linear._small.has_amx():
            pytest.skip("the screen's AMX estimates need AMX-BF16 (compiled in and permitted: has_amx())")
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


@pytest.mark.parametrize("order", ["rising", "falling", "shuffled"])
@pytest.mark.parametrize("threads", [1, 2])
def test_logits_rising_across_the_vocabulary(screen, order, threads):
    """Steps of 32 near-equal logits (within the screen's bound of one another), each step 5% above the last, in
    rising, falling or shuffled order across a 4096-id vocabulary: every row has a full step of candidates (32), so
    the pick among them is the exact logits'; one thread or two (the estimates' blocks split between them). The ids
    equal the reference's, and rising ones win in the last step."""
    gen = torch.Generator().manual_seed(6)
    n, k = 4096, 64
    base = torch.rand(k, generator=gen) + 0.5
    step = 1.05 ** (torch.arange(n) // 32).float()  # (5% a step: the bound is ~1% of a logit here)
    if order == "falling":
        step = step.flip(0)
    elif order == "shuffled":
        step = step[torch.randperm(n, generator=gen)]
    w = screen(base * step[:, None] * (1 + 1e-6 * torch.randn(n, k, generator=gen)))
    x = torch.rand(64, k, generator=gen) / 8
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got, ref = _pick(x, w)
    finally:
        torch.set_num_threads(previous)
    assert got is not None and torch.equal(got, ref)
    if order == "rising":
        assert (ref >= n - 32).all()


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


def _bf16_product(x, w):
    """The screen's estimates as greedy_screen forms them (x and w rounded to bf16, their exact products summed in
    fp32 by its VDPBF16PS panels or its AMX tiles, as `SCREEN_AMX` made the screen): after a pick made the screen."""
    entry = getattr(w, packed_linear._ATTR).screen
    return packed_linear._small.screen_estimates(x.contiguous(), entry.packed, entry.amx, w.shape[0], small_gemm.PANEL,
                                                 small_gemm.ROW_BLOCK, small_gemm.MIN_MACS_PER_THREAD)


@pytest.mark.parametrize("rows,k,n", [(64, 256, 2048), (5, 100, 37), (33, 17, 1000), (40, 512, 96)])
def test_estimates_are_within_the_sum_bound(screen, rows, k, n):
    """Each estimate is the exact product of the bf16-rounded x and w summed in fp32: within 2 g S of it (g = K u /
    (1 - K u), S = sum_k |x'_k w'_k|), the part of the screen's bound the summation takes, for either path."""
    gen = torch.Generator().manual_seed(rows + k)
    w = screen(torch.randn(n, k, generator=gen) * 0.05)
    x = torch.randn(rows, k, generator=gen)
    _pick(x, w)
    entry = getattr(w, packed_linear._ATTR).screen
    assert (entry.amx is not None) == packed_linear.SCREEN_AMX  # (one bf16 copy: AMX tiles or panels)
    assert entry.packed.numel() == (0 if packed_linear.SCREEN_AMX else packed_linear._small.packed_size(
        w.bfloat16(), small_gemm.PANEL))
    with torch.inference_mode():
        a = _bf16_product(x, w).double()
    xb, wb = x.bfloat16().double(), w.bfloat16().double()
    g = k * 2.0**-24 / (1 - k * 2.0**-24)
    err = (a - xb @ wb.T).abs()
    assert a.shape == (rows, n) and bool((err <= 2 * g * (xb.abs() @ wb.abs().T)).all())
    assert float(err.max()) > 0  # (fp32 sums that round: the check is not vacuous)


def test_the_bound_is_what_keeps_the_winner(screen):
    """An estimate error near the proven bound: rows u = 0 and v = 1 = -u, x's and u's elements just above a bf16
    rounding midpoint where x_k u_k > 0 and just below the next one where x_k u_k < 0, so both round to 1 + 2^-7
    and the bf16 products cancel (a_u = t, a_v = -t from one exact coordinate t) while the fp32 logits are
    l_u = t - 0.472... < 0 < l_v: the estimates rank u over v by ~0.9 of e_u + e_v (a bound of 0.9 c, or no
    bound, leaves v out and picks u)."""
    k = 64
    up, down = 1 + 2.0**-8 + 2.0**-12, 1 + 2.0**-7 + 2.0**-8 - 2.0**-12  # both -> 1 + 2^-7 in bf16
    mag = torch.tensor([up, down] * (k // 2))
    x = torch.cat([torch.tensor([1.0, -1.0] * (k // 2)) * mag, torch.ones(1)])
    u = torch.cat([mag, torch.zeros(1)])
    cancel = float((x[:k].double() * u[:k].double()).sum())  # -0.4724...
    t = torch.tensor(-cancel).bfloat16()
    u[k] = float(t if float(t) < -cancel else torch.nextafter(t, torch.tensor(0.0, dtype=torch.bfloat16)))
    gen = torch.Generator().manual_seed(6)
    others = 0.001 * torch.randn(30, k + 1, generator=gen) - 0.01 * x  # logits ~ -0.65: never candidates
    w = screen(torch.cat([torch.stack([u, -u]), others]))
    xs = x.repeat(4, 1)
    got, ref = _pick(xs, w)
    assert torch.equal(ref, torch.ones(4, dtype=torch.long))  # v: l_v = -l_u > 0
    with torch.inference_mode():
        a = _bf16_product(xs[:1], w)[0]
    entry = getattr(w, packed_linear._ATTR).screen
    e_sum = float(x.norm()) * float(entry.bound[0] + entry.bound[1])
    assert float(a[0] - a[1]) > 0.9 * e_sum  # the estimates rank u first, by ~all of the bound
    assert got is not None and torch.equal(got, ref)


def test_the_slack_covers_flushed_products(screen):
    """Products below fp32's normal range: the bf16 dot flushes each partial sum to 0 (a_v = 0) where the fp32
    GEMM adds the 64 subnormal products exactly (l_v = 2^-123); row 0's one normal product (1.5 2^-124) keeps its
    estimate. Only the slack K 2^-124 (1 + ||x||)(1 + ||w||) keeps row 1 a candidate."""
    k = 64
    x = torch.full((3, k), 2.0**-43)  # ||x|| = 2^-40: SCREEN_NORM_MIN
    v = torch.full((k,), 2.0**-86)  # each product 2^-129
    u = torch.zeros(k)
    u[0] = 1.5 * 2.0**-81
    w = screen(torch.stack([u, v, torch.full((k,), -(2.0**-82))]))
    got, ref = _pick(x, w)
    assert torch.equal(ref, torch.ones(3, dtype=torch.long))
    with torch.inference_mode():
        a = _bf16_product(x[:1], w)[0]
    if float(a[1]) != 0.0:
        pytest.skip("this CPU's VDPBF16PS keeps subnormal sums (the slack is not what decides here)")
    assert float(a[0]) > 0.0
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


def test_screen_pays_is_measured_once_per_shape_threads_and_row_bucket(screen, monkeypatch):
    """`screen_pays` times the screen against the logits + argmax at the first call of each (vocab, hidden, threads,
    rows rounded up to a power of two) and keeps the choice; a call the screen cannot decide (a NaN row) measures
    nothing and keeps nothing (False: the logits)."""
    monkeypatch.setattr(packed_linear, "_screen_pays", {})
    timed = []
    fn = packed_linear._time_screen

    def counted(x, w, key):
        timed.append(key)
        return fn(x, w, key)

    monkeypatch.setattr(packed_linear, "_time_screen", counted)
    gen = torch.Generator().manual_seed(9)
    w = screen(torch.randn(700, 64, generator=gen) * 0.05)
    threads = torch.get_num_threads()
    with torch.inference_mode(), packed_linear.reading():
        nan = torch.randn(40, 64, generator=gen)
        nan[3, 5] = float("nan")
        assert packed_linear.screen_pays(nan, w) is False and packed_linear._screen_pays == {}
        choices = [packed_linear.screen_pays(torch.randn(rows, 64, generator=gen), w) for rows in (40, 64, 33, 2, 5, 8)]
    assert timed == [(700, 64, threads, 64), (700, 64, threads, 64), (700, 64, threads, 2), (700, 64, threads, 8)]
    assert packed_linear._screen_pays == {(700, 64, threads, 64): choices[0], (700, 64, threads, 2): choices[3],
                                          (700, 64, threads, 8): choices[4]}
    assert choices[:3] == [choices[0]] * 3 and choices[4] == choices[5]
    assert all(type(c) is bool for c in choices)
