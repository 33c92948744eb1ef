"""Compiled decode steps on CPU, the counterpart of capturing a CUDA graph per bucket
(`EngineConfig.compile_decode`): one `torch.compile`d step for every graph-cache bucket of two rows or
more, its batch dimension dynamic (a symbol in the graph, `mark_dynamic`), and a static one for the bucket
of one row (dynamo specialises a size of 1, and generate.py's batch-1 decode is where static shapes pay).
Each bucket used to compile its own static step on first use: a batch that shrinks as rows stop at EOS
(an RL rollout) walks down through up to one bucket per multiple of 8 and compiled each (seconds apiece,
168 s over the first EOS-varied rollout of the `tiny` preset at a load of ~10); now it compiles once.

The step (the model's `hidden_states` over the bucket's padded rows, then `compute_logits`)
is compiled with `fullgraph=True` (a graph break is an error, not a
silent split; inductor's C++ backend, with its C++ wrapper: the ~40 kernel launches of a step are not
Python calls) on the bucket's first use, and reused afterwards. What changes
from step to step stays out of the graph: each layer's paged attention (the KV write, context lengths,
block tables, how rows are chunked) is one opaque custom op, `rl_engine::paged_attend`, which runs the
engine's eager `PagedAttention.attend` on the attention object the runner prepared for the step (vLLM
keeps attention out of its compiled graphs the same way, as a custom op reading a forward context); an engine
with the fused rotary + KV write runs `rl_engine::paged_attend_rotary` instead, the rotary inside the op too, and
one whose attention takes the C++ kernels' direct path runs `rl_engine::decode_attend_rotary`, that path as an op in
C++ reading the engine's static buffers (`_cpp_attend`), so the graph enters no Python.
So the graph's inputs are the bucket's `input_ids` and `positions` and the model's parameters, which
are read in place on every call: weights updated in place (a trainer step, weight sync) are seen.
The sampler stays eager.

Each step (the dynamic one, the batch-1 one) is a function with its own code object, because dynamo keeps
compiled code per code object: one cache entry per step and no recompile limit shared between them. Its guards (the input
shapes, every module and parameter the trace touched, ~230 checks, some in Python) cost more than the
graph saves at decode sizes (measured: a batch-1 step of the ~3.4M model 2.6 ms with them, 1.7 ms eager,
1.3 ms without), so after the step's first call they are not evaluated: the code dynamo made of the step (which
reads the graph's inputs, parameters included, afresh and calls the compiled graph) is called as a plain
function, outside dynamo's frame evaluation (`compiled_call.direct_or_compiled`; going through dynamo with its guards
skipped, `set_stance(skip_guard_eval_unsafe)`, cost ~75 us more a call: the `tiny` preset's 128-row step), and its
graph's C++ entry point is called without AOTAutograd's and inductor's Python wrappers where they do nothing for it
(`compiled_call`: ~25 us less).
One global they check does change while the engine lives: torch's thread count (a small model's step may run on
one thread, `threads.StepThreads`; `cpu_threads="auto"` follows the free cores), which inductor builds its
kernels' parallel loops for. So each step is kept per thread count, compiled on its first call at that
count (at most once per count the engine uses). The rest of what the guards check cannot change: a bucket's inputs
are its own static buffers (of the size the dynamic step takes as a symbol), parameters are re-read at every call
(updated in place, or replaced by a tensor of the same layout; one of another shape or strides fails inductor's
input checks, one of another dtype or device the direct call's (`compiled_call`), and each is named,
`_replaced_tensor`), the
engine always steps under inference mode, and the model's structure and kernels are fixed at build. The C++ wrapper
costs ~2-3 s more compilation per bucket and took a batch-1 step of the ~3.5M model from 1.47 ms to
1.07 ms (eager 1.54 ms; batch 64 unchanged, 12.8-12.9 ms against eager 13.5; one run through the lock, with static
steps per bucket: the dynamic step's batch-64 time was not re-measured). Inductor caches its compiled kernels on disk, so a later process compiles the same
bucket faster. Compiled kernels round differently from eager ones (fused reductions and multiply-adds),
within the log-prob contract but not bit for bit, so `model.batch_invariant` refuses this mode.
"""

from __future__ import annotations

