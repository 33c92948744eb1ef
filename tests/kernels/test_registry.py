"""The kernel registry: CPU defaults, overrides and their errors, CUDA choices with the availability
probes replaced, caching and logging, and the printable table."""

from __future__ import annotations

import logging

import pytest
import torch

import rl_engine.kernels as kernels
from rl_engine.kernels import backends, reference, registry
from rl_engine.kernels.backends import BackendStatus


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend a CUDA device with every optional library importable (probes replaced)."""
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    monkeypatch.setattr(backends, "cuda_capability", lambda: (9, 0))
    monkeypatch.setattr(backends, "triton_interpreter_active", lambda: False)
    monkeypatch.setattr(backends, "triton_importable", lambda: BackendStatus(True, "fake triton"))
    monkeypatch.setattr(backends, "flashinfer_importable", lambda: BackendStatus(True, "fake fi"))
    monkeypatch.setattr(backends, "transformer_engine_importable",
                        lambda: BackendStatus(True, "fake te"))
    monkeypatch.setattr(torch.version, "hip", None)
    registry.clear_cache()
    yield
    registry.clear_cache()


CPU_DEFAULT_OPS = ("rms_norm", "rms_norm_train", "silu_and_mul", "silu_and_mul_train", "rotary_full",
                   "varlen_causal_attention", "shared_prefix_attention", "paged_decode_attention", "paged_prefill_attention", "rotary_kv_write",
                   "logprob_shard_stats", "logprob_entropy_grad", "greedy_argmax", "inverse_cdf_sample",
                   "token_uniforms_at", "seeded_inverse_cdf_sample", "continue_decode_inputs")


def test_every_op_but_the_cpu_defaults_resolves_to_the_torch_reference_on_cpu(monkeypatch):
    """The C++ kernels are opt-in except the engine's and the training forward's RMSNorm and SwiGLU, the training
    forward's rotary and log-prob statistics,
    the packed training attention's (plain and shared-prefix), paged decode and prefill attention's, the fused
    rotary + KV write's, the greedy pick's, the inverse-CDF draw's and its seeded uniforms', the CPU defaults where
    they build."""
    monkeypatch.delenv("RL_ENGINE_CPU_KERNELS", raising=False)
    assert tuple(op for op, spec in registry.OPS.items() if spec.cpu_default) == CPU_DEFAULT_OPS
    for resolution in registry.describe("cpu"):
        if resolution.op in CPU_DEFAULT_OPS:
            continue
        assert resolution.backend == "torch", resolution
        assert resolution.reason.startswith("torch reference is the default on cpu (")
    assert registry.resolve("apply_rotary", "cpu") is reference.apply_rotary
    from rl_engine.kernels import cpu

    built, why = cpu.extension_status()
    for op in CPU_DEFAULT_OPS:
        resolution = registry.default_registry().resolution(op, torch.device("cpu"))
        if built:
            assert resolution.backend == "cpu" and resolution.fn is registry._load(registry.OPS[op].impls["cpu"])
            assert "the CPU default for this op (RL_ENGINE_CPU_KERNELS=0 turns it off)" in resolution.reason
        else:
            assert resolution.fn is registry._load(registry.OPS[op].impls["torch"]) and why in resolution.reason


def test_paged_decode_falls_back_to_torch_with_the_reason(monkeypatch):
    """No compiler (or the switch at 0): the torch reference, the loader's reason in the resolution."""
    monkeypatch.delenv("RL_ENGINE_CPU_KERNELS", raising=False)
    monkeypatch.setattr(backends, "cpu_kernels_status",
                        lambda *_: BackendStatus(False, "no C++ compiler ('c++' not on PATH; set CXX or install g++)"))
    registry.clear_cache()
    resolution = registry.default_registry().resolution("paged_decode_attention", "cpu")
    assert resolution.backend == "torch" and resolution.fn is reference.paged_decode_attention
    assert resolution.reason == ("torch reference: C++ CPU kernels unavailable (no C++ compiler ('c++' not on "
                                 "PATH; set CXX or install g++))")


