"""Fused log-prob + entropy: the torch reference against plain log_softmax autograd, vocab shards
merged in one process and across two gloo ranks, and the Triton kernels against the reference."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rl_engine.kernels import logprob as ref
from rl_engine.launch.gloo import join_store, serve_store


def plain_logprob_entropy(logits, targets, temperature, vocab_size=None):
    z = logits.float() / temperature
    if vocab_size is not None:
        z = z[:, :vocab_size]
    log_p = torch.log_softmax(z, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return log_p.gather(1, targets[:, None]).squeeze(1), entropy


def run_with_grads(fn, logits, targets, g_lp, g_h, **kwargs):
    logits = logits.detach().clone().requires_grad_()
    lp, h = fn(logits, targets, **kwargs)
    ((lp * g_lp).sum() + (h * g_h).sum()).backward()
    return lp, h, logits.grad


def _inputs(num_tokens, vocab, *, dtype=torch.float32, device="cpu", vocab_size=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(num_tokens, vocab, generator=gen)).to(dtype).to(device)
    targets = torch.randint(0, vocab_size or vocab, (num_tokens,), generator=gen).to(device)
    g_lp = torch.randn(num_tokens, generator=gen).to(device)
    g_h = torch.randn(num_tokens, generator=gen).to(device)
    return logits, targets, g_lp, g_h


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("vocab_size", [None, 45])
def test_reference_matches_log_softmax(temperature, vocab_size):
    logits, targets, g_lp, g_h = _inputs(6, 50, vocab_size=vocab_size)
    lp, h, grad = run_with_grads(ref.logprob_entropy, logits, targets, g_lp, g_h,
                                 temperature=temperature, vocab_size=vocab_size)
    plain = lambda x, t, **kw: plain_logprob_entropy(x, t, temperature, vocab_size)  # noqa: E731
    lp_ref, h_ref, grad_ref = run_with_grads(plain, logits, targets, g_lp, g_h)
    torch.testing.assert_close(lp, lp_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-5)
    if vocab_size is not None:
        assert torch.all(grad[:, vocab_size:] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_only_equals_the_statistics_log_prob_bitwise(dtype, temperature):
    """The sampler's behavior log-probs under model.batch_invariant (`logprobs_only` of z = logits / T)
    are the trainer's (`logprob_entropy` at temperature T) bit for bit, for any number of rows."""
    logits, targets, _, _ = _inputs(37, 300, dtype=dtype, seed=3)
    want, _ = ref.logprob_entropy(logits, targets, temperature=temperature)
    for rows in (slice(0, 37), slice(5, 6), slice(10, 17)):
        z = logits[rows].float() / temperature
        assert torch.equal(ref.logprobs_only(z, targets[rows]), want[rows]), rows
    lp_ref, _ = plain_logprob_entropy(logits, targets, temperature)
    torch.testing.assert_close(want, lp_ref, atol=1e-5, rtol=1e-5)


