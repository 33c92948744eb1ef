"""The sampler: exact distributions after truncation, the log-prob contract, per-row seeding."""

from __future__ import annotations

import pytest
import torch

from rl_engine.inference.sampler import Sampler, SampleRow, token_seed, token_uniforms
from rl_engine.inference.sampling_params import SamplingParams


def sample(logits, params: SamplingParams | list[SamplingParams], seeds=None, engine_seed: int = 0):
    rows_params = params if isinstance(params, list) else [params] * logits.shape[0]
    seeds = seeds or [None] * logits.shape[0]
    sampler = Sampler(device=torch.device("cpu"), seed=engine_seed)
    return sampler(logits, [SampleRow(p, s) for p, s in zip(rows_params, seeds)])


def frequencies(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).float() / len(tokens)


LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, -8.0])


def test_greedy_takes_argmax_and_reports_temperature_one_logprobs():
    logits = torch.randn(5, 50)
    tokens, logprobs = sample(logits, SamplingParams(temperature=0.0))
    assert tokens == logits.argmax(-1).tolist()
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(logprobs), expected, atol=1e-6)


def test_sampled_distribution_is_softmax_of_logits_over_temperature():
    n = 40000
    logits = LOGITS.expand(n, -1).clone()
    tokens, logprobs = sample(logits, SamplingParams(temperature=0.7))
    target = torch.softmax(LOGITS / 0.7, -1)
    assert (frequencies(tokens, 8) - target).abs().max() < 0.01
    # log-probs are log_softmax(logits / T) of the drawn token
    assert torch.allclose(torch.tensor(logprobs), target.log()[torch.tensor(tokens)], atol=1e-5)


def test_top_k_top_p_min_p_truncate_but_logprobs_do_not():
    n = 30000
    logits = LOGITS.expand(n, -1).clone()
    full = torch.log_softmax(LOGITS, -1)
    probs = full.exp()  # 0.419, 0.254, 0.154, 0.093, 0.057, ...
    cases = {
        "top_k": (SamplingParams(top_k=3), [0, 1, 2]),
        "top_p": (SamplingParams(top_p=0.8), [0, 1, 2]),  # mass before token 2 is 0.67 < 0.8, before 3 is 0.83
        "min_p": (SamplingParams(min_p=0.25), [0, 1, 2]),  # p >= 0.25 * 0.42 = 0.105 drops 0.093
        "all": (SamplingParams(top_k=4, top_p=0.6, min_p=0.01), [0, 1]),
    }
    for name, (params, kept) in cases.items():
        tokens, logprobs = sample(logits, params)
        freq = frequencies(tokens, 8)
        target = torch.zeros(8)
        target[kept] = probs[kept] / probs[kept].sum()
        assert (freq - target).abs().max() < 0.015, name
        assert torch.allclose(torch.tensor(logprobs), full[torch.tensor(tokens)], atol=1e-6), name


def test_rows_with_different_params_in_one_batch():
    logits = torch.randn(4, 30)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=2.0, top_k=1),
              SamplingParams(temperature=0.5, top_p=1e-6), SamplingParams(temperature=1.0)]
    tokens, logprobs = sample(logits, params)
    assert tokens[:3] == logits[:3].argmax(-1).tolist()  # greedy, top-1, tiny nucleus
    temps = torch.tensor([1.0, 2.0, 0.5, 1.0])
    expected = torch.log_softmax(logits / temps[:, None], -1).gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(logprobs), expected, atol=1e-6)


def test_seeded_rows_do_not_depend_on_position_or_neighbours():
    torch.manual_seed(0)
    row = torch.randn(64)
    seed = token_seed(1234, 0, 17)
    params = SamplingParams(temperature=1.0)
    alone, _ = sample(row[None], params, seeds=[seed])
    batch = torch.randn(6, 64)
    batch[4] = row
    seeds = [None, token_seed(5, 0, 1), None, token_seed(6, 1, 2), seed, None]
    for engine_seed in (0, 1):
        tokens, _ = sample(batch, params, seeds=seeds, engine_seed=engine_seed)
        assert tokens[4] == alone[0]
    # different token positions of the same request get different draws
    draws = {sample(row[None], params, seeds=[token_seed(1234, 0, p)])[0][0] for p in range(40)}
    assert len(draws) > 5


def test_token_seed_is_a_fixed_function():
    assert token_seed(0, 0, 0) == 0
    assert token_seed(1, 0, 0) != token_seed(0, 1, 0) != token_seed(0, 0, 1)
    assert 0 <= token_seed(2**40, 3, 10**6) < 2**63


