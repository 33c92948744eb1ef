"""The eager CPU decode step's forward as direct C++ kernel calls (`inference/direct_decode.py`): the same tokens and
log-prob bits as the model's own forward (the reference: the same kernels through the modules and wrappers), the
model's forward taken where a weight lost its packed copy, and no direct forward where its kernels do not serve the
model exactly."""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
import threading
import time
import types

import pytest
import torch

from inference_helpers import mixed_prompts
from rl_engine import LLM, SamplingParams
from rl_engine.inference import direct_decode
from rl_engine.inference.direct_decode import DirectDecode
from rl_engine.policy import from_pretrained

KW = dict(graph_batch_sizes=[2, 4, 8], block_size=8, cpu_threads="fixed")


def _count(monkeypatch, owner, name: str, kinds: tuple[str, str]) -> dict[str, int]:
    """Counts the calls of `owner.name` that returned something (kinds[0]) and None (kinds[1])."""
    calls = dict.fromkeys(kinds, 0)
    fn = getattr(owner, name)

    def counted(*args):
        out = fn(*args)
        calls[kinds[1] if out is None else kinds[0]] += 1
        return out

    monkeypatch.setattr(owner, name, counted)
    return calls


def _calls(monkeypatch) -> dict[str, int]:
    """Counts the direct forward's steps ("direct") and those it handed back to the model's forward ("none")."""
    return _count(monkeypatch, DirectDecode, "hidden_states", ("direct", "none"))


@contextlib.contextmanager
def _direct_forwards(llm, direct: bool):
    """The made runners' direct forwards as they are (direct) or taken away inside the block; a fresh prefix cache."""
    runners = list(llm.engine.runner.graphs.runners.values())
    kept = [r.direct for r in runners]
    if not direct:
        for r in runners:
            r.direct = None
    llm.reset_prefix_cache()
    try:
        yield
    finally:
        for r, d in zip(runners, kept):
            r.direct = d


def _steps_writing(llm, prompts, params, w, scale: float | None, context, *, at_step: int) -> list:
    """Step `prompts` to the end inside `context`, multiplying the weight `w` in place by `scale` before step
    `at_step` (None: no write; restored afterwards) -> each prompt's finished output."""
    engine = llm.engine
    kept = w.detach().clone()
    with context:
        try:
            for i, p in enumerate(prompts):
                engine.add_request(f"r{i}", p, params)
            outs = {}
            for step in range(64):
                if step == at_step and scale is not None:
                    with torch.no_grad():
                        w.mul_(scale)
                outs.update({o.request_id: o for o in engine.step() if o.finished})
                if not engine.has_unfinished_requests():
                    break
            return [outs[f"r{i}"].outputs[0] for i in range(len(prompts))]
        finally:
            with torch.no_grad():
                w.copy_(kept)


def _generate(llm, prompts, params, *, direct: bool):
    """`generate` with the made runners' direct forwards as they are (direct) or taken away for the call."""
    with _direct_forwards(llm, direct):
        return llm.generate(prompts, params)


@pytest.fixture(scope="module")
def engine(qwen2):
    """An eager engine over a tiny Qwen2 (random qkv biases and norm weights), with its direct forward."""
    llm = LLM(from_pretrained(qwen2[1], dtype=torch.float32), **KW)
    if llm.engine.runner._direct_decode is None:
        pytest.skip("the C++ kernels (small-M GEMM, RMSNorm / SwiGLU, rotary + KV write, decode) are unavailable")
    return llm


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_direct_forward_gives_the_model_forwards_bits(engine, monkeypatch, temperature):
    calls = _calls(monkeypatch)
    prompts = mixed_prompts(7, seed=3, max_len=30)  # 7 rows padded to the bucket of 8, then fewer as they stop
    params = [SamplingParams(temperature=temperature, max_tokens=6 + i, seed=i, logprobs=0, ignore_eos=True)
              for i in range(len(prompts))]
    _generate(engine, prompts, params, direct=True)  # every bucket's runner made (each is handed the direct forward)
    calls.update(direct=0, none=0)
    through_model = _generate(engine, prompts, params, direct=False)
    assert calls == {"direct": 0, "none": 0}
    direct = _generate(engine, prompts, params, direct=True)
    assert calls["direct"] >= 11 and calls["none"] == 0  # (12 decode steps, at most one continues a prefill)
    for a, b in zip(through_model, direct):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs  # bit for bit