import os
import shutil

import itertools
import logging
import time
import types
import warnings
import weakref

import torch

from rl_engine.inference.attention import PagedAttention
from rl_engine.inference.compiled_call import direct_or_compiled
from rl_engine.inference.graph_cache import DecodeRunner, StaticInputs

logger = logging.getLogger(__name__)

# kernels.reference.rms_norm takes eps as a 0-dim tensor from an lru_cache (fewer eager dispatches);
# dynamo traces the cached function instead, which yields the same constant: its warning says nothing here.
warnings.filterwarnings("ignore", message=r"Dynamo detected a call to a `functools.lru_cache`-wrapped function "
                        r"at 'reference.py")

# The PagedAttention objects that compiled graphs call back into, by the int handle baked into the
# graph (a custom op cannot take a Python object). Weak, so an engine that goes away takes its entry.
_ATTENTION: weakref.WeakValueDictionary[int, PagedAttention] = weakref.WeakValueDictionary()


# The two ops below are defined on the dispatcher with their Python kernels registered directly (torch.library.Library),
# not through `torch.library.custom_op`, whose wrapper adds ~3 us a call (one call per layer per step).
_LIB = torch.library.Library("rl_engine", "FRAGMENT")
_LIB.define("paged_attend(Tensor q, Tensor k, Tensor v, int handle, int layer_idx, float scale) -> Tensor")
_LIB.define("paged_attend_rotary(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, int handle, int layer_idx, "
            "float scale) -> Tensor")


def _paged_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: int, layer_idx: int,
                  scale: float) -> torch.Tensor:
    """`PagedAttention.attend` of the engine registered under `handle`: writes k, v [B, Hkv, D] into
    its paged cache and returns the attention output [B, Hq, D]. The cache is not a graph input (the
    graph never reads it), so it is not declared as mutated."""
    return _ATTENTION[handle].attend(layer_idx, q, k, v, scale=scale)


def _paged_attend_rotary(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         handle: int, layer_idx: int, scale: float) -> torch.Tensor:
    """`PagedAttention.attend_rotary` of the engine registered under `handle`: q and k before rotary, rotated
    as k and v are written into its cache (the cache, again, is not a graph input)."""
    return _ATTENTION[handle].attend_rotary(layer_idx, q, k, v, cos, sin, scale=scale)


def _attend_fake(q, *args):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


_LIB.impl("paged_attend", _paged_attend, "CompositeExplicitAutograd")
_LIB.impl("paged_attend_rotary", _paged_attend_rotary, "CompositeExplicitAutograd")
torch.library.register_fake("rl_engine::paged_attend", _attend_fake, lib=_LIB)
torch.library.register_fake("rl_engine::paged_attend_rotary", _attend_fake, lib=_LIB)
paged_attend = torch.ops.rl_engine.paged_attend.default
paged_attend_rotary = torch.ops.rl_engine.paged_attend_rotary.default


# The engines whose attention object registered its decode context with the C++ op (below), by handle; whether the
# op's fake (shape) kernel is registered (once the extension that defines the op is loaded).
_CPP_CONTEXTS: weakref.WeakValueDictionary[int, PagedAttention] = weakref.WeakValueDictionary()
_CPP_FAKE: list[bool] = []


def _cpp_attend(attn: PagedAttention, inputs: StaticInputs) -> bool:
    """Whether the compiled step's layers call `rl_engine::decode_attend_rotary` (kernels/cpu/csrc/cpu_ops.cpp), the
    attention's direct decode path (`PagedAttention.attend_rotary`: the fused rotary write, then the C++ decode
    kernel) as an op in C++, so that the graph runs no Python: an engine on CPU whose attention takes that path in
    every decode step (`PagedAttention.decodes_direct`), its decode
    context registered here (the static buffers every bucket's rows are views of, the caches; dropped with the
    attention object). Else the Python op, `paged_attend_rotary`. While the attention has a `decode_observer`, the
    C++ op calls the Python op's kernel, which calls it."""
    from rl_engine.kernels.cpu import ops as cpu_ops

    caches = attn.k_caches
    if not (attn.decodes_direct and caches[0].device.type == "cpu"):
        return False
    handle = id(attn)
    if _CPP_CONTEXTS.get(handle) is attn:
        return True
    try:
        ext = cpu_ops.extension()  # (it defines the op)
    except RuntimeError:
        return False
    host = inputs.host
    ext.decode_context_set(handle, host["slot_mapping"], host["block_tables"], host["context_lens"], list(caches),
                           list(attn.v_caches), attn.first_layer, _paged_attend_rotary)
    ext.decode_context_observed(handle, attn.decode_observer is not None)
    attn.observer_hooks.append(lambda observed: ext.decode_context_observed(handle, observed))
    weakref.finalize(attn, ext.decode_context_clear, handle)
    _CPP_CONTEXTS[handle] = attn
    if not _CPP_FAKE:
        torch.library.register_fake("rl_engine::decode_attend_rotary", _attend_fake, lib=_LIB)
        _CPP_FAKE.append(True)
    return True


