"""A `torch.compile`d function (fullgraph, compiled once) called without dynamo's per-call machinery: the code dynamo
made of it, whose bytecode reads the graph's inputs afresh on every call (each parameter through its module's
`_parameters`, tensor attributes, sizes), run as a plain function, its helpers and its call of the compiled graph
replaced by what they come to for this graph (`direct_code`). What each layer cost a compiled decode step of the
`tiny` preset (one thread, 8 and 128 rows, in one process, alternated):
- dynamo's frame evaluation, cache lookup and stance (`set_stance(skip_guard_eval_unsafe)`): ~75 us a call, gone by
  calling the code directly (the guards were skipped already);
- `torch._disable_dynamo` around the code's helpers (`call_size`, the pre-graph profiler marks): ~3 us; it matters
  only under dynamo's frame evaluation, which the direct call is outside of (`_PlainDynamoUtils`);
- AOTAutograd's runtime wrapper and inductor's `CompiledFxGraph.__call__`: ~10 us. The wrapper applies input
  mutations, regenerates aliased outputs, detaches inputs or disables autocast where its generated code does; that
  code is checked to do none of these (`_runtime_wrapper_is_plain`), else the graph is called through it;
- inductor's Python `call` around its C++ entry point: ~12 us, most of it a `torch.tensor` of each size input, made
  once per size here instead (`_entry_call`).
Together 127 -> 102 us a call at 8 rows, 503 -> 471 us at 128. Each call checks the graph's tensor inputs' dtypes,
and whether each is on the CPU, against the compile's (~2 us): inductor's C++ checks sizes and strides only, and would
read a tensor of another dtype or on another device (a parameter replaced after the compile) as if it were the
compile's. (A move between two accelerators is not seen: the compiled decode step runs on the CPU.)
"""

from __future__ import annotations

import logging
import types
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

# The code of `torch._disable_dynamo`'s wrapper, to recognise the helpers it wraps.
_DISABLE_DYNAMO_CODE = torch._disable_dynamo(lambda: None).__code__
# The global under which dynamo's code reaches torch._dynamo.utils.
_DYNAMO_UTILS = "__import_torch_dot__dynamo_dot_utils"
# The names AOTAutograd's generated runtime wrapper uses when it only calls the graph: grad mode off around the call
# (a no-op under inference mode), the outputs as a list, their count checked, their dynamic dims marked for a later
# dynamo trace of them (skipped here: the sampler's compiled greedy pass traces logits with every dim dynamic anyway).
# Mutated inputs, aliased outputs, detaching and autocast each bring a helper or a torch name of their own.
_PLAIN_RUNTIME_WRAPPER = {"AssertionError", "_C", "_mark_dynamic_", "_set_grad_enabled", "is_grad_enabled",
                          "isinstance", "len", "list", "torch", "tuple", "__builtins__"}
# The names of inductor's C++-wrapper `call` (`_wrap_func.g`): each non-tensor input as a tensor, the inputs as
# handles, the entry point, the outputs from its handles. Nothing else.
_CPP_WRAPPER_CALL = {"Tensor", "_C", "_aoti", "alloc_tensors_by_stealing_from_void_ptrs", "clear", "isinstance",
                     "tensor", "torch", "unsafe_alloc_void_ptrs_from_tensors"}


class _PlainDynamoUtils:
    """`torch._dynamo.utils` as the compiled code reads it, each helper wrapped by `torch._disable_dynamo` given
    unwrapped (read on first use, then kept as an attribute)."""

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch._dynamo.utils, name)
        if getattr(attr, "__code__", None) is _DISABLE_DYNAMO_CODE:
            attr = attr.__wrapped__
        setattr(self, name, attr)
        return attr


class _GraphInputs(Exception):
    """Raised in place of calling the compiled graph: the inputs the compiled code gathered for it."""


def _cells(fn: Any) -> dict[str, Any]:
    code, closure = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or closure is None:
        return {}
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, closure)}


def _names(code: types.CodeType) -> set[str]:
    """The global and attribute names `code` (and the code it nests: comprehensions) reads."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _held(fn: Any) -> Any:
    """What AOTAutograd's cache entries (`SerializableCompiledFunction`, which only call it) around `fn` hold."""
    from torch._functorch._aot_autograd.runtime_wrappers import SerializableCompiledFunction

    while isinstance(fn, SerializableCompiledFunction):
        fn = fn.compiled_fn
    return fn


def _runtime_wrapper_is_plain(forward: Any) -> Any:
    """Inductor's compiled graph under AOTAutograd's `forward` (what dynamo calls), when everything in between only
    passes the inputs on and the outputs back for this graph (no parameters prepended, a runtime wrapper doing
    nothing else: `_PLAIN_RUNTIME_WRAPPER`); else None."""
    outer = _cells(forward)
    if outer.get("params_buffers_flat") != []:
        return None
    wrapper = _cells(_held(outer.get("compiled_fn")))
    generated, graph = wrapper.get("_codegen_runtime_wrapper"), _held(wrapper.get("_inner_compiled_fn"))
    if generated is None or graph is None:
        return None
    helpers = {k for k in generated.__globals__ if not k.startswith("_dyn_dims_")}
    used = {k for k in _names(generated.__code__) if not k.startswith("_dyn_dims_")}
    return graph if helpers <= _PLAIN_RUNTIME_WRAPPER and used <= _PLAIN_RUNTIME_WRAPPER else None