def test_token_uniforms_equal_token_seed_bit_for_bit():
    # the engine's batched uniforms (numpy uint64) against the Python definition, over seeds that wrap
    seeds = [0, 1, 7, 2**40 + 3, 2**64 + 5, -3, 123456789123456789, 2**63 - 1]
    indices = [0, 3, 15, 1, 2, 0, 7, 255]
    positions = [0, 17, 4095, 10**6, 33, 1, 2**20, 9]
    expected = [token_seed(s, i, p) / 2.0 ** 63 for s, i, p in zip(seeds, indices, positions)]
    assert token_uniforms(seeds, indices, positions).tolist() == expected


def test_a_batch_of_one_setting_samples_each_row_as_alone():
    # distinct SamplingParams with the same settings (an RL step's requests differ only in their seed) take
    # the sampler's one-setting path; truncation and draws must match each row sampled on its own
    torch.manual_seed(1)
    logits = torch.randn(6, 64) * 3
    params = [SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.01, seed=i) for i in range(6)]
    seeds = [token_seed(i, 0, 5) for i in range(6)]
    tokens, logprobs = sample(logits, params, seeds=seeds)
    for r in range(6):
        alone, alone_lp = sample(logits[r:r + 1], [params[r]], seeds=[seeds[r]])
        assert tokens[r] == alone[0] and logprobs[r] == alone_lp[0]
    mixed = params[:5] + [params[5].clone(temperature=0.5)]  # one row differs: the per-row path
    tokens2, logprobs2 = sample(logits, mixed, seeds=seeds)
    assert tokens2[:5] == tokens[:5] and logprobs2[:5] == logprobs[:5]


def test_compiled_greedy_equals_eager_argmax_and_logprobs():
    """Sampler(compile_greedy=True) (compile_decode's sampler): the compiled one-pass argmax and log-prob
    against the eager path, fp32 and bf16 logits, one row and several (one compile each, called without dynamo's
    guards), ties at the maximum included (the first index wins, as torch.max); strided logits through the guarded
    compile."""
    from rl_engine.inference.compiled_decode import cpp_compiler

    if cpp_compiler() is None:
        pytest.skip("inductor's CPU backend needs a C++ compiler")
    eager = Sampler(device=torch.device("cpu"), seed=0)
    compiled = Sampler(device=torch.device("cpu"), seed=0, compile_greedy=True)
    g = torch.Generator().manual_seed(0)
    greedy = SamplingParams(temperature=0.0)
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            for rows in (1, 5):
                logits = (torch.randn(rows, 3000, generator=g) * 3).to(dtype)
                logits[:, [40, 9]] = logits.max() + 1  # a tie at every row's maximum
                if rows > 1:
                    logits[-1] = logits[-1].roll(7)  # one row's maximum elsewhere (9 + 7)
                params = [greedy] * rows
                tokens, logprobs = compiled.sample(logits, params, draw=list)
                tokens0, logprobs0 = eager.sample(logits, params, draw=list)
                assert tokens == tokens0 and tokens[0] == 9 and tokens[-1] == (16 if rows > 1 else 9)
                expected = torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(tokens)[:, None])[:, 0]
                # fp32 sums of 3000 exponentials in another order: a few ulps of log(S) apart (|log S| < 10)
                assert torch.allclose(torch.tensor(logprobs, dtype=torch.float64), expected, rtol=0, atol=1e-6)
                assert torch.allclose(torch.tensor(logprobs), torch.tensor(logprobs0), rtol=0, atol=1e-6)
        # each (dtype, one row or more, vocabulary, threads) compiled once and called directly; strided logits take
        # the guarded compile
        threads = torch.get_num_threads()
        assert sorted(map(str, compiled._compiled_greedy._direct)) == sorted(
            map(str, [(d, one, 3000, threads) for d in (torch.float32, torch.bfloat16) for one in (True, False)]))
        strided = (torch.randn(5, 6000, generator=g) * 3)[:, ::2]
        assert compiled.sample(strided, [greedy] * 5, draw=list)[0] == eager.sample(strided, [greedy] * 5, draw=list)[0]
        assert len(compiled._compiled_greedy._direct) == 4
        # a vocabulary past 4096 (inductor's graph for <= 4096 sums plainly: its guard bounds the size) gets a graph
        # of its own, within the contract of the float64 log-softmax (its fp32 sums of 152k terms: up to ~7e-6 apart,
        # 64 rows measured; one row 1.4-2.6e-6; eager greedy_logprobs 2.2e-7)
        wide = torch.randn(2, 152_064, generator=g) * 3
        for rows in (wide, wide[:1]):  # the graph of one row too (every size takes the compiled pass)
            tokens, logprobs = compiled.sample(rows, [greedy] * len(rows), draw=list)
            expected = torch.log_softmax(rows.double(), -1).gather(1, torch.tensor(tokens)[:, None])[:, 0]
            assert torch.allclose(torch.tensor(logprobs, dtype=torch.float64), expected, rtol=0, atol=1e-5)
        keys = set(compiled._compiled_greedy._direct)
        assert {(torch.float32, one, 152_064, threads) for one in (True, False)} <= keys