class _AttendOp:
    """The `attn_context` a compiled step hands the model: `attend` (or `attend_rotary`, for an engine whose
    attention rotates q and k itself) becomes the custom op: `rl_engine::decode_attend_rotary`, in C++, where the
    attention takes its direct path (`_cpp_attend`), else the Python op."""

    def __init__(self, attn: PagedAttention, inputs: StaticInputs) -> None:
        self.handle = id(attn)
        self.fuses_rotary = attn.fuses_rotary
        _ATTENTION[self.handle] = attn
        self.cpp = _cpp_attend(attn, inputs)

    def attend_rotary(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, *, scale: float) -> torch.Tensor:
        if self.cpp:
            return torch.ops.rl_engine.decode_attend_rotary.default(q, k, v, cos, sin, self.handle, layer_idx, scale)
        return paged_attend_rotary(q, k, v, cos, sin, self.handle, layer_idx, scale)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               scale: float) -> torch.Tensor:
        return paged_attend(q, k, v, self.handle, layer_idx, scale)


def _step(model, attn_context, input_ids: torch.Tensor, positions: torch.Tensor):
    hidden = model.hidden_states(input_ids, positions=positions, attn_context=attn_context)
    return hidden, model.compute_logits(hidden)


def cpp_compiler() -> str | None:
    """The path of the C++ compiler inductor's CPU backend calls (CXX, else g++; torch._inductor.cpp_builder),
    or None when it is not found."""
    return shutil.which(os.environ.get("CXX", "g++"))


def check_compilable(model, *, latent: bool) -> None:
    """ValueError, naming the fix, for a model whose decode step cannot be compiled per bucket."""
    if model.batch_invariant:
        raise ValueError("compile_decode=True cannot be combined with model.batch_invariant: compiled kernels "
                         "fuse reductions and change the bits the mode guarantees; turn one of them off")
    if model.config.is_moe:
        raise ValueError("compile_decode=True: MoE models decode eagerly (expert dispatch syncs with the host "
                         "every layer); turn compile_decode off for this model")
    if latent:
        raise ValueError("compile_decode=True: latent (MLA) attention has no compiled decode step; turn "
                         "compile_decode off for this model")
    if cpp_compiler() is None:
        cxx = os.environ.get("CXX", "g++")
        raise ValueError(f"compile_decode=True needs a C++ compiler for inductor's CPU backend and {cxx!r} "
                         "(the CXX environment variable, else g++) is not found: install g++ or set CXX, or turn "
                         "compile_decode off")


def _layouts(model) -> dict[str, tuple]:
    return {name: (tuple(t.shape), t.stride(), t.dtype, t.device)
            for name, t in itertools.chain(model.named_parameters(), model.named_buffers())}


class _CompiledStep:
    """A compiled decode step and the parameter layouts it was built for."""

    def __init__(self) -> None:
        self.compiled = None
        self.layouts: dict[str, tuple] = {}  # each parameter's and buffer's (shape, strides, dtype, device) at compile


# The dynamic-batch steps of each engine, one per torch thread count (keyed by its attention object, which every
# bucket's runner shares).
_SHARED_STEPS: weakref.WeakKeyDictionary[PagedAttention, dict[int, _CompiledStep]] = weakref.WeakKeyDictionary()


def _shared_steps(attn: PagedAttention) -> dict[int, _CompiledStep]:
    steps = _SHARED_STEPS.get(attn)
    if steps is None:
        steps = _SHARED_STEPS[attn] = {}
    return steps


