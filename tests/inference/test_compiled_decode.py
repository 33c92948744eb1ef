"""compile_decode: the compiled decode step (one with a dynamic batch size for every bucket of two rows or
more, a static one for a bucket of one) gives the eager runner's tokens and log-probs within the log-prob
contract (fp32, 1e-5), reads the trainer's weights in place, and is refused where it cannot keep a promise
(model.batch_invariant's bits, MoE).

Buckets 2 and 4 and one compiled engine for the module: the compile (seconds of CPU) is the cost here."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch

from inference_helpers import mixed_prompts
from rl_engine import LLM, SamplingParams, kernels
from rl_engine.inference import compiled_decode
from rl_engine.inference.compiled_decode import cpp_compiler
from rl_engine.policy import from_pretrained
from test_logprobs import trainer_logprobs

needs_cxx = pytest.mark.skipif(cpp_compiler() is None, reason="torch.compile's CPU backend needs a C++ compiler (g++ or CXX)")


@pytest.fixture(scope="module")
def engines(qwen2):
    """(the trainer's model, an eager engine and a compiled engine over its tensors)."""
    policy = from_pretrained(qwen2[1], dtype=torch.float32)
    kw = dict(graph_batch_sizes=[2, 4], block_size=8, cpu_threads="fixed")
    return policy, LLM(policy, **kw), LLM(policy, compile_decode=True, **kw)


def _count_calls(monkeypatch, owner, name: str) -> dict[str, int]:
    """Counts the calls of `owner.name` (["n"]) for the test's duration."""
    calls = {"n": 0}
    fn = getattr(owner, name)

    def counted(*args):
        calls["n"] += 1
        return fn(*args)

    monkeypatch.setattr(owner, name, counted)
    return calls


def _compare(policy, eager, compiled, prompts, params) -> None:
    ref, out = eager.generate(prompts, params), compiled.generate(prompts, params)
    worst_eager = worst_trainer = 0.0
    for prompt, a, b in zip(prompts, ref, out):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        got = torch.tensor(b.outputs[0].logprobs)
        worst_eager = max(worst_eager, (got - torch.tensor(a.outputs[0].logprobs)).abs().max().item())
        expected = trainer_logprobs(policy, prompt, b.outputs[0].token_ids, params.temperature or 1.0)
        worst_trainer = max(worst_trainer, (got - expected).abs().max().item())
    # both engines are within the contract's 1e-5 of the trainer; measured ~1e-6 apart
    assert worst_trainer <= 1e-5 and worst_eager <= 1e-5


@needs_cxx
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_compiled_step_matches_eager_and_trainer(engines, temperature):
    policy, eager, compiled = engines
    prompts = mixed_prompts(3, seed=5, max_len=20)  # 3 rows padded to the bucket of 4
    params = SamplingParams(temperature=temperature, max_tokens=12, seed=7, ignore_eos=True)
    _compare(policy, eager, compiled, prompts, params)
    runner = compiled.engine.runner
    assert list(runner.compile_seconds()) == [4] and compiled.engine.stats()["decode_compile_s"][4] > 0
    assert eager.engine.runner.compile_seconds() == {} and "decode_compile_s" not in eager.engine.stats()


@needs_cxx
def test_a_shrinking_batch_compiles_one_step_for_every_bucket(engines, monkeypatch):
    """Rows that stop at different lengths (EOS-varied RL rollouts) take the batch down through the buckets:
    every bucket of two rows or more runs the one step compiled with a dynamic batch size (compiling each
    bucket cost seconds per bucket), within the contract of the eager engine and the trainer."""
    policy, eager, compiled = engines
    prompts = mixed_prompts(3, seed=9, max_len=20)
    params = [SamplingParams(temperature=1.0, max_tokens=m, seed=11 + m, ignore_eos=True) for m in (12, 7, 3)]
    rows = []  # the bucket of each compiled step run
    run = compiled_decode.CompiledDecodeRunner.run

    def recording(runner, **kw):
        rows.append(runner.batch_size)
        return run(runner, **kw)

    ref = eager.generate(prompts, params)
    monkeypatch.setattr(compiled_decode.CompiledDecodeRunner, "run", recording)
    out = compiled.generate(prompts, params)
    monkeypatch.undo()
    # both buckets ran the one step compiled with a dynamic batch: they share its entry per thread count (a static
    # graph for 4 rows would also give these tokens, the rows being independent, and is what this rules out)
    assert {2, 4} <= set(rows), rows
    runners = compiled.engine.runner.graphs.runners
    shared = runners[2]._steps
    assert runners[4]._steps is shared and shared[torch.get_num_threads()].compiled is not None
    for prompt, p, a, b in zip(prompts, params, ref, out):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        got = torch.tensor(b.outputs[0].logprobs)
        assert (got - torch.tensor(a.outputs[0].logprobs)).abs().max().item() <= 1e-5
        expected = trainer_logprobs(policy, prompt, b.outputs[0].token_ids, p.temperature)
        assert (got - expected).abs().max().item() <= 1e-5
    runner = compiled.engine.runner
    assert sorted(runner.graphs.runners) == [2, 4]  # both buckets ran (3 rows, then 2, then 1 padded to 2)
    assert list(runner.compile_seconds()) == [4]  # one compile, on the first bucket used


@needs_cxx
def test_a_step_at_another_thread_count_compiles_its_own_graph(engines, monkeypatch, caplog):
    """torch's thread count changes while an engine lives (a small step may run on one thread; cpu_threads="auto"
    follows the free cores) and dynamo refuses a graph compiled at another count: with its guards skipped
    that was a RuntimeError ("Recompilation triggered") mid-generate. Each count gets its own compiled step,
    and the engine's compile seconds add up every compile (a bucket kept only its last one)."""
    policy, eager, compiled = engines
    caplog.set_level(logging.INFO, logger=compiled_decode.__name__)
    seconds_before = compiled.engine.runner.compile_seconds()  # compiles earlier in the module
    # this model's steps may run on one thread (StepThreads); here they run at the count set
    monkeypatch.setattr(compiled.engine, "_step_threads", lambda sched: contextlib.nullcontext())
    prompts = mixed_prompts(3, seed=13, max_len=20)
    params = SamplingParams(temperature=1.0, max_tokens=6, seed=3, ignore_eos=True)
    _compare(policy, eager, compiled, prompts, params)  # compiled at this count (or earlier in the module)
    before = torch.get_num_threads()
    torch.set_num_threads(2 if before == 1 else 1)
    try:
        _compare(policy, eager, compiled, prompts, params)
        _compare(policy, eager, compiled, prompts, params)  # the second count's step replayed, guards skipped
    finally:
        torch.set_num_threads(before)
    steps = compiled_decode._SHARED_STEPS[compiled.engine.runner.attn]
    assert sorted(steps) == sorted({before, 2 if before == 1 else 1}), steps
    # each compile's own seconds, from its log record's arguments (bucket, kind, threads, seconds)
    logged = [r.args for r in caplog.records if r.msg.startswith("compiled the decode step")]
    assert any(threads != before for _, _, threads, _ in logged)  # the other count's compile is among them
    expected = dict(seconds_before)
    for bucket, _, _, seconds in logged:
        expected[bucket] = expected.get(bucket, 0.0) + seconds
    assert compiled.engine.runner.compile_seconds() == pytest.approx(expected, rel=1e-12)


@needs_cxx
def test_compiled_step_with_every_cpp_kernel_matches_eager_and_trainer(engines, qwen2):
    """compile_decode over a model built with every C++ CPU kernel (RL_ENGINE_CPU_KERNELS=1's choice: the engine's
    RMSNorm and SwiGLU wrappers, which trace as the torch reference for inductor to fuse, paged decode attention
    reading K/V in place as a custom op inside the graph): dynamo failed in the extension's loader before the
    kernels were custom ops. Same tokens as the eager torch engine, log-probs
    within the contract of it and of the trainer (the torch model)."""
    from rl_engine.kernels import cpu, registry

    if not cpu.extension_status()[0]:
        pytest.skip(f"C++ CPU kernels unavailable: {cpu.extension_status()[1]}")
    policy, eager, _ = engines
    previous = registry.default_registry().config
    registry.configure(registry.KernelConfig(overrides={"*": "cpu"}))
    try:
        cpp_policy = from_pretrained(qwen2[1], dtype=torch.float32)
        compiled = LLM(cpp_policy, compile_decode=True, graph_batch_sizes=[4], block_size=8, cpu_threads="fixed")
    finally:
        registry.configure(previous)
    assert compiled.engine.runner.attn.cpu_decode
    assert cpp_policy.layers[0].input_layernorm._rms_norm.__module__ == "rl_engine.kernels.cpu.engine_elementwise"
    _compare(policy, eager, compiled, mixed_prompts(3, seed=8, max_len=20),
             SamplingParams(temperature=1.0, max_tokens=12, seed=3, ignore_eos=True))
    assert list(compiled.engine.runner.compile_seconds()) == [4]


@needs_cxx
def test_compiled_step_reads_weights_updated_in_place(engines):
    """A trainer step changes the parameter tensors in place: the compiled graph must read them."""
    policy, eager, compiled = engines
    weight = policy.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        weight.mul_(4.0)  # a power of two: undone exactly below
    try:
        _compare(policy, eager, compiled, mixed_prompts(2, seed=6, max_len=20),
                 SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    finally:
        with torch.no_grad():
            weight.div_(4.0)


@needs_cxx
def test_compiled_step_reads_a_parameter_replaced_after_compile(engines):
    """The compiled step is called without dynamo (its compiled code as a plain function), which must not hold
    the tensors it saw at compile time: a parameter replaced by a new one of the same layout (a new
    nn.Parameter, load_state_dict(assign=True)) after the step compiled is the one it reads, as eager does."""
    policy, eager, compiled = engines
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = mixed_prompts(2, seed=21, max_len=20)
    before = compiled.generate(prompts, params)  # compiled (or compiled earlier in the module) and replayed
    mlp = policy.layers[0].mlp
    old = mlp.down_proj.weight
    mlp.down_proj.weight = torch.nn.Parameter(old.detach() * 4.0)
    try:
        for llm in (eager, compiled):  # the prompts' cached KV was computed with the old weight
            llm.reset_prefix_cache()
        _compare(policy, eager, compiled, prompts, params)
        after = compiled.generate(prompts, params)
    finally:
        mlp.down_proj.weight = old
        for llm in (eager, compiled):
            llm.reset_prefix_cache()
    # the new weight changed the tokens: a step still reading the old tensor would have given `before`'s
    assert [o.outputs[0].token_ids for o in after] != [o.outputs[0].token_ids for o in before]


@needs_cxx  # compile_decode's check, though nothing compiles
def test_compile_decode_with_dynamo_disabled_runs_eagerly_and_warns(engines, qwen2, monkeypatch, caplog):
    """TORCHDYNAMO_DISABLE=1 (a debugging switch) makes torch.compile run the step eagerly and compile nothing:
    the engine decodes as the eager one does and says so, where calling dynamo's compiled code failed on its
    missing cache entry."""
    policy, eager, _ = engines
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    caplog.set_level(logging.WARNING, logger=compiled_decode.__name__)
    llm = LLM(policy, compile_decode=True, graph_batch_sizes=[2], block_size=8, cpu_threads="fixed")
    _compare(policy, eager, llm, mixed_prompts(2, seed=17, max_len=20),
             SamplingParams(temperature=1.0, max_tokens=6, seed=5, ignore_eos=True))
    assert any("dynamo is disabled (TORCHDYNAMO_DISABLE=1)" in r.getMessage() for r in caplog.records)


def test_compile_refused_with_batch_invariant_and_moe(qwen2, checkpoints):
    before = kernels.set_batch_invariant(True)
    try:
        with pytest.raises(ValueError, match="batch_invariant"):
            LLM(qwen2[1], compile_decode=True)
    finally:
        kernels.set_batch_invariant(before)
    with pytest.raises(ValueError, match="MoE"):
        LLM(checkpoints.get("qwen3_moe")[1], compile_decode=True)


def test_compile_refused_without_a_compiler(qwen2, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    with pytest.raises(ValueError, match="no-such-c\\+\\+-compiler.*install g\\+\\+ or set CXX"):
        LLM(qwen2[1], compile_decode=True)


@needs_cxx  # the flag builds a compiled engine
def test_cli_flag_reaches_the_engine(qwen2):
    from rl_engine.cli import build_parser
    from rl_engine.inference.cli import build_llm

    for flags, expected in (([], False), (["--compile-decode"], True)):
        args = build_parser().parse_args(["generate", "--model", qwen2[1], "--prompt-ids", "1,2", *flags])
        assert build_llm(args, model=args.model, speculative_config=None).engine.config.compile_decode is expected



@needs_cxx
def test_a_parameter_replaced_by_another_dtype_is_named_with_the_fix(engines):
    """A tensor of the same shape and strides but another dtype put in a parameter's place passes inductor's input
    checks (sizes and strides only): its C++ code would read the bf16 storage as fp32 (half of it past the end). The
    compiled step checks its inputs' dtypes and names the parameter. The prompt's prefill runs (eagerly) before the
    swap, so the first step after it is a compiled decode step."""
    policy, eager, compiled = engines
    engine = compiled.engine
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for i, prompt in enumerate(mixed_prompts(2, seed=6, max_len=20)):
        engine.add_request(f"dtype-{i}", prompt, params)
    weight = policy.layers[0].mlp.down_proj.weight
    old = weight.data
    try:
        engine.step()  # the prefill
        weight.data = old.to(torch.bfloat16)  # same values (rounded), shape and strides
        with pytest.raises(ValueError, match=r"bucket 2 reads 'layers\.0\.mlp\.down_proj\.weight' as shape "
                                             r"\(64, 96\), strides \(96, 1\), torch\.float32 on cpu, but it is now .*"
                                             r"torch\.bfloat16.*param\.copy_\(new\)"):
            engine.step()
    finally:
        weight.data = old
        engine.interrupt()
    assert not engine.has_unfinished_requests()


@needs_cxx
def test_the_compiled_step_calls_inductors_entry_point(engines):
    """The compiled step's graph is called at its C++ entry point, AOTAutograd's and inductor's Python wrappers
    skipped (`compiled_call`): a torch whose wrappers do more for this graph would fall back to calling through them
    (slower, not wrong), and this says so."""
    _, _, compiled = engines
    compiled.generate(mixed_prompts(2, seed=6, max_len=20), SamplingParams(temperature=0.0, max_tokens=3))
    for step in compiled_decode._SHARED_STEPS[compiled.engine.runner.attn].values():
        graph = next(n for n in step.compiled.__code__.co_names if n.startswith("__compiled_fn"))
        assert step.compiled.__globals__[graph].__qualname__ == "_entry_call.<locals>.call"


@needs_cxx
def test_the_compiled_step_calls_the_cpp_attention_kernels_directly_with_the_wrappers_bits(engines, monkeypatch):
    """A compiled decode step on the C++ rotary + KV write and decode kernels calls them directly, from the graph's
    C++ op `rl_engine::decode_attend_rotary` (no Python: the Python op's kernel is never entered), not through their
    checked Python wrappers: the same tokens and log-prob bits as the wrappers' path (taken here by a decode observer,
    which the C++ op hands back to Python), the wrappers called in no compiled step; a call the decode kernel refuses
    (a block outside the cache) still fails with its message."""
    from rl_engine.kernels.cpu import ops as cpu_ops

    _, _, compiled = engines
    attn = compiled.engine.runner.attn
    if not (attn.cpu_decode and attn.rotary_kv_write is cpu_ops.rotary_kv_write):
        pytest.skip("the engine is not on the C++ decode and rotary kernels")
    wrapped = _count_calls(monkeypatch, cpu_ops, "paged_decode_step")
    python_op = {"n": 0}  # the Python op's kernel looks its attention object up here
    registry = compiled_decode._ATTENTION

    class Counting:
        def __setitem__(self, handle, attn):  # a bucket's runner built during the run registers its attention
            registry[handle] = attn

        def __getitem__(self, handle):
            python_op["n"] += 1
            return registry[handle]

    monkeypatch.setattr(compiled_decode, "_ATTENTION", Counting())
    prompts = mixed_prompts(3, seed=9, max_len=20)
    params = SamplingParams(temperature=1.0, max_tokens=10, seed=4, ignore_eos=True)
    direct = compiled.generate(prompts, params)
    assert attn.direct_decode and wrapped["n"] == 0 and python_op["n"] == 0
    attn.decode_observer = lambda *args: None
    try:
        through = compiled.generate(prompts, params)
    finally:
        attn.decode_observer = None
    assert wrapped["n"] == python_op["n"] == 9 * len(attn.k_caches)  # every layer of the 9 decode steps
    for a, b in zip(direct, through):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids and a.outputs[0].logprobs == b.outputs[0].logprobs
    # a table entry past the pool: the direct call's error falls back to the wrappers, which name it
    kc = attn.k_caches[0]
    B, Hkv, D = 2, kc.shape[2], kc.shape[3]
    tables = torch.tensor([[1], [kc.shape[0]]], dtype=torch.int32)
    attn.prepare(slot_mapping=torch.tensor([8, 9]), num_single=B, block_tables=tables,
                 context_lens=torch.tensor([2, 2], dtype=torch.int32), max_context_len=2, prefills=[])
    assert attn.direct_decode
    q, k, v = torch.randn(B, 2 * Hkv, D), torch.randn(B, Hkv, D), torch.randn(B, Hkv, D)
    cos, sin = torch.ones(B, D // 2), torch.zeros(B, D // 2)
    try:
        with pytest.raises(RuntimeError, match="outside the cache"):
            attn.attend_rotary(attn.first_layer, q, k, v, cos, sin, scale=0.25)
    finally:  # the rotary write ran before the decode kernel refused: random K/V sit in block 1 of the first layer
        compiled.reset_prefix_cache()


@needs_cxx
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_only_the_cpp_kernels_dtypes_take_the_direct_decode_calls(dtype):
    """`direct_decode` (the C++ kernels called without their wrappers) only for caches of a dtype the wrappers give
    the kernels: a float64 cache goes through the wrappers, which run the torch reference for it."""
    from rl_engine.inference.attention import PagedAttention
    from rl_engine.kernels.cpu import ops as cpu_ops

    caches = [torch.zeros(4, 8, 2, 16, dtype=dtype)]
    attn = PagedAttention(caches, [c.clone() for c in caches], first_layer=0, cpu_decode=True,
                          decode_op=cpu_ops.paged_decode_attention, rotary_kv_write=cpu_ops.rotary_kv_write)
    attn.prepare(slot_mapping=torch.tensor([8, 9]), num_single=2, block_tables=torch.tensor([[1], [2]]),
                 context_lens=torch.tensor([1, 1], dtype=torch.int32), max_context_len=1, prefills=[])
    assert attn.direct_decode == (dtype is torch.float32)


@needs_cxx
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_a_direct_call_with_other_rows_than_the_tables_takes_the_wrappers(rows, monkeypatch):
    """`attend_rotary`'s direct branch hands the decode kernel, which does not check them, only queries with one row
    per table row (`num_single`): q of other rows (a caller's mistake: the engine's steps, padded buckets included,
    prepare every row they attend) goes through the wrappers, the kernel not called directly, with the outcome of
    the wrappers' path (taken by a decode observer): the same error naming the mismatch and the same K/V written;
    q of the tables' rows is the direct call's, with the wrappers' output bits."""
    from rl_engine.inference.attention import PagedAttention
    from rl_engine.kernels.cpu import ops as cpu_ops

    direct_calls = _count_calls(monkeypatch, cpu_ops.extension(), "paged_decode_attention")
    gen = torch.Generator().manual_seed(3)
    Hkv, D = 2, 16
    caches = [torch.randn(6, 8, Hkv, D, generator=gen)]
    q, k, v = (torch.randn(rows, h, D, generator=gen) for h in (2 * Hkv, Hkv, Hkv))
    cos, sin = torch.randn(rows, D // 2, generator=gen), torch.randn(rows, D // 2, generator=gen)
    outcome = []
    for observed in (False, True):
        attn = PagedAttention([c.clone() for c in caches], [c.clone() for c in caches], first_layer=0,
                              cpu_decode=True, decode_op=cpu_ops.paged_decode_attention,
                              rotary_kv_write=cpu_ops.rotary_kv_write)
        if observed:
            attn.decode_observer = lambda *args: None
        attn.prepare(slot_mapping=torch.arange(8, 8 + rows), num_single=2,
                     block_tables=torch.tensor([[1], [2]], dtype=torch.int32),
                     context_lens=torch.tensor([3, 5], dtype=torch.int32), max_context_len=5, prefills=[])
        assert attn.direct_decode
        if rows == 2:
            out = attn.attend_rotary(0, q, k, v, cos, sin, scale=0.25)
        else:
            with pytest.raises(ValueError, match=f"q has {rows} rows but block_tables has 2 requests") as err:
                attn.attend_rotary(0, q, k, v, cos, sin, scale=0.25)
            out = str(err.value)
        outcome.append((out, attn.k_caches[0], attn.v_caches[0]))
        if not observed:  # (the wrappers call the kernel too, once they have checked its inputs)
            assert direct_calls["n"] == (rows == 2)
    (o1, k1, v1), (o2, k2, v2) = outcome
    assert (torch.equal(o1, o2) if rows == 2 else o1 == o2)
    assert torch.equal(k1, k2) and torch.equal(v1, v2) and not torch.equal(k1, caches[0])


@needs_cxx
def test_a_parameter_replaced_by_other_strides_is_named_with_the_fix(engines):
    """The graph reads parameters as laid out at compile time (its guards are skipped): a tensor of other
    strides put in a parameter's place failed inside inductor with "an incorrect fake kernel for a custom
    op". Last in this module: the failed step may leave the shared engine's requests behind."""
    policy, eager, compiled = engines
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    compiled.generate(mixed_prompts(2, seed=6, max_len=20), params)  # bucket 2 (the step of 2+ rows)
    weight = policy.layers[0].mlp.down_proj.weight
    old = weight.data
    weight.data = old.t().contiguous().t()  # same values and shape, column-major
    try:
        with pytest.raises(ValueError, match=r"bucket 2 reads 'layers\.0\.mlp\.down_proj\.weight' as shape "
                                             r"\(64, 96\), strides \(96, 1\).*strides \(1, 64\).*param\.copy_\(new\)"):
            compiled.generate(mixed_prompts(2, seed=6, max_len=20), params)
    finally:
        weight.data = old