def _cpp_entry(compiled_graph: Any) -> Callable | None:
    """The C++ entry point of inductor's code for the graph dynamo installed (`compiled_graph`: its
    `torch._dynamo.disable` wrapper of AOTAutograd's `forward`), when what lies between only passes inputs and
    outputs (`_runtime_wrapper_is_plain`) and inductor's `call` is its C++ wrapper's (`_CPP_WRAPPER_CALL`); else None.
    `CompiledFxGraph.__call__`, skipped too, adds a profiler mark and autotune-cache bookkeeping of the first call."""
    from torch._inductor.output_code import CompiledFxGraph

    graph = _runtime_wrapper_is_plain(getattr(compiled_graph, "_torchdynamo_orig_callable", None))
    if not isinstance(graph, CompiledFxGraph):
        return None
    call = graph.current_callable
    code = getattr(call, "__code__", None)
    if code is None or code.co_freevars != ("f",) or not _names(code) <= _CPP_WRAPPER_CALL:
        return None
    return _cells(call)["f"]


def _input_error(inputs: tuple, kinds: list[tuple[torch.dtype, bool]]) -> RuntimeError:
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    i = next(i for i, (t, kind) in enumerate(zip(tensors, kinds)) if (t.dtype, t.is_cpu) != kind)
    dtype, on_cpu = kinds[i]
    return RuntimeError(f"tensor input {i} of the compiled graph is {tensors[i].dtype} on {tensors[i].device}, "
                        f"compiled for {dtype} {'on' if on_cpu else 'off'} the CPU")


def _entry_call(entry: Callable, inputs: tuple) -> Callable:
    """The graph's C++ entry point called with `inputs` as inductor's `call` passes them, each size input's tensor
    made once per size."""
    to_handles = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors
    from_handles = torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs
    kinds = [(torch.int64, True) if type(x) is int else (x.dtype, x.is_cpu) for x in inputs]  # (torch.tensor(int))
    sizes: dict[int, torch.Tensor] = {}

    def size(n: int) -> torch.Tensor:
        t = sizes.get(n)
        if t is None:
            t = sizes[n] = torch.tensor(n)
        return t

    def call(*inputs):
        tensors = [size(x) if x.__class__ is int else x for x in inputs]
        if [(t.dtype, t.is_cpu) for t in tensors] != kinds:
            raise _input_error(tensors, kinds)
        return from_handles(entry(to_handles(tensors)))
    return call


def _wrapped_call(compiled_graph: Callable, inputs: tuple) -> Callable:
    """The graph called as dynamo calls it, its tensor inputs' dtypes and devices (`_entry_call`) checked first."""
    kinds = [(x.dtype, x.is_cpu) for x in inputs if isinstance(x, torch.Tensor)]

    def call(*inputs):
        if [(x.dtype, x.is_cpu) for x in inputs if isinstance(x, torch.Tensor)] != kinds:
            raise _input_error(inputs, kinds)
        return compiled_graph(*inputs)
    return call


def direct_code(fn: types.FunctionType, args: tuple) -> types.FunctionType | None:
    """`fn`'s compiled code (after `torch.compile(fn, fullgraph=True)` ran once, with `args`) as a plain function
    taking `fn`'s arguments, its graph called through `_entry_call` where `_cpp_entry` finds the C++ entry point, else
    as dynamo calls it; an input of another dtype than at this call, or moved to or from the CPU, raises a
    RuntimeError. Dynamo keeps `fn`'s arguments in the code it makes (the contract vLLM's compiled-code dispatch relies
    on too); `fn` must have no closure. None when dynamo compiled nothing (TORCHDYNAMO_DISABLE=1: torch.compile ran
    `fn` eagerly): `direct_or_compiled`."""
    entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(fn.__code__)
    if not entries:
        return None
    # fullgraph=True and one compile per code object: exactly one entry, holding the whole function
    assert len(entries) == 1, f"{fn.__name__}: {len(entries)} compiled entries, expected 1"
    code = entries[0].code
    graphs = [name for name in code.co_names if name.startswith("__compiled_fn")]
    assert len(graphs) == 1, f"{fn.__name__}: compiled code calls {graphs}, expected one graph"
    compiled_graph = fn.__globals__[graphs[0]]
    scope = {**fn.__globals__, _DYNAMO_UTILS: _PlainDynamoUtils()}

    def gather(*inputs):
        raise _GraphInputs(inputs)

    scope[graphs[0]] = gather
    direct = types.FunctionType(code, scope, fn.__name__)
    try:
        direct(*args)
    except _GraphInputs as e:
        inputs = e.args[0]
    entry = _cpp_entry(compiled_graph)
    if entry is not None and all(type(x) is int or isinstance(x, torch.Tensor) for x in inputs):
        scope[graphs[0]] = _entry_call(entry, inputs)
    else:
        logger.info("%s: its compiled graph is called through AOTAutograd's runtime wrapper", fn.__name__)
        scope[graphs[0]] = _wrapped_call(compiled_graph, inputs)
    return direct


def direct_or_compiled(fn: types.FunctionType, compiled: Callable, args: tuple, *, what: str) -> Callable:
    """`direct_code(fn, args)`, or, when dynamo compiled nothing (TORCHDYNAMO_DISABLE=1: `torch.compile` gave `fn`
    itself and ran it eagerly), `compiled` (`torch.compile(fn, ...)`, which keeps running it eagerly), with a warning
    naming `what` was to be compiled and the switch."""
    direct = direct_code(fn, args)
    if direct is None:
        logger.warning("%s: dynamo is disabled (TORCHDYNAMO_DISABLE=1), so %s runs eagerly; unset it to compile it",
                       what, fn.__name__)
        return compiled
    return direct