def test_each_cpu_default_is_probed_from_the_source_its_kernel_is_built_from(monkeypatch):
    """A source that does not build takes its own ops to the torch reference and no other: the prefill attention
    (csrc/prefill_attention.cpp since 373b864) is not probed from cpu_ops.cpp, which would report "cpu" for it
    when only its own file fails, and keep it on torch when only cpu_ops.cpp does."""
    monkeypatch.delenv("RL_ENGINE_CPU_KERNELS", raising=False)
    monkeypatch.setattr(backends, "cpu_kernels_status",
                        lambda source="cpu_ops.cpp": BackendStatus(source != "prefill_attention.cpp", source))
    registry.clear_cache()
    resolution = registry.default_registry().resolution("paged_prefill_attention", "cpu")
    assert resolution.backend == "torch" and resolution.fn is reference.paged_prefill_attention
    assert "prefill_attention.cpp" in resolution.reason
    assert registry.default_registry().resolution("paged_decode_attention", "cpu").backend == "cpu"
    monkeypatch.setattr(backends, "cpu_kernels_status",
                        lambda source="cpu_ops.cpp": BackendStatus(source != "cpu_ops.cpp", source))
    registry.clear_cache()
    assert registry.default_registry().resolution("paged_prefill_attention", "cpu").backend == "cpu"
    assert registry.default_registry().resolution("paged_decode_attention", "cpu").backend == "torch"


def test_rms_norm_resolves_without_building_its_bf16_source_which_the_first_bf16_call_builds(monkeypatch, caplog):
    """The CPU `rms_norm` runs fp32 through train_elementwise.cpp and bf16 through bf16_rms_norm.cpp (its own
    extension). Resolving it probes the fp32 source only (an fp32-only process never builds the bf16 one: ~49 s
    uncached under load), and its reason says when the bf16 source is built and what runs where it does not; the
    first bf16 call builds it, and where that fails takes the torch reference, logging why. One failed build does
    not take the other's inputs with it."""
    from rl_engine.kernels import cpu
    from rl_engine.kernels.cpu import engine_elementwise

    monkeypatch.delenv("RL_ENGINE_CPU_KERNELS", raising=False)
    probed = []
    monkeypatch.setattr(backends, "cpu_kernels_status",
                        lambda source="cpu_ops.cpp": probed.append(source) or BackendStatus(True, source))
    registry.clear_cache()
    resolution = registry.default_registry().resolution("rms_norm", "cpu")
    assert resolution.backend == "cpu" and resolution.fn is engine_elementwise.rms_norm
    assert probed == ["train_elementwise.cpp"]
    assert resolution.reason.endswith("; bf16: C++ (bf16_rms_norm.cpp, built at the first bf16 call; where it does "
                                      "not build, the torch reference, the reason logged)")
    assert "bf16" not in registry.default_registry().resolution("rms_norm_train", "cpu").reason
    built, real_load = [], cpu.load_source

    def load(source, **kwargs):
        built.append(source.name)
        if source.name != "bf16_rms_norm.cpp":
            return real_load(source, **kwargs)
        return None, f"build failed (CalledProcessError: {source.name})"

    monkeypatch.setattr(cpu, "load_source", load)
    engine_elementwise.bf16_kernel.cache_clear()
    caplog.set_level(logging.WARNING, logger=cpu.__name__)
    try:
        g = torch.Generator().manual_seed(0)
        x, weight = torch.randn(3, 32, generator=g), torch.randn(32, generator=g)
        resolution.fn(x, weight, 1e-6)
        assert "bf16_rms_norm.cpp" not in built  # fp32 never loads the bf16 source
        out, _ = resolution.fn(x.bfloat16(), weight.bfloat16(), 1e-6)
        assert built.count("bf16_rms_norm.cpp") == 1
        assert torch.equal(out, reference.rms_norm(x.bfloat16(), weight.bfloat16(), 1e-6)[0])
        assert any("C++ kernel unavailable (build failed (CalledProcessError: bf16_rms_norm.cpp))" in r.getMessage()
                   for r in caplog.records)
    finally:
        engine_elementwise.bf16_kernel.cache_clear()  # the real build again for later tests


def test_cuda_preferences_with_probes_replaced(fake_cuda):
    chosen = {r.op: r.backend for r in registry.describe("cuda")}
    assert chosen["rms_norm"] == "triton"
    assert chosen["logprob_entropy"] == "triton"
    assert chosen["moe_permute"] == "triton"
    assert chosen["paged_decode_attention"] == "triton"  # CUDA-graph safe in function form
    assert chosen["paged_prefill_attention"] == "flashinfer"
    assert chosen["top_k_top_p_sampling"] == "flashinfer"
    assert chosen["varlen_causal_attention"] == "torch"  # no other implementation
    assert chosen["linear"] == "torch"  # transformer_engine is opt-in
    from rl_engine.kernels.triton.rms_norm import rms_norm

    assert registry.resolve("rms_norm", "cuda:1") is rms_norm


def test_cuda_falls_back_when_libraries_are_missing(fake_cuda, monkeypatch):
    monkeypatch.setattr(backends, "flashinfer_importable",
                        lambda: BackendStatus(False, "flashinfer not importable (ImportError)"))
    resolution = registry.default_registry().resolution("paged_prefill_attention", "cuda")
    assert resolution.backend == "torch"
    assert "flashinfer not importable" in resolution.reason
    assert resolution.unavailable["flashinfer"] == "flashinfer not importable (ImportError)"
    monkeypatch.setattr(backends, "cuda_capability", lambda: (6, 1))
    registry.clear_cache()
    resolution = registry.default_registry().resolution("paged_decode_attention", "cuda")
    assert resolution.backend == "torch" and "6.1" in resolution.unavailable["triton"]


