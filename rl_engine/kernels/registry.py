"""The kernel registry: per op and device type, which implementation runs, and why.

Every op has a torch reference plus optional fast implementations (Triton, FlashInfer, Transformer
Engine). Resolution happens once per (op, device type) and is cached, so a model resolves its ops at
build time and `forward` only calls plain functions. The rules, in order:

0. under `KernelConfig.batch_invariant` (the run's `model.batch_invariant`) every op resolves to its
   batch-invariant implementation (`OpSpec.invariant`, torch code on every device); an op without
   one, or an override naming another backend, fails with a ValueError naming the op;
1. an override (`set_backend_overrides` / `KernelConfig`) names the backend; if that backend cannot
   run on the device, resolution fails with a ValueError naming op, backend, why, and what can run;
2. on CPU the C++ kernel (`cpu` backend, `rl_engine.kernels.cpu`) of an op whose spec makes it the
   CPU default (`cpu_default`: rms_norm and silu_and_mul, the engine's eager RMSNorm and SwiGLU in one C++ pass
   a row (fp32 through the training kernels' forwards, bf16 RMSNorm through its own; bf16 SwiGLU stays torch's);
   varlen_causal_attention and shared_prefix_attention, the training forward's packed
   attention in place and in one call, forward and backward, where the torch path pads and masks or calls SDPA
   once per sequence; paged_decode_attention, which reads K/V in place in their blocks where
   the torch reference gathers them; paged_prefill_attention, every prefill chunk of an engine step in one
   call reading K/V in place, where the torch path calls SDPA per sequence; rms_norm_train, silu_and_mul_train and
   rotary_full, the training forward's RMSNorm, SwiGLU and rotary in one C++ pass each way where torch takes
   several elementwise ops; logprob_shard_stats and logprob_entropy_grad, the policy's log-prob statistics and
   their logits gradient in one pass each; rotary_kv_write, one pass where the engine's torch path takes seven
   ops; greedy_argmax, ~12x torch's max over [64, 32k] logits; inverse_cdf_sample, a sampled decode step's
   pick in one pass where the torch reference takes a dozen small ops; token_uniforms_at, its seeded
   uniforms in one loop where numpy takes a dozen calls; seeded_inverse_cdf_sample, the two in one call; and
   continue_decode_inputs, a persistent decode step's inputs in one pass where numpy takes ~25 calls), or of
   every op that has one under `RL_ENGINE_CPU_KERNELS=1`, when it is not disabled
   (`disabled_backends`, `RL_ENGINE_CPU_KERNELS=0`) and it built; else the torch reference with the
   reason the C++ kernel was not taken (no compiler, a failed build; the C++ kernels are built only
   when they could be chosen); on any other non-CUDA device the torch reference;
3. on CUDA the first available backend in the op's preference order (never an opt-in backend).

Availability comes from `backends.backend_status`, looked up at resolve time, so tests monkeypatch
the probes in `backends` and call `clear_cache()`. Implementations are imported lazily (by dotted
path) only when chosen, so a missing optional library never breaks `import rl_engine.kernels`.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from rl_engine.kernels import backends
from rl_engine.kernels import cpu as cpu_kernels

logger = logging.getLogger(__name__)

_REF = "rl_engine.kernels.reference"
_TRITON = "rl_engine.kernels.triton"
_FLASHINFER = "rl_engine.kernels.flashinfer_adapter"
_TE = "rl_engine.kernels.te_adapter"
_LOGPROB = "rl_engine.kernels.logprob"
_INVARIANT = "rl_engine.kernels.invariant"
_CPU = "rl_engine.kernels.cpu.ops"
_CPU_VARLEN = "rl_engine.kernels.cpu.varlen_attention"
_CPU_TRAIN = "rl_engine.kernels.cpu.train_elementwise"
_CPU_ENGINE = "rl_engine.kernels.cpu.engine_elementwise"


@dataclass(frozen=True)
class OpSpec:
    """One op: dotted paths of its implementations per backend and its CUDA preference order.

    `opt_in` backends are never chosen by default, only by an override (Transformer Engine linears
    change parameter names and numerics, so the model author asks for them). `invariant`: the
    implementation used under `batch_invariant` (None: the op is refused there).
    """

    name: str
    impls: Mapping[str, str]  # backend -> "module:attribute"
    cuda_preference: tuple[str, ...]
    opt_in: frozenset[str] = frozenset()
    doc: str = ""
    invariant: str | None = None
    cpu_default: bool = False  # its C++ CPU kernel is the CPU default where it builds
    cpu_source: str = "cpu_ops.cpp"  # the file under kernels/cpu/csrc/ its C++ kernel is built from
    # (dtype, file): inputs of that dtype run another source's kernel, built as its own extension at the first call
    # of that dtype; where it does not build, those inputs take the torch reference inside the "cpu" implementation
    # and the reason is logged then (the resolution's reason says so, without building it)
    cpu_dtype_sources: tuple[tuple[str, str], ...] = ()


def _spec(name: str, doc: str, *, triton: str | None = None, flashinfer: str | None = None,
          transformer_engine: str | None = None, torch_impl: str | None = None, cpu: str | None = None,
          cuda_preference: tuple[str, ...] = ("triton", "torch"),
          opt_in: frozenset[str] = frozenset(), invariant: str | None = "torch", cpu_default: bool = False,
          cpu_source: str = "cpu_ops.cpp", cpu_dtype_sources: tuple[tuple[str, str], ...] = ()) -> OpSpec:
    """`invariant`: "torch" when the torch implementation already reduces per row in a fixed order
    (or does not reduce), a dotted path for a dedicated one, None when there is none."""
    impls = {"torch": torch_impl or f"{_REF}:{name}"}
    for backend, path in (("cpu", cpu), ("triton", triton), ("flashinfer", flashinfer),
                          ("transformer_engine", transformer_engine)):
        if path is not None:
            impls[backend] = path
    preference = tuple(b for b in cuda_preference if b in impls)
    return OpSpec(name=name, impls=impls, cuda_preference=preference, opt_in=opt_in, doc=doc,
                  invariant=impls["torch"] if invariant == "torch" else invariant, cpu_default=cpu_default,
                  cpu_source=cpu_source, cpu_dtype_sources=cpu_dtype_sources)


OPS: dict[str, OpSpec] = {s.name: s for s in (
    _spec("rms_norm", "(x, weight, eps, residual=None) -> (normed, new_residual | None)",
          triton=f"{_TRITON}.rms_norm:rms_norm", cpu=f"{_CPU_ENGINE}:rms_norm",
          # the engine's eager steps: one C++ pass a row (fp32: the training kernel's forward; bf16 its own)
          cpu_default=True, cpu_source="train_elementwise.cpp", cpu_dtype_sources=(("bf16", "bf16_rms_norm.cpp"),)),
    _spec("rms_norm_train", "rms_norm's contract, differentiable: the policy's norms when autograd records the forward",
          triton=f"{_TRITON}.rms_norm:rms_norm", torch_impl=f"{_REF}:rms_norm", cpu=f"{_CPU_TRAIN}:rms_norm",
          # fp32 forward + backward in one C++ pass each, where torch takes ~6 elementwise ops each way
          cpu_default=True, cpu_source="train_elementwise.cpp"),
    _spec("rotary_cos_sin", "(positions, inv_freq) -> (cos, sin) [T, head_dim//2] fp32"),
    _spec("apply_rotary", "(q, k, cos, sin) -> (q_rot, k_rot), new tensors",
          triton=f"{_TRITON}.rotary:apply_rotary"),
    _spec("apply_rotary_inplace", "(q, k, positions, cos_cache, sin_cache) -> (q, k) rotated in place",
          triton=f"{_TRITON}.rotary:apply_rotary_inplace"),
    _spec("silu_and_mul", "(x [..., 2d] as [gate|up]) -> silu(gate) * up [..., d]",
          triton=f"{_TRITON}.swiglu:silu_and_mul", cpu=f"{_CPU_ENGINE}:silu_and_mul",
          # fp32: the training kernel's forward in one pass (bf16 keeps torch's, faster there)
          cpu_default=True, cpu_source="train_elementwise.cpp"),
    _spec("silu_and_mul_train", "silu_and_mul's contract, differentiable: the policy's SwiGLU when autograd records "
          "the forward (overwrite_input=True: its backward may write x's gradient over x)",
          triton=f"{_TRITON}.swiglu:silu_and_mul", torch_impl=f"{_REF}:silu_and_mul",
          cpu=f"{_CPU_TRAIN}:silu_and_mul", cpu_default=True, cpu_source="train_elementwise.cpp"),
    _spec("rotary_full", "(x [T, heads, head_dim], cos [T, 1, head_dim], sin [T, 1, head_dim] as [-sin | sin]) -> "
          "x * cos + roll(x, head_dim // 2) * sin: the policy's rotary on the torch path, differentiable",
          cpu=f"{_CPU_TRAIN}:rotary_full", cpu_default=True, cpu_source="train_elementwise.cpp"),
    _spec("varlen_causal_attention", "(q, k, v, cu_seqlens, scale) -> [T, heads, head_dim]",
          invariant=f"{_INVARIANT}:varlen_causal_attention", cpu=f"{_CPU_VARLEN}:varlen_causal_attention",
          # the training forward's packed short sequences, in place (fp32): no padding, masks or per-sequence calls
          cpu_default=True, cpu_source="varlen_attention.cpp"),
    _spec("shared_prefix_attention", "(q, k, v, cu_seqlens, prefix_of, scale) -> [T, heads, v_head_dim]: segment s "
          "causal over itself and, when prefix_of[s] >= 0, in full over that segment's keys",
          cpu=f"{_CPU_VARLEN}:shared_prefix_attention", invariant=None,  # the invariant kernels have no such form
          cpu_default=True, cpu_source="varlen_attention.cpp"),
    _spec("paged_decode_attention",
          "(q, k_cache, v_cache, block_tables, context_lens, scale) -> [batch, heads, head_dim]",
          triton=f"{_TRITON}.paged_attention:paged_decode_attention",
          flashinfer=f"{_FLASHINFER}:paged_decode_attention", cpu=f"{_CPU}:paged_decode_attention",
          # Triton first: the engine captures this op in CUDA graphs, and only the Triton kernel is
          # capture-safe in function form (FlashInfer's plans per call and syncs with the host;
          # the engine uses it through FlashInferAttention, planning outside the graph).
          cuda_preference=("triton", "flashinfer", "torch"),
          invariant=f"{_INVARIANT}:paged_decode_attention",
          # the C++ kernel reads K/V in place; the torch path gathers every row's blocks each step
          cpu_default=True),
    _spec("paged_prefill_attention",
          "(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale) -> [T, heads, head_dim]",
          flashinfer=f"{_FLASHINFER}:paged_prefill_attention", cpu=f"{_CPU}:paged_prefill_attention",
          cuda_preference=("flashinfer", "torch"), invariant=f"{_INVARIANT}:paged_prefill_attention",
          # one call per layer for every prefill chunk of a step, keys read in place; the engine's torch path
          # runs one SDPA call per sequence (~2x the time at generate.py's batch-64 prompts)
          cpu_default=True, cpu_source="prefill_attention.cpp"),
    _spec("reshape_and_cache", "(k, v, k_cache, v_cache, slot_mapping) -> None, writes the caches",
          triton=f"{_TRITON}.paged_attention:reshape_and_cache"),
    _spec("rotary_kv_write", "(q, k, v, cos, sin, slot_mapping, k_cache, v_cache, *, return_k=False) -> (q_rot, "
          "k_rot | None): rotate-half rotary over the first 2 * cos.shape[1] dims, rotated k and v written into "
          "the caches", cpu=f"{_CPU}:rotary_kv_write",
          # generate.py's ~3.5M model, batch 64, 1 thread, in-process A/B: eager steps 1.06x, compiled 1.01-1.03x
          cpu_default=True),
    _spec("logprob_entropy",
          "(logits, targets, *, temperature, vocab_start=0, vocab_size=None, process_group=None)"
          " -> (logprobs [T] fp32, entropy [T] fp32)",
          torch_impl=f"{_LOGPROB}:logprob_entropy", triton=f"{_TRITON}.logprob:logprob_entropy"),
    _spec("logprob_shard_stats",
          "(logits, targets, *, temperature, vocab_start=0, vocab_size=None) -> ShardStats",
          torch_impl=f"{_LOGPROB}:logprob_shard_stats",
          triton=f"{_TRITON}.logprob:logprob_shard_stats", cpu=f"{_CPU_TRAIN}:logprob_shard_stats",
          # one pass over each row where torch takes ~8 ops (the policy's log-probs, training and no-grad passes)
          cpu_default=True, cpu_source="train_elementwise.cpp"),
    _spec("logprob_entropy_grad",
          "(logits, targets, grad_logprobs, grad_entropy, logsumexp, entropy, *, temperature,"
          " vocab_start=0, vocab_size=None) -> grad_logits",
          torch_impl=f"{_LOGPROB}:logprob_entropy_grad",
          triton=f"{_TRITON}.logprob:logprob_entropy_grad", cpu=f"{_CPU_TRAIN}:logprob_entropy_grad",
          cpu_default=True, cpu_source="train_elementwise.cpp"),
    _spec("greedy_argmax", "(logits [n, V]) -> [n] int64: each row's first maximum, torch.max(dim=-1)'s index",
          cpu=f"{_CPU}:greedy_argmax",
          # torch's CPU max over [64, 32k] logits takes ~0.85 ms, the C++ pass ~0.07 ms: a greedy step's pick
          cpu_default=True),
    _spec("inverse_cdf_sample",
          "(z [n, V] fp32, uniforms [n], *, logprobs=True) -> (tokens [n] int64, log-probs [n] | None): inverse-CDF "
          "draws of untruncated rows",
          cpu=f"{_CPU}:inverse_cdf_sample",
          # a sampled decode step's pick: a dozen small torch ops (~80-130 us at [128, 101]) against one C++ pass
          cpu_default=True),
    _spec("token_uniforms_at",
          "(base [n] uint64 ndarray, positions [n]) -> [n] float64 ndarray: the seeded uniforms of a batch of rows "
          "(inference/sampler.py), bit for bit", torch_impl="rl_engine.inference.sampler:token_uniforms_at",
          cpu=f"{_CPU}:token_uniforms_at",
          # host-side numbers (numpy arrays on every device; the engine resolves it for its device, so a CUDA engine
          # builds no CPU extension for it): a dozen numpy calls a seeded decode step against one C++ loop (in the
          # grpo rollout, 128 rows: the engine's _sample ~6 us a step shorter)
          cpu_default=True),
    _spec("seeded_inverse_cdf_sample",
          "(z [n, V] fp32, base [n] uint64 ndarray, positions [n], *, logprobs=True) -> (tokens [n] int64, log-probs "
          "[n] | None): inverse_cdf_sample with token_uniforms_at(base, positions)'s uniforms",
          torch_impl="rl_engine.inference.sampler:seeded_inverse_cdf_sample", cpu=f"{_CPU}:seeded_inverse_cdf_sample",
          # a seeded sampled decode step's draw and pick in one C++ call, not two (the grpo rollout: ~30 us a step)
          cpu_default=True),
    _spec("continue_decode_inputs",
          "(tokens, stopped, prev_positions, prev_tables, seqs, block_size, input_ids, positions, context_lens, "
          "slot_mapping, block_tables) -> (positions [n], block tables [n, w]): a persistent decode step's inputs "
          "from the last step's rows (inference/model_runner.py), the same arrays",
          torch_impl="rl_engine.inference.model_runner:continue_decode_inputs",
          cpu=f"{_CPU}:continue_decode_inputs",
          # host-side numpy arrays on every device (resolved for the runner's device: a CUDA engine builds no CPU
          # extension for it): ~25 numpy calls a continued decode step against one C++ pass
          cpu_default=True),
    _spec("moe_permute", "(hidden [T, H], topk_ids [T, k], num_experts) -> MoePermutation",
          triton=f"{_TRITON}.moe_permute:moe_permute"),
    _spec("moe_unpermute", "(expert_out [T*k, H], slot_to_row [T, k], topk_weights [T, k]) -> [T, H]",
          triton=f"{_TRITON}.moe_permute:moe_unpermute"),
    _spec("top_k_top_p_sampling",
          "(probs [B, V], top_k [B] int, top_p [B] float, *, generator=None) -> token ids [B] int64",
          flashinfer=f"{_FLASHINFER}:top_k_top_p_sampling",
          cuda_preference=("flashinfer", "torch"), invariant=None),  # multinomial draws per batch
    _spec("dense", "(x [..., K], weight [N, K], bias=None, *, residual=None) -> x weight^T + bias (+ residual): "
          "F.linear, reading a prepacked copy of weights an inference engine registered on CPU "
          "(kernels/cpu/packed_linear.py); bound by the policy's layers at build (`linear` is a module factory)",
          torch_impl="rl_engine.kernels.cpu.packed_linear:linear", invariant=f"{_INVARIANT}:linear"),
    _spec("linear", "module factory (in_features, out_features, *, bias, params_dtype, device, ...)",
          torch_impl="rl_engine.kernels.modules:make_linear",
          transformer_engine=f"{_TE}:make_te_linear",
          cuda_preference=("transformer_engine", "torch"), opt_in=frozenset({"transformer_engine"})),
    _spec("rms_norm_linear", "module factory (in_features, out_features, *, eps, bias, params_dtype, ...)",
          torch_impl="rl_engine.kernels.modules:make_rms_norm_linear",
          transformer_engine=f"{_TE}:make_te_rms_norm_linear",
          cuda_preference=("transformer_engine", "torch"), opt_in=frozenset({"transformer_engine"})),
)}


@dataclass(kw_only=True)
class KernelConfig:
    """Kernel choices of a run: `overrides` maps op name -> backend ("*" applies to every op that
    has that backend); `disabled_backends` are never picked by default (overrides still win)."""

    overrides: dict[str, str] = field(default_factory=dict)
    disabled_backends: tuple[str, ...] = ()
    batch_invariant: bool = False  # model.batch_invariant: every op's batch-invariant implementation

    def __post_init__(self) -> None:
        for backend in self.disabled_backends:
            _check_backend_name(backend)
        if "torch" in self.disabled_backends:
            raise ValueError("disabled_backends cannot contain 'torch': it is every op's fallback")
        for op, backend in self.overrides.items():
            _check_backend_name(backend)
            if op == "*":
                continue
            spec = _spec_or_raise(op)
            if backend not in spec.impls:
                raise ValueError(f"kernel override {op}={backend!r}: {op} has no {backend} implementation;"
                                 f" it has: {', '.join(spec.impls)}")


@dataclass(frozen=True)
class Resolution:
    """The outcome of resolving one op on one device type."""

    op: str
    device_type: str
    backend: str
    reason: str
    available: tuple[str, ...]
    unavailable: Mapping[str, str]  # backend -> why not
    fn: Callable[..., Any] = field(repr=False, compare=False)


def _check_backend_name(backend: str) -> None:
    if backend not in backends.BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; known backends: {', '.join(backends.BACKENDS)}")


def _spec_or_raise(op: str) -> OpSpec:
    if op not in OPS:
        near = difflib.get_close_matches(op, OPS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"unknown kernel op {op!r}{hint}; ops: {', '.join(OPS)}")
    return OPS[op]


def _dtype_sources_note(spec: OpSpec) -> str:
    """What the "cpu" implementation of `spec` runs for the dtypes another source serves (`cpu_dtype_sources`): that
    source's kernel, built at the first call of that dtype (not here: an fp32-only process never builds it, ~49 s
    uncached under load), or the torch reference where it does not build, the reason logged then."""
    return "".join(f"; {dtype}: C++ ({source}, built at the first {dtype} call; where it does not build, the torch "
                   "reference, the reason logged)" for dtype, source in spec.cpu_dtype_sources)


def _load(path: str) -> Callable[..., Any]:
    module_name, attribute = path.split(":")
    return getattr(importlib.import_module(module_name), attribute)


def _device_type(device: torch.device | str) -> str:
    return device.type if isinstance(device, torch.device) else torch.device(device).type


class KernelRegistry:
    """Resolves ops to implementations per device type, caching each resolution."""

    def __init__(self, config: KernelConfig | None = None) -> None:
        self._config = config or KernelConfig()
        self._cache: dict[tuple[str, str], Resolution] = {}

    @property
    def config(self) -> KernelConfig:
        return self._config

    def configure(self, config: KernelConfig) -> None:
        """Replace the kernel config; later resolutions follow it (already-built models keep theirs)."""
        self._config = config
        self.clear_cache()

    def clear_cache(self) -> None:
        self._cache.clear()

    def resolve(self, op: str, device: torch.device | str) -> Callable[..., Any]:
        """The implementation of `op` for tensors on `device`."""
        return self.resolution(op, device).fn

    def resolution(self, op: str, device: torch.device | str) -> Resolution:
        """Like `resolve`, with the chosen backend, the reason and the alternatives."""
        device_type = _device_type(device)
        key = (op, device_type)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        result = self._resolve_uncached(_spec_or_raise(op), device_type)
        logger.info("kernel %s on %s -> %s (%s)", op, device_type, result.backend, result.reason)
        self._cache[key] = result
        return result

    def cpu_kernel_requested(self, op: str) -> bool:
        """True when the C++ CPU kernel of `op` is asked for explicitly (`RL_ENGINE_CPU_KERNELS=1`, an
        override `op=cpu` or `*=cpu`), not only taken as the op's CPU default."""
        overrides = self._config.overrides
        return cpu_kernels.default_on() or "cpu" in (overrides.get(op), overrides.get("*"))

    def _resolve_uncached(self, spec: OpSpec, device_type: str) -> Resolution:
        overrides = self._config.overrides
        override = overrides.get(spec.name)
        # the C++ CPU kernels compile on first use: probe them only when they could be chosen
        want_cpu = device_type == "cpu" and not self._config.batch_invariant and (
            spec.cpu_default or self.cpu_kernel_requested(spec.name))
        statuses = {b: backends.backend_status(b, device_type, cpu_source=spec.cpu_source)
                    if b != "cpu" or want_cpu else backends.BackendStatus(False, f"C++ CPU kernels are opt-in ({cpu_kernels.ENV_SWITCH}=1 or an "
                                                  f"override {spec.name}=cpu)") for b in spec.impls}
        available = tuple(b for b, s in statuses.items() if s.available)
        unavailable = {b: s.reason for b, s in statuses.items() if not s.available}
        if self._config.batch_invariant:
            wildcard = overrides.get("*") if overrides.get("*") in spec.impls else None
            return self._resolve_invariant(spec, device_type, override or wildcard, available, unavailable)
        source = f"override {spec.name}={override}"
        if override is None and overrides.get("*") in spec.impls:
            override = overrides["*"]
            source = f"override *={override}"
        if override is not None:
            if override not in spec.impls:
                raise ValueError(f"kernel override {spec.name}={override!r}: {spec.name} has no {override}"
                                 f" implementation; it has: {', '.join(spec.impls)}")
            if override not in available:
                raise ValueError(
                    f"kernel override {spec.name}={override!r} cannot run on {device_type}:"
                    f" {unavailable[override]}; available for {spec.name} on {device_type}:"
                    f" {', '.join(available)}")
            backend, reason = override, source
        elif device_type == "cpu":
            backend, reason = self._default_cpu(spec, statuses)
        elif device_type != "cuda":
            backend, reason = "torch", f"torch reference is the default on {device_type}"
        else:
            backend, reason = self._default_cuda(spec, statuses)
        if backend == "cpu":
            reason += _dtype_sources_note(spec)
        return Resolution(op=spec.name, device_type=device_type, backend=backend, reason=reason,
                          available=available, unavailable=unavailable, fn=_load(spec.impls[backend]))

    def _resolve_invariant(self, spec: OpSpec, device_type: str, override: str | None,
                           available: tuple[str, ...], unavailable: Mapping[str, str]) -> Resolution:
        if spec.invariant is None:
            raise ValueError(f"kernel op {spec.name} has no batch-invariant implementation; "
                             "model.batch_invariant=true cannot use it (turn model.batch_invariant off)")
        if override not in (None, "torch"):
            raise ValueError(f"kernel override {spec.name}={override!r} has no batch-invariant implementation;"
                             f" under model.batch_invariant=true {spec.name} runs its batch-invariant torch"
                             " implementation: drop the override or turn model.batch_invariant off")
        return Resolution(op=spec.name, device_type=device_type, backend="torch",
                          reason="batch-invariant implementation (model.batch_invariant)",
                          available=available, unavailable=unavailable, fn=_load(spec.invariant))

    def _default_cpu(self, spec: OpSpec, statuses: Mapping[str, backends.BackendStatus]) -> tuple[str, str]:
        if "cpu" not in spec.impls:
            return "torch", "torch reference is the default on cpu (no C++ kernel for this op)"
        if not (cpu_kernels.default_on() or spec.cpu_default):
            return "torch", f"torch reference is the default on cpu (C++ kernel opt-in: {cpu_kernels.ENV_SWITCH}=1)"
        if "cpu" in self._config.disabled_backends:
            return "torch", "torch reference: the C++ CPU kernels are disabled by config"
        if not statuses["cpu"].available:
            return "torch", f"torch reference: C++ CPU kernels unavailable ({statuses['cpu'].reason})"
        if cpu_kernels.default_on():
            return "cpu", f"C++ CPU kernel ({cpu_kernels.ENV_SWITCH}=1)"
        return "cpu", f"C++ CPU kernel, the CPU default for this op ({cpu_kernels.ENV_SWITCH}=0 turns it off)"

    def _default_cuda(self, spec: OpSpec, statuses: Mapping[str, backends.BackendStatus]) -> tuple[str, str]:
        skipped: list[str] = []
        for backend in spec.cuda_preference:
            if backend in spec.opt_in:
                skipped.append(f"{backend} is opt-in")
            elif backend in self._config.disabled_backends:
                skipped.append(f"{backend} disabled by config")
            elif not statuses[backend].available:
                skipped.append(f"{backend}: {statuses[backend].reason}")
            else:
                reason = f"first available in preference {'>'.join(spec.cuda_preference)}"
                return backend, reason + (f" ({'; '.join(skipped)})" if skipped else "")
        raise AssertionError(f"torch must always be available for {spec.name}")

    def describe(self, device: torch.device | str | None = None) -> list[Resolution]:
        """Resolutions of every op on `device` (default: cuda when present, else cpu)."""
        if device is None:
            device = "cuda" if backends.cuda_available() else "cpu"
        return [self.resolution(op, device) for op in OPS]