def test_a_weight_without_a_packed_copy_takes_the_models_forward(engine, monkeypatch):
    """A parameter replaced by a new tensor (no packed copy: the engine registered the old one) is read by the model's
    forward (packed_linear's plain product), not skipped or read stale."""
    calls = _calls(monkeypatch)
    mlp = engine.engine.model.layers[-1].mlp
    old = mlp.down_proj.weight
    prompts = mixed_prompts(3, seed=8, max_len=20)
    params = SamplingParams(temperature=0.0, max_tokens=5, logprobs=0, ignore_eos=True)
    _generate(engine, prompts, params, direct=True)  # (bucket 4's runner made)
    calls.update(direct=0, none=0)
    try:
        mlp.down_proj.weight = torch.nn.Parameter(old.detach() * 2, requires_grad=False)
        replaced = _generate(engine, prompts, params, direct=True)
        assert calls["direct"] == 0 and calls["none"] >= 4
        reference = _generate(engine, prompts, params, direct=False)
    finally:
        mlp.down_proj.weight = old
    for a, b in zip(replaced, reference):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids and a.outputs[0].logprobs == b.outputs[0].logprobs
    back = _generate(engine, prompts, params, direct=True)
    assert calls["direct"] >= 4
    assert [o.outputs[0].token_ids for o in back] != [o.outputs[0].token_ids for o in replaced]


def test_a_replaced_module_takes_the_models_forward(engine, monkeypatch):
    """A linear module swapped for another (a wrapped or replaced layer) after the engine was built: the steps run
    the model's forward, which reads the new module (tokens and log-prob bits of a run without direct forwards)."""
    calls = _calls(monkeypatch)
    mlp = engine.engine.model.layers[-1].mlp
    old = mlp.down_proj
    prompts = mixed_prompts(3, seed=9, max_len=20)
    params = SamplingParams(temperature=0.0, max_tokens=5, logprobs=0, ignore_eos=True)
    before = _generate(engine, prompts, params, direct=True)  # (bucket 4's runner made)
    calls.update(direct=0, none=0)
    new = copy.deepcopy(old)
    with torch.no_grad():
        new.weight.mul_(2)
    try:
        mlp.down_proj = new
        replaced = _generate(engine, prompts, params, direct=True)
        assert calls["direct"] == 0
        reference = _generate(engine, prompts, params, direct=False)
    finally:
        mlp.down_proj = old
    for a, b in zip(replaced, reference):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids and a.outputs[0].logprobs == b.outputs[0].logprobs
    assert [o.outputs[0].logprobs for o in replaced] != [o.outputs[0].logprobs for o in before]
    _generate(engine, prompts, params, direct=True)
    assert calls["direct"] >= 4  # the module back in place: direct again


def test_no_direct_forward_where_its_kernels_do_not_serve_the_model(qwen2, checkpoints):
    """qk-norm (Qwen3), compiled decode steps and unpacked weights keep the model's forward."""
    policy = from_pretrained(qwen2[1], dtype=torch.float32)
    assert LLM(policy, compile_decode=True, **KW).engine.runner._direct_decode is None
    assert LLM(policy, cpu_prepack_weights=False, **KW).engine.runner._direct_decode is None
    bf16 = LLM(from_pretrained(qwen2[1], dtype=torch.bfloat16), **KW).engine.runner
    assert bf16._direct_decode is None
    direct, reason = DirectDecode.build(bf16.model, bf16.attn, packed=[])
    assert direct is None and "fp32" in reason
    qwen3 = from_pretrained(checkpoints.get("qwen3")[1], dtype=torch.float32)
    assert LLM(qwen3, **KW).engine.runner._direct_decode is None
    direct, reason = DirectDecode.build(qwen3, LLM(qwen3, **KW).engine.runner.attn, packed=[])
    assert direct is None and "qk-norm" in reason