def _shard_bounds(vocab, cuts):
    edges = [0, *cuts, vocab]
    return list(zip(edges[:-1], edges[1:]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_shards_merged_in_process_match_full_vocab(backend, request):
    """Three uneven shards (the last all padding) give the full-vocab answer, fwd and bwd."""
    if backend == "torch":
        stats_fn, grad_fn, device = ref.logprob_shard_stats, ref.logprob_entropy_grad, "cpu"
    else:
        device = request.getfixturevalue("triton_device")
        from rl_engine.kernels.triton import logprob as tri

        stats_fn = lambda *a, **kw: tri.logprob_shard_stats(*a, block_v=16, **kw)  # noqa: E731
        grad_fn = lambda *a, **kw: tri.logprob_entropy_grad(*a, block_v=16, **kw)  # noqa: E731
    vocab, vocab_size, temperature = 70, 61, 0.8
    logits, targets, g_lp, g_h = _inputs(5, vocab, vocab_size=vocab_size, device=device)
    targets[0] = 0
    targets[1] = vocab_size - 1  # first and last real ids
    shards = _shard_bounds(vocab, [23, 61])
    stats = [stats_fn(logits[:, a:b].contiguous(), targets, temperature=temperature, vocab_start=a,
                      vocab_size=vocab_size) for a, b in shards]
    assert torch.all(torch.isneginf(stats[2].max))  # the padding shard
    lse, target_logit, h = ref.combine_local_shards(stats)
    lp = target_logit - lse
    lp_ref, h_ref, grad_ref = run_with_grads(
        lambda x, t: plain_logprob_entropy(x, t, temperature, vocab_size), logits.cpu(),
        targets.cpu(), g_lp.cpu(), g_h.cpu())
    torch.testing.assert_close(lp.cpu(), lp_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.cpu(), h_ref, atol=1e-5, rtol=1e-5)
    grads = [grad_fn(logits[:, a:b].contiguous(), targets, g_lp, g_h, lse, h,
                     temperature=temperature, vocab_start=a, vocab_size=vocab_size)
             for a, b in shards]
    full_grad = torch.cat(grads, dim=1).cpu()
    torch.testing.assert_close(full_grad, grad_ref, atol=1e-5, rtol=1e-5)
    assert torch.all(full_grad[:, vocab_size:] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_tokens", "vocab"), [(1, 5), (4, 300), (3, 2500), (0, 10)])
def test_triton_logprob_entropy_matches_reference(triton_device, assert_close, dtype, num_tokens,
                                                  vocab):
    """2500 > the 2048-wide vocab chunk: the online softmax crosses chunks."""
    from rl_engine.kernels.triton.logprob import logprob_entropy

    logits, targets, g_lp, g_h = _inputs(num_tokens, vocab, dtype=dtype, device=triton_device)
    out = run_with_grads(logprob_entropy, logits, targets, g_lp, g_h, temperature=0.9)
    expected = run_with_grads(ref.logprob_entropy, logits.float(), targets, g_lp, g_h,
                              temperature=0.9)
    assert out[0].dtype == out[1].dtype == torch.float32 and out[2].dtype == dtype
    # log-probs/entropy are fp32 from the same bf16 logits: fp32 tolerance holds for both dtypes
    assert_close(out[0], expected[0], torch.float32)
    assert_close(out[1], expected[1], torch.float32)
    assert_close(out[2], expected[2], dtype)


def test_stats_chunking_with_small_blocks(triton_device):
    from rl_engine.kernels.triton import logprob as tri

    logits, targets, _, _ = _inputs(3, 100, device=triton_device)
    logits[1, 90:] = 40.0  # the row max sits in the last, partial chunk
    got = tri.logprob_shard_stats(logits, targets, temperature=1.0, block_v=32)
    want = ref.logprob_shard_stats(logits, targets, temperature=1.0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        ref.logprob_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), temperature=0.0)


def _tp_worker(rank: int, world_size: int, port: int, backends: list[str], queue) -> None:
    functions = {"torch": ref.logprob_entropy}
    if "triton" in backends:
        os.environ["TRITON_INTERPRET"] = "1"  # this child process only
        from rl_engine.kernels.triton.logprob import logprob_entropy

        functions["triton"] = logprob_entropy
    dist.init_process_group("gloo", store=join_store(port, world_size), rank=rank, world_size=world_size)
    try:
        logits, targets, g_lp, g_h = _inputs(4, 30, vocab_size=27)
        start, end = [(0, 15), (15, 30)][rank]
        for backend in backends:
            local = logits[:, start:end].clone().requires_grad_()
            lp, h = functions[backend](local, targets, temperature=0.8, vocab_start=start,
                                       vocab_size=27, process_group=dist.group.WORLD)
            ((lp * g_lp).sum() + (h * g_h).sum()).backward()
            queue.put((backend, rank, lp.detach().numpy(), h.detach().numpy(), local.grad.numpy()))
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_two_ranks():
    """The process-group path: two gloo ranks, one vocab half each, match the unsharded answer
    (torch reference, and the Triton kernels when the interpreter runs)."""
    from rl_engine.kernels import backends as kernel_backends

    # the children build their own interpreted kernels; run them when this process could too
    interpreted = kernel_backends.backend_status("triton", "cpu").available
    backends = ["torch"] + (["triton"] if interpreted else [])
    store = serve_store(2)  # bound before the ranks start (a free port picked here could be taken meanwhile)
    queue = mp.get_context("spawn").Queue()
    mp.start_processes(_tp_worker, args=(2, store.port, backends, queue), nprocs=2, start_method="spawn")
    results = {}
    for _ in range(2 * len(backends)):
        backend, rank, *arrays = queue.get(timeout=60)
        results[backend, rank] = [torch.from_numpy(a) for a in arrays]
    logits, targets, g_lp, g_h = _inputs(4, 30, vocab_size=27)
    lp_ref, h_ref, grad_ref = run_with_grads(
        lambda x, t: plain_logprob_entropy(x, t, 0.8, 27), logits, targets, g_lp, g_h)
    for backend in backends:
        for rank in (0, 1):
            torch.testing.assert_close(results[backend, rank][0], lp_ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(results[backend, rank][1], h_ref, atol=1e-5, rtol=1e-5)
        grad = torch.cat([results[backend, 0][2], results[backend, 1][2]], dim=1)
        torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_a_logit_at_minus_infinity_is_a_token_of_probability_zero(temperature):
    """A logit masked to -inf (a banned token) leaves the log-probs, the entropy and the gradients of the
    other tokens what they are without that column, and gets a zero gradient: 0 * log 0 is 0, not nan."""
    logits, targets, g_lp, g_h = _inputs(6, 50, seed=4)
    banned = [3, 17, 49]
    kept = [c for c in range(50) if c not in banned]
    targets = torch.tensor(kept)[torch.randint(0, len(kept), (6,), generator=torch.Generator().manual_seed(5))]
    masked = logits.clone()
    masked[:, banned] = float("-inf")
    masked[0, :] = float("-inf")
    masked[0, targets[0]] = 1.0  # a row with one finite logit: probability 1, entropy 0
    lp, h, grad = run_with_grads(ref.logprob_entropy, masked, targets, g_lp, g_h, temperature=temperature)
    remap = torch.full((50,), -1, dtype=torch.long)
    remap[kept] = torch.arange(len(kept))
    plain = lambda x, t, **kw: plain_logprob_entropy(x, remap[t], temperature)  # noqa: E731
    lp_ref, h_ref, grad_ref = run_with_grads(plain, masked[1:, kept], targets[1:], g_lp[1:], g_h[1:])
    torch.testing.assert_close(lp[1:], lp_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h[1:], h_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad[1:, kept], grad_ref, atol=1e-5, rtol=1e-5)
    assert torch.all(grad[:, banned] == 0) and lp[0] == 0 and h[0] == 0 and torch.all(grad[0] == 0)