_default_registry = KernelRegistry()


def default_registry() -> KernelRegistry:
    """The process's registry, used by `rl_engine.kernels.<op>` and `resolve`."""
    return _default_registry


def resolve(op: str, device: torch.device | str) -> Callable[..., Any]:
    """The implementation of `op` for tensors on `device` (resolved once, then cached)."""
    return _default_registry.resolve(op, device)


def cpu_kernel_requested(op: str) -> bool:
    """`KernelRegistry.cpu_kernel_requested` of the process's registry."""
    return _default_registry.cpu_kernel_requested(op)


def set_backend_overrides(overrides: Mapping[str, str]) -> None:
    """Force backends per op, e.g. `{"rms_norm": "triton"}`; replaces earlier overrides."""
    config = _default_registry.config
    _default_registry.configure(KernelConfig(overrides=dict(overrides),
                                             disabled_backends=config.disabled_backends,
                                             batch_invariant=config.batch_invariant))


def set_batch_invariant(enabled: bool) -> bool:
    """Turn the process registry's batch-invariant mode on or off (the run's `model.batch_invariant`,
    applied before its models are built); overrides are kept. Returns the previous setting."""
    config = _default_registry.config
    if config.batch_invariant != enabled:
        _default_registry.configure(KernelConfig(overrides=dict(config.overrides),
                                                 disabled_backends=config.disabled_backends,
                                                 batch_invariant=enabled))
    return config.batch_invariant


def configure(config: KernelConfig) -> None:
    """Apply a run's `KernelConfig` to the process registry."""
    _default_registry.configure(config)


def clear_cache() -> None:
    """Forget cached resolutions (after the backend probes changed, e.g. in tests)."""
    _default_registry.clear_cache()


def describe(device: torch.device | str | None = None) -> list[Resolution]:
    """Per op: chosen backend, reason, and available/unavailable backends."""
    return _default_registry.describe(device)


def format_backends_table(device: torch.device | str | None = None) -> str:
    """The table `rl-engine env` prints: op, chosen backend, reason, other backends."""
    resolutions = describe(device)
    rows = [("op", "backend", "reason", "available", "unavailable")]
    for r in resolutions:
        unavailable = "; ".join(f"{b}: {why}" for b, why in r.unavailable.items()) or "-"
        rows.append((r.op, r.backend, r.reason, ",".join(r.available), unavailable))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"kernel backends on {resolutions[0].device_type}:"]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4])
    return "\n".join(lines)