def test_a_refused_kernel_call_takes_the_models_forward(engine, monkeypatch, caplog):
    """A kernel that refuses a direct call (its TORCH_CHECK, a RuntimeError) mid-step: the step runs the model's
    forward, which writes the same K/V again, so tokens and log-prob bits are the model's; the fallback logged once.
    The refusal: the second layer's down linear handed a packed copy one element short, which the small-M GEMM checks
    after the first layer and the second's attention wrote their K/V."""
    calls = _calls(monkeypatch)
    prompts = mixed_prompts(3, seed=5, max_len=20)
    params = SamplingParams(temperature=0.0, max_tokens=5, logprobs=0, ignore_eos=True)
    reference = _generate(engine, prompts, params, direct=False)
    _generate(engine, prompts, params, direct=True)  # (bucket 4's runner made)
    calls.update(direct=0, none=0)
    down = engine.engine.model.layers[1].mlp.down_proj._parameters
    weight, refused = direct_decode._weight, []

    def refusing(params, one_row):
        w = weight(params, one_row)
        if params is down:
            refused.append(w)
            return w[:-1]
        return w

    monkeypatch.setattr(direct_decode, "_weight", refusing)
    monkeypatch.setattr(engine.engine.runner._direct_decode, "_fallback_logged", False)
    with caplog.at_level(logging.INFO, logger=direct_decode.__name__):
        refusing = _generate(engine, prompts, params, direct=True)
    assert calls["direct"] == 0 and calls["none"] >= 4 and len(refused) == calls["none"]
    for a, b in zip(refusing, reference):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids and a.outputs[0].logprobs == b.outputs[0].logprobs
    logged = [r.getMessage() for r in caplog.records if r.name == direct_decode.__name__]
    assert len(logged) == 1 and "packed weight has" in logged[0]


def test_a_direct_step_lets_other_threads_run(engine, monkeypatch):
    """decode_layers runs without the GIL: with thread switches left to the threads themselves (a switch interval of
    an hour), a thread that only wakes and reads a flag sees it set, which the stepping thread sets just before its
    decode_layers call and clears just after: it can run then only if the call released the GIL (holding it, the call
    would end before the sleeper could take it, and the flag is clear again by then)."""
    ext = direct_decode.cpu_ops.extension()
    inside, seen, done = [False], [], threading.Event()

    class Flagging:  # the extension, with decode_layers' span marked
        def __getattr__(self, name):
            return getattr(ext, name)

        def decode_layers(self, *args):
            inside[0] = True
            try:
                return ext.decode_layers(*args)
            finally:
                inside[0] = False

    def watch():
        while not done.is_set():
            seen.append(inside[0])
            time.sleep(1e-4)  # (releases the GIL: the stepping thread takes it back)

    monkeypatch.setattr(direct_decode, "cpu_ops", types.SimpleNamespace(extension=Flagging))
    calls = _calls(monkeypatch)
    prompts = mixed_prompts(8, seed=6, max_len=20)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    _generate(engine, prompts, params, direct=True)  # (bucket 8's runner made)
    calls.update(direct=0, none=0)
    interval = sys.getswitchinterval()
    watcher = threading.Thread(target=watch)
    sys.setswitchinterval(3600.0)
    try:
        watcher.start()
        _generate(engine, prompts, params, direct=True)
    finally:
        done.set()
        watcher.join()
        sys.setswitchinterval(interval)
    assert calls["direct"] >= 20 and calls["none"] == 0
    assert any(seen), f"the watcher never ran inside decode_layers ({len(seen)} looks)"


def test_a_decode_observer_sees_every_eager_decode_step(engine, monkeypatch):
    """The observer (tests' window on the decode kernel's inputs) is called by the attention's wrappers, so a step with
    one runs the model's forward: every layer of every decode step is observed."""
    calls = _calls(monkeypatch)
    attn = engine.engine.runner.attn
    seen = []
    prompts = mixed_prompts(3, seed=2, max_len=20)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    _generate(engine, prompts, params, direct=True)
    calls.update(direct=0, none=0)
    attn.decode_observer = lambda layer, q, *args: seen.append((layer, q.shape[0]))
    try:
        _generate(engine, prompts, params, direct=True)
    finally:
        attn.decode_observer = None
    layers = len(engine.engine.model.layers)
    assert calls["direct"] == 0 and len([s for s in seen if s[1] == 4]) >= 4 * layers  # (4 decode steps in bucket 4)


