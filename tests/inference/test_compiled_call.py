"""compiled_call.direct_code: a torch.compile'd function's compiled code run as a plain function gives what the
compiled function gives, reads its parameters afresh (updated in place or replaced), refuses an input of another
dtype or device than the compile's, and calls inductor's C++ entry point only where AOTAutograd's and inductor's
wrappers pass inputs and outputs on unchanged (an output aliasing an input is rebuilt by AOTAutograd's wrapper: kept);
with dynamo disabled, direct_or_compiled keeps the compiled function (run eagerly) and says so.

Small graphs, one compile each (seconds of CPU)."""

from __future__ import annotations

import logging
import types

import pytest
import torch

from rl_engine.inference import compiled_call
from rl_engine.inference.compiled_call import direct_code, direct_or_compiled
from rl_engine.inference.compiled_decode import cpp_compiler

needs_cxx = pytest.mark.skipif(cpp_compiler() is None, reason="torch.compile's CPU backend needs a C++ compiler (g++ or CXX)")


class _Scale(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)))


def _project(mod, x):
    return torch.relu(x @ mod.weight.t()) * 2.0


def _view_and_project(mod, x):
    return x.view(-1), x @ mod.weight.t()


def _direct(f, name: str, args: tuple, *, cpp_wrapper: bool):
    """f compiled (under a code object of its own: dynamo's cache of it alone) and run once, then its direct code
    and the name of what that code calls for the graph."""
    fn = types.FunctionType(f.__code__.replace(), f.__globals__, name)
    torch.compile(fn, fullgraph=True, options={"cpp_wrapper": cpp_wrapper})(*args)
    direct = direct_code(fn, args)
    graph = next(n for n in direct.__code__.co_names if n.startswith("__compiled_fn"))
    return direct, direct.__globals__[graph].__qualname__


@needs_cxx
@pytest.mark.parametrize("cpp_wrapper", [True, False])
def test_direct_code_reads_parameters_afresh_and_refuses_another_dtype_or_device(cpp_wrapper):
    mod, x = _Scale(), torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        direct, call = _direct(_project, f"project_cpp{int(cpp_wrapper)}", (mod, x), cpp_wrapper=cpp_wrapper)
        # the C++ wrapper's entry point is called directly; the Python wrapper's `call` is not recognised (through AOT)
        assert call == ("_entry_call.<locals>.call" if cpp_wrapper else "_wrapped_call.<locals>.call")
        # fp32, 8-term dot products: compiled and eager round apart by a few ulps
        torch.testing.assert_close(direct(mod, x), _project(mod, x))
        with torch.no_grad():
            mod.weight.mul_(-1.0)  # in place: read
        torch.testing.assert_close(direct(mod, x), _project(mod, x))
        mod.weight = torch.nn.Parameter(mod.weight.detach() * 3.0)  # replaced by the same layout: the new one read
        torch.testing.assert_close(direct(mod, x), _project(mod, x))
        mod.weight = torch.nn.Parameter(mod.weight.detach().double())  # same shape and strides, another dtype
        with pytest.raises(RuntimeError, match=r"tensor input \d+ of the compiled graph is torch\.float64 on cpu, "
                                               r"compiled for torch\.float32 on the CPU"):
            direct(mod, x)
        mod.weight = torch.nn.Parameter(torch.empty(4, 8, device="meta"))  # same shape, strides and dtype, no data
        with pytest.raises(RuntimeError, match=r"is torch\.float32 on meta, compiled for torch\.float32 on the CPU"):
            direct(mod, x)


@needs_cxx
def test_an_output_aliasing_an_input_keeps_aotautograds_wrapper():
    """AOTAutograd rebuilds an output that is a view of an input from that input (its runtime wrapper's alias
    replay): such a graph is called through the wrapper, and the output is still a view of the caller's tensor."""
    mod, x = _Scale(), torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        direct, call = _direct(_view_and_project, "view_and_project", (mod, x), cpp_wrapper=True)
        assert call == "_wrapped_call.<locals>.call"
        flat, projected = direct(mod, x)
        torch.testing.assert_close(projected, x @ mod.weight.t())
        x[0, 0] = 42.0
        assert flat[0].item() == 42.0  # a view of x, as eager gives


def test_with_dynamo_disabled_direct_or_compiled_keeps_the_compiled_function_and_warns(monkeypatch, caplog):
    """TORCHDYNAMO_DISABLE=1: torch.compile runs the function eagerly and leaves no compiled code; the compiled
    function is what its callers (compile_decode's steps, compile_greedy's pass) keep calling, with a warning naming
    the caller and the switch."""
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    caplog.set_level(logging.WARNING, logger=compiled_call.__name__)
    mod, x = _Scale(), torch.randn(3, 8, generator=torch.Generator().manual_seed(3))
    fn = types.FunctionType(_project.__code__.replace(), _project.__globals__, "project_disabled")
    compiled = torch.compile(fn, fullgraph=True)
    with torch.inference_mode():
        assert torch.equal(compiled(mod, x), _project(mod, x))  # eager: the same bits
        assert direct_code(fn, (mod, x)) is None
        assert direct_or_compiled(fn, compiled, (mod, x), what="a caller") is compiled
    assert [r.getMessage() for r in caplog.records] == [
        "a caller: dynamo is disabled (TORCHDYNAMO_DISABLE=1), so project_disabled runs eagerly; unset it to compile it"]