def test_disabled_backend_and_wildcard_override(fake_cuda):
    registry.configure(registry.KernelConfig(disabled_backends=("triton",)))
    assert registry.default_registry().resolution("rms_norm", "cuda").backend == "torch"
    registry.configure(registry.KernelConfig(overrides={"*": "torch"}))
    assert {r.backend for r in registry.describe("cuda")} == {"torch"}
    registry.configure(registry.KernelConfig(overrides={"linear": "transformer_engine"}))
    assert registry.default_registry().resolution("linear", "cuda").backend == "transformer_engine"


def test_override_to_an_unavailable_backend_names_op_backend_reason_and_alternatives(monkeypatch):
    monkeypatch.setattr(backends, "triton_interpreter_active", lambda: False)
    kernels.set_backend_overrides({"rms_norm": "triton"})
    with pytest.raises(ValueError) as err:
        registry.resolve("rms_norm", "cpu")
    message = str(err.value)
    assert "rms_norm" in message and "'triton'" in message
    assert "TRITON_INTERPRET=1" in message  # why it is unavailable
    assert "available for rms_norm on cpu: torch" in message
    with pytest.raises(ValueError, match="flashinfer runs on CUDA only"):
        registry.configure(registry.KernelConfig(overrides={"paged_decode_attention": "flashinfer"}))
        registry.resolve("paged_decode_attention", "cpu")


def test_override_validation_at_configuration_time():
    with pytest.raises(ValueError, match="did you mean 'rms_norm'"):
        kernels.set_backend_overrides({"rmsnorm": "triton"})
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        kernels.set_backend_overrides({"rms_norm": "cuda"})
    with pytest.raises(ValueError, match="no flashinfer implementation"):
        kernels.set_backend_overrides({"rms_norm": "flashinfer"})
    with pytest.raises(ValueError, match="torch"):
        registry.KernelConfig(disabled_backends=("torch",))


def test_override_to_triton_on_cpu_dispatches_module_functions(triton_device):
    if triton_device != "cpu":
        pytest.skip("interpreter-only check")
    from rl_engine.kernels.triton.rms_norm import rms_norm as triton_rms_norm

    kernels.set_backend_overrides({"rms_norm": "triton"})
    assert registry.resolve("rms_norm", "cpu") is triton_rms_norm
    x, w = torch.randn(3, 8), torch.ones(8)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6)[0], reference.rms_norm(x, w, 1e-6)[0])
    assert registry.default_registry().resolution("silu_and_mul", "cpu").backend != "triton"  # others untouched


def test_resolution_is_cached_and_logged_once(caplog):
    caplog.set_level(logging.INFO, logger="rl_engine.kernels.registry")
    first = registry.resolve("rotary_cos_sin", "cpu")
    for _ in range(3):
        assert registry.resolve("rotary_cos_sin", torch.device("cpu")) is first
    records = [r for r in caplog.records if "rotary_cos_sin" in r.getMessage()]
    assert len(records) == 1
    resolution = registry.default_registry().resolution("rotary_cos_sin", "cpu")
    assert f"-> {resolution.backend} ({resolution.reason})" in records[0].getMessage()
    assert "default on cpu" in records[0].getMessage()


def test_backends_table_lists_every_op():
    text = kernels.format_backends_table("cpu")
    assert text.startswith("kernel backends on cpu:")
    for op in registry.OPS:
        assert f"\n{op} " in text


def test_module_level_ops_keep_their_signatures():
    """The names and call shapes the policy uses keep working through the registry."""
    x, w = torch.randn(2, 8), torch.ones(8)
    out, res = kernels.rms_norm(x, w, 1e-6, torch.zeros(2, 8))
    torch.testing.assert_close(out, reference.rms_norm(x, w, 1e-6)[0])
    assert kernels.silu_and_mul(torch.randn(3, 8)).shape == (3, 4)
    cos, sin = kernels.rotary_cos_sin(torch.arange(4), torch.ones(4))
    q, k = kernels.apply_rotary(torch.randn(4, 2, 8), torch.randn(4, 1, 8), cos, sin)
    assert q.shape == (4, 2, 8) and k.shape == (4, 1, 8)
    v = torch.randn(5, 1, 8)
    assert kernels.varlen_causal_attention(torch.randn(5, 2, 8), v, v, [0, 2, 5], 0.3).shape == (5, 2, 8)