def test_a_one_row_bucket_runs_the_direct_forward_through_the_gemv(qwen2, monkeypatch):
    """One row's linears take the C++ gemv (`packed_linear.linear`'s choice), in the direct forward as in the model's:
    buckets 1 and 2 both run the direct forward (bucket 1's linears through the gemv, on the weights themselves), each
    with the bits of the model's forward, greedy and sampled."""
    from rl_engine.kernels.cpu import packed_linear

    llm = LLM(from_pretrained(qwen2[1], dtype=torch.float32), **{**KW, "graph_batch_sizes": [1, 2]})
    if llm.engine.runner._direct_decode is None or packed_linear._gemv is None:
        pytest.skip("the C++ kernels are unavailable")
    for prompts in (mixed_prompts(1, seed=4, max_len=20), mixed_prompts(2, seed=4, max_len=20)):
        for temperature in (0.0, 1.0):
            params = SamplingParams(temperature=temperature, max_tokens=5, seed=3, logprobs=0, ignore_eos=True)
            _generate(llm, prompts, params, direct=True)  # (the bucket's runner made)
            through_model = _generate(llm, prompts, params, direct=False)
            calls = _calls(monkeypatch)
            ext, seen = direct_decode.cpu_ops.extension(), []

            class Seeing:  # the extension, noting what each step's decode_layers call reads for the qkv linear
                def __getattr__(self, name):
                    return getattr(ext, name)

                def decode_layers(self, *args):
                    seen.append((args[-4], args[3][1].shape))  # (one_row, the first layer's qkv weight as passed)
                    return ext.decode_layers(*args)

            monkeypatch.setattr(direct_decode, "cpu_ops", types.SimpleNamespace(extension=Seeing))
            direct = _generate(llm, prompts, params, direct=True)
            assert calls["direct"] >= 4 and calls["none"] == 0 and len(seen) == calls["direct"]
            # bucket 1: the linears by the gemv, on the weights themselves; bucket 2: the small GEMM's panels (1-D)
            qkv = llm.engine.model.layers[0].self_attn.qkv_proj.weight
            assert set(seen) == ({(True, qkv.shape)} if len(prompts) == 1 else {(False, torch.Size([qkv.numel()]))})
            monkeypatch.undo()
            assert [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in direct] == [
                (o.outputs[0].token_ids, o.outputs[0].logprobs) for o in through_model]
    runners = llm.engine.runner.graphs.runners
    assert runners[1].direct is runners[2].direct is llm.engine.runner._direct_decode


def test_a_weight_updated_in_place_is_read_repacked(engine, monkeypatch):
    """An in-place write to a weight between two decode steps (an optimizer step, a colocated trainer; no
    `update_weights`) bumps its version: the next direct step reads it repacked, with the model's forward's bits, not
    its stale packed copy (the prefill, which would repack it, ran before the write)."""
    calls = _calls(monkeypatch)
    w = engine.engine.model.layers[0].mlp.down_proj.weight
    prompts = mixed_prompts(3, seed=9, max_len=20)
    params = SamplingParams(temperature=0.0, max_tokens=5, logprobs=0, ignore_eos=True)
    _generate(engine, prompts, params, direct=True)  # (bucket 4's runner made)

    def run(direct: bool, scale: float | None):  # (the write after the prefill and one decode step)
        outs = _steps_writing(engine, prompts, params, w, scale, _direct_forwards(engine, direct), at_step=2)
        return [o.logprobs for o in outs]

    unchanged = run(True, None)
    calls.update(direct=0, none=0)
    updated = run(True, -3.0)
    assert calls["direct"] >= 4 and calls["none"] == 0
    assert updated == run(False, -3.0)  # bit for bit the model's forward under the same write
    assert updated != unchanged


@pytest.mark.parametrize("kind", ["forward", "pre", "global"])
def test_a_forward_hook_sees_every_eager_decode_step(engine, monkeypatch, kind):
    """The direct calls run no module's `forward`: with a forward hook or pre-hook registered (on a module, or on
    every module) the steps run the model's forward, so the hook is called on every decode step as on main's path."""
    calls = _calls(monkeypatch)
    prompts = mixed_prompts(3, seed=5, max_len=20)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    _generate(engine, prompts, params, direct=True)
    calls.update(direct=0, none=0)
    rows = []
    mlp = engine.engine.model.layers[0].mlp
    if kind == "forward":
        handle = mlp.register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    elif kind == "pre":
        handle = mlp.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    else:
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, args, out: rows.append(out.shape[0]) if m is mlp else None)
    try:
        _generate(engine, prompts, params, direct=True)
    finally:
        handle.remove()
    assert calls["direct"] == 0 and rows.count(4) >= 4  # (4 decode steps in bucket 4)
    _generate(engine, prompts, params, direct=True)
    assert calls["direct"] >= 4  # the hook removed, the direct forward again