def test_compiled_greedy_with_dynamo_disabled_runs_eagerly_and_warns(monkeypatch, caplog):
    """TORCHDYNAMO_DISABLE=1: the compiled greedy pass runs greedy_logprobs eagerly (the eager sampler's bits) and says
    so once per compile key (`compiled_call.direct_or_compiled`, as compile_decode's steps), where it fell back
    silently before."""
    import logging

    from rl_engine.inference import compiled_call

    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    caplog.set_level(logging.WARNING, logger=compiled_call.__name__)
    eager = Sampler(device=torch.device("cpu"), seed=0)
    compiled = Sampler(device=torch.device("cpu"), seed=0, compile_greedy=True)
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(4)) * 3
    greedy = [SamplingParams(temperature=0.0)] * 3
    with torch.inference_mode():
        for _ in range(2):
            assert compiled.sample(logits, greedy, draw=list) == eager.sample(logits, greedy, draw=list)
    assert [r.getMessage() for r in caplog.records] == [
        "compile_greedy: dynamo is disabled (TORCHDYNAMO_DISABLE=1), so greedy_logprobs_float32_rows_v500_t"
        f"{torch.get_num_threads()} runs eagerly; unset it to compile it"]


def test_compiled_greedy_refused_with_batch_invariant():
    with pytest.raises(ValueError, match="compile_greedy=True cannot be combined with batch_invariant"):
        Sampler(device=torch.device("cpu"), seed=0, batch_invariant=True, compile_greedy=True)


def test_compiled_greedy_takes_every_all_greedy_batch_with_log_probs():
    """Under compile_greedy every all-greedy batch that asks for log-probs takes the compiled pass, one row of a
    small vocabulary included (called as its compiled code it is faster than the eager pass at every size measured),
    with the eager sampler's tokens and its log-probs within a few ulps."""
    from rl_engine.inference.compiled_decode import cpp_compiler

    if cpp_compiler() is None:
        pytest.skip("inductor's CPU backend needs a C++ compiler")
    eager = Sampler(device=torch.device("cpu"), seed=0)
    compiled = Sampler(device=torch.device("cpu"), seed=0, compile_greedy=True)
    greedy = SamplingParams(temperature=0.0)
    g = torch.Generator().manual_seed(1)
    calls = []
    inner = compiled._compiled_greedy
    compiled._compiled_greedy = lambda logits: calls.append(tuple(logits.shape)) or inner(logits)
    with torch.inference_mode():
        for rows in (1, 3):
            logits = torch.randn(rows, 64, generator=g) * 3
            tokens, logprobs = compiled.sample(logits, [greedy] * rows, draw=list)
            tokens0, logprobs0 = eager.sample(logits, [greedy] * rows, draw=list)
            assert tokens == tokens0
            assert torch.allclose(torch.tensor(logprobs), torch.tensor(logprobs0), rtol=0, atol=1e-6)
        # no log-probs asked: the greedy argmax alone, compiled pass or not
        assert compiled.sample(logits, [greedy] * 3, draw=list, logprobs=False)[0] == tokens0
    assert calls == [(1, 64), (3, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, top_p=0.9),
                                    [SamplingParams(temperature=0.0), SamplingParams(temperature=1.3, top_k=5)] * 3])
def test_no_logprobs_same_tokens(dtype, params):
    """sample(..., logprobs=False) returns None for the log-probs and the tokens of the full pass."""
    logits = torch.randn(6, 300).to(dtype)
    logits[0, :2] = logits[0].max()  # a tie: the first maximum, as with log-probs
    rows = params if isinstance(params, list) else [params] * 6
    uniforms = [0.1, 0.5, 0.9, 0.3, 0.7, 0.05]
    sampler = Sampler(device=torch.device("cpu"), seed=0)
    full = sampler.sample(logits, rows, lambda: uniforms)
    tokens, logprobs = sampler.sample(logits, rows, lambda: uniforms, logprobs=False)
    assert logprobs is None and len(full[1]) == 6 and tokens == full[0]