class CompiledDecodeRunner(DecodeRunner):
    """A bucket whose step is compiled on its first run and replayed after: the one dynamic-batch step its
    engine's buckets of two rows or more share, or its own static step for one row."""

    def __init__(self, batch_size: int, *, inputs: StaticInputs, model, attn: PagedAttention) -> None:
        super().__init__(batch_size, inputs=inputs, model=model, attn=attn)
        self._attend = _AttendOp(attn, inputs)
        # Buckets of two rows or more share one step compiled with a dynamic batch dimension (see the module
        # doc); a bucket of one has its own static step. Either is kept per torch thread count.
        self._steps: dict[int, _CompiledStep] = _shared_steps(attn) if batch_size >= 2 else {}
        # Seconds of the compiling runs this bucket made (one per thread count it compiled at), summed;
        # None until its first compile. A step shared by several buckets counts on the one that compiled it.
        self.compile_seconds: float | None = None

    def run(self, *, max_context_len: int, routing=None, first_block: int | None = None):
        if routing is not None:
            raise ValueError("routing capture is not supported in a compiled decode step; set compile_decode=False")
        self.attn.prepare(slot_mapping=self.slot_mapping, num_single=self.batch_size, block_tables=self.block_tables,
                          context_lens=self.context_lens, max_context_len=max_context_len, prefills=[],
                          first_block=first_block)
        threads = torch.get_num_threads()
        step = self._steps.setdefault(threads, _CompiledStep())
        if step.compiled is not None:
            # dynamo's compiled code of this step, called as a plain function: no guards (see the module doc)
            try:
                return step.compiled(self.model, self._attend, self.input_ids, self.positions)
            except RuntimeError as e:  # inductor's own message blames "an incorrect fake kernel"
                problem = self._replaced_tensor(step)
                if problem is None:
                    raise
                raise ValueError(problem) from e
        # A copy of `_step` with a code object of its own: dynamo's cache of this step alone.
        dynamic = self.batch_size >= 2
        name = (f"decode_step_dynamic_t{threads}" if dynamic else f"decode_step_{self.batch_size}_t{threads}")
        fn = types.FunctionType(_step.__code__.replace(), _step.__globals__, name)
        if dynamic:  # one graph for every bucket of two rows or more: the batch size is a symbol
            torch._dynamo.mark_dynamic(self.input_ids, 0)
            torch._dynamo.mark_dynamic(self.positions, 0)
        compiled = torch.compile(fn, dynamic=False, fullgraph=True, options={"cpp_wrapper": True})
        start = time.perf_counter()
        args = (self.model, self._attend, self.input_ids, self.positions)
        out = compiled(*args)
        seconds = time.perf_counter() - start
        self.compile_seconds = (self.compile_seconds or 0.0) + seconds
        step.compiled = direct_or_compiled(fn, compiled, args, what="compile_decode")
        step.layouts = _layouts(self.model)
        logger.info("compiled the decode step of bucket %d (%s, %d threads) in %.1f s", self.batch_size,
                    "every bucket of 2+ rows" if dynamic else "static", threads, seconds)
        return out

    def _replaced_tensor(self, step: _CompiledStep) -> str | None:
        """After a compiled step failed: the parameter or buffer whose tensor was replaced by one of another
        shape, strides, dtype or device since the compile (the graph reads them in place, laid out as it was built
        for; its guards, which would catch this, are skipped), as an error naming the fix; else None."""
        now = _layouts(self.model)
        for name, built in step.layouts.items():
            if now.get(name, built) != built:
                (shape, strides, dtype, device), (shape1, strides1, dtype1, device1) = built, now[name]
                return (f"the compiled decode step of bucket {self.batch_size} reads {name!r} as shape {shape}, "
                        f"strides {strides}, {dtype} on {device}, but it is now shape {shape1}, strides {strides1}, "
                        f"{dtype1} on {device1}: "
                        "the tensor was replaced (`.data =`, a new Parameter, load_state_dict(assign=True)) instead "
                        "of updated in place. Update weights in place, `with torch.no_grad(): param.copy_(new)`, "
                        "which keeps the parameter's strides, or build a new engine")
        return None