def _picks(monkeypatch, pays: bool = True) -> dict[str, int]:
    """Counts the screened greedy picks that decided ("picked") and those that left it to the logits ("none"), with
    the screen taken (`pays`) or skipped at every row count whatever `screen_pays` would measure on this CPU."""
    from rl_engine.kernels.cpu import packed_linear

    monkeypatch.setattr(packed_linear, "screen_pays", lambda x, weight: pays)
    return _count(monkeypatch, packed_linear, "greedy_pick", ("picked", "none"))


@contextlib.contextmanager
def _deferred(llm, defer: bool):
    runner = llm.engine.runner
    kept = runner.defer_logits
    runner.defer_logits = defer
    llm.reset_prefix_cache()
    try:
        yield
    finally:
        runner.defer_logits = kept


def test_greedy_steps_without_logprobs_take_the_screened_pick(engine, monkeypatch):
    """All-greedy decode steps without log-probs pick from the head's bf16-screened product (`DeferredLogits`,
    packed_linear.greedy_pick): the same tokens as the argmax of every computed logit; steps that ask for
    log-probs, or sample, compute the logits (the same log-prob bits)."""
    from rl_engine.kernels.cpu import packed_linear

    assert engine.engine.runner.defer_logits
    prompts = mixed_prompts(7, seed=5, max_len=30)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, logprobs=None, ignore_eos=True)
    with _deferred(engine, False):
        ref = ref_greedy = engine.generate(prompts, greedy)
    calls = _picks(monkeypatch)
    with _deferred(engine, True):
        got = engine.generate(prompts, greedy)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
    screen = packed_linear._small is not None and packed_linear._small.has_screen()
    assert calls["picked"] >= (10 if screen else 0) and calls["none"] == (0 if screen else calls["none"])
    calls.update(picked=0, none=0)
    for params in (SamplingParams(temperature=0.0, max_tokens=6, logprobs=0, ignore_eos=True),
                   SamplingParams(temperature=1.0, max_tokens=6, seed=3, logprobs=None, ignore_eos=True)):
        with _deferred(engine, False):
            ref = engine.generate(prompts, params)
        with _deferred(engine, True):
            got = engine.generate(prompts, params)
        assert [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in got] == [
            (o.outputs[0].token_ids, o.outputs[0].logprobs) for o in ref]
    assert calls == {"picked": 0, "none": 0}
    # where the screen does not pay on this CPU (`screen_pays`): the logits, the same tokens, no pick tried
    calls = _picks(monkeypatch, pays=False)
    with _deferred(engine, True):
        skipped = engine.generate(prompts, greedy)
    assert [o.outputs[0].token_ids for o in skipped] == [o.outputs[0].token_ids for o in ref_greedy]
    assert calls == {"picked": 0, "none": 0}


def test_a_head_weight_updated_in_place_is_screened_afresh(engine, monkeypatch):
    """An in-place write to the head's weight between greedy decode steps without log-probs: the screened pick
    reads a fresh bf16 copy (made per packing), giving the tokens of the computed logits under the same write."""
    w = engine.engine.model.lm_head.weight
    prompts = mixed_prompts(3, seed=11, max_len=20)
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=None, ignore_eos=True)
    engine.generate(prompts, params)
    calls = _picks(monkeypatch)

    def run(defer: bool, scale: float | None):  # (the write after the prefill and two decode steps)
        outs = _steps_writing(engine, prompts, params, w, scale, _deferred(engine, defer), at_step=3)
        return [o.token_ids for o in outs]

    unchanged = run(True, None)
    updated = run(True, -1.0)
    assert updated == run(False, -1.0)
    assert updated != unchanged
    from rl_engine.kernels.cpu import packed_linear

    if packed_linear._small is not None and packed_linear._small.has_screen():
        assert calls["picked"] >= 8