def test_an_untruncated_row_draws_through_the_same_op_whatever_its_neighbours():
    """The one-setting path samples untruncated rows through the registry's inverse_cdf_sample (on CPU a C++
    pass whose draw can part from the torch path's within a few ulp of a token boundary): a seeded row must
    take that op in a mixed batch too (beside a greedy and a top-k row), so its token never depends on what
    else is in the batch. A spy op that marks its rows (token V-1, log-prob 0) shows which path each took."""
    torch.manual_seed(2)
    logits = torch.randn(3, 16)
    calls = []

    def spy(z, uniforms, *, logprobs):
        calls.append(z.shape[0])
        return torch.full((z.shape[0],), z.shape[1] - 1), torch.zeros(z.shape[0]) if logprobs else None

    plain = SamplingParams(temperature=0.8)
    for params, plain_rows in (([plain] * 3, [0, 1, 2]),
                               ([plain, SamplingParams(temperature=0.0), plain.clone(top_k=4)], [0])):
        sampler = Sampler(device=torch.device("cpu"), seed=0)
        sampler._sample = spy
        tokens, logprobs = sampler(logits, [SampleRow(p, token_seed(9, 0, i)) for i, p in enumerate(params)])
        assert calls.pop() == len(plain_rows)
        for r in range(3):
            assert (tokens[r] == 15 and logprobs[r] == 0.0) == (r in plain_rows), (params, r, tokens, logprobs)
    # and the real op gives the row the same token and log-prob alone, in one setting and beside others
    seed = token_seed(9, 0, 0)
    alone = sample(logits[:1], plain, seeds=[seed])
    mixed = sample(logits, [plain, SamplingParams(temperature=0.0), plain.clone(top_k=4)], seeds=[seed, None, 5])
    assert (mixed[0][0], mixed[1][0]) == (alone[0][0], alone[1][0])


def test_a_mixed_batch_draws_each_row_once_by_the_path_that_owns_it(monkeypatch):
    """Per-row settings in one batch: the untruncated sampled rows go to the registry's inverse_cdf_sample only, the
    torch path (truncation, the cumulative sum, greedy argmax) sees only the other rows, and a batch of per-request
    temperatures without truncation runs no torch path at all. The tokens are those of a19ca58 (which drew the
    untruncated rows twice, the kernel's draw kept), and each sampled row's token and log-prob are bit for bit its own
    alone (a batch of its one setting)."""
    from rl_engine.inference import sampler as sampler_module

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 64, generator=g) * 3
    mixed = [SamplingParams(temperature=0.7), SamplingParams(temperature=0.0), SamplingParams(temperature=1.3, top_k=5),
             SamplingParams(temperature=1.0), SamplingParams(temperature=0.9, top_p=0.8),
             SamplingParams(temperature=1.6), SamplingParams(temperature=0.8, min_p=0.1),
             SamplingParams(temperature=0.7, top_k=100)]  # (top-k past the vocabulary: untruncated)
    plain = [SamplingParams(temperature=t) for t in (0.7, 1.0, 1.3, 0.5, 1.0, 2.0, 0.9, 1.1)]
    seeds = [token_seed(11, i, 7) for i in range(8)]
    truncated_rows, kernel_rows = [], []
    truncate = sampler_module._truncate
    monkeypatch.setattr(sampler_module, "_truncate",
                        lambda e, z, params: truncated_rows.append(e.shape[0]) or truncate(e, z, params))
    for params, expected, torch_rows in ((mixed, [30, 61, 31, 28, 1, 57, 39, 50], [4]),
                                         (plain, [30, 20, 31, 28, 1, 60, 49, 50], [])):
        kernel_rows.clear()
        truncated_rows.clear()
        sampler = Sampler(device=torch.device("cpu"), seed=0)
        op = sampler._inverse_cdf
        sampler._inverse_cdf = lambda z, u, *, logprobs: kernel_rows.append(z.shape[0]) or op(z, u, logprobs=logprobs)
        tokens, logprobs = sampler(logits, [SampleRow(p, s) for p, s in zip(params, seeds)])
        assert tokens == expected
        untruncated = sum(p.temperature > 0 and p.top_k in (0, 100) and p.top_p == 1.0 and not p.min_p for p in params)
        assert kernel_rows == [untruncated] and truncated_rows == torch_rows, (kernel_rows, truncated_rows)
        for r in range(8):
            alone, alone_lp = sample(logits[r:r + 1], [params[r]], seeds=[seeds[r]])
            assert tokens[r] == alone[0], r
            if params[r].temperature > 0:
                assert logprobs[r] == alone_lp[0], r
            else:  # a greedy batch's log-prob is -log(sum(exp(z - max z))): another rounding of the same value
                assert abs(logprobs[r] - alone_lp[0]) <= 1e-6, r
