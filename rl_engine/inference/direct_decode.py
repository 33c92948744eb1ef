"""The eager CPU decode step's forward as direct calls of its C++ kernels (`DirectDecode`).

An eager decode step (`DecodeRunner.run` without `compile_decode`) runs the model's `hidden_states`: per layer
~15 Python calls of modules, registry wrappers and their checks around 9 C++ kernels (RMSNorm, the small-M GEMM
linears on their packed panels, the fused rotary + KV write, the paged decode attention, SwiGLU), each wrapper
deciding again what the step's shapes and dtypes already decided. `DirectDecode` runs the same kernels on the
same arguments in the same order, two through entry points of their own (`rms_norm_out`: `rms_norm_forward`'s row
loop, its output alone; `rotary_kv_write_qkv`: the fused projection's q / k / v views made in C++, then
`rotary_kv_write`, each token's cos / sin row read there from the whole rotary table by its position: the rows
`model._rope` gathers), so the same bits (tests/inference/test_direct_decode.py compares tokens and log-probs bit
for bit). On the ~3.5M model of `benchmarks/generate.py` at batch 64 (1 thread) that was ~0.5 ms of a ~7.5 ms decode
step (the whole run 2-5% shorter in four in-process A/Bs). Since session 27 the layers' loop is one C++ call,
`decode_layers` (csrc/cpu_ops.cpp: the same calls in the same order, the small-M GEMM's linear and the RMSNorm /
SwiGLU entry points of their own extensions called by address): Python between the ~37 calls had cost ~0.2 ms of the
~3.7 ms batch-64 step there, its glue running on caches the kernels had just left cold (an in-process A/B, the two
alternated 6 times each, load ~1, the Intel Xeon with AMX: the run's decode steps 491.6 -> 459.7 ms median, the
whole run 729.6 -> 696.7 ms; the same tokens). Python keeps the per-step checks: each linear's packed copy current
(`_weight`), the hooks and modules (`usable`).

It is built only for the model and engine that the kernels serve exactly: fp32 on CPU, every linear packed as the
small-M GEMM's panels, the registry's default CPU RMSNorm / SwiGLU / dense ops, the fused rotary + KV write and the
C++ decode kernel, one rank (no tensor, sequence or pipeline parallelism), dense MLPs, no MLA, no qk-norm, no
batch_invariant (`DirectDecode.build` says why not, logged once). Every bucket runs it (one row's linears by the
C++ gemv, as `packed_linear.linear` takes them; since session 25, where batch 1's module forward was ~0.5 ms of
Python a ~1.6 ms step on the ~3.5M model), and a step only where the attention calls its kernels directly too
(`PagedAttention.direct_decode`, no decode observer), nothing is recorded (no routing) and no module forward hook
is registered (a hooked model's steps run its forward, so the hooks see them).
Weights are read from the modules at every step (from their `_parameters` dicts, which a parameter assigned anew
updates in place; a module replaced since the build makes the steps run the model's forward), through their packed
copies (`packed_linear`: repacked when updated in place); a weight without a packed copy, or a call a kernel refuses
(its TORCH_CHECK), makes the step run the model's own forward instead (which writes the same K/V again, and names
the problem).
"""

from __future__ import annotations

import logging

import torch
from torch.nn.modules import module as _module

from rl_engine.inference.attention import PagedAttention
from rl_engine.kernels.cpu import engine_elementwise, ops as cpu_ops, packed_linear, train_elementwise
from rl_engine.kernels.cpu.packed_linear import _ATTR
from rl_engine.kernels.cpu.small_gemm import MIN_MACS_PER_THREAD, PANEL, ROW_BLOCK
from rl_engine.kernels.grad_mode import training_kernels

logger = logging.getLogger(__name__)


class _NotPacked(Exception):
    """A linear's weight has no packed copy (replaced by a new tensor since the engine registered it)."""


def _weight(params: dict, one_row: bool) -> torch.Tensor:
    """What a direct step's linear reads of its parameters, as `packed_linear.linear` would: the weight itself for one
    row (the C++ gemv), else its small-M GEMM panels (`_Packed.current`: repacked when stale)."""
    w = params.get("weight")
    entry = getattr(w, _ATTR, None)
    if entry is None or packed_linear._small is None:
        raise _NotPacked
    return w if one_row else entry.current(w, True)


class DirectDecode:
    """`model.hidden_states` of an eager decode step, through the C++ kernels directly (see the module doc)."""

    def __init__(self, model, attn: PagedAttention) -> None:
        self.model = model
        self.attn = attn
        self._kernel = train_elementwise.kernel()  # RMSNorm and SwiGLU forwards (engine_elementwise's fp32 kernels)
        # the forward hook and pre-hook dicts of the model's modules, whose hooks a step would skip (`usable`):
        # `register_forward_hook` / `_pre_hook` and the handles' `remove` change them in place
        self._hook_dicts = tuple(d for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks))
        # every module's place in the tree it was built for (parent's `_modules`, name): a module replaced since
        # (a wrapped or swapped linear) makes the steps run the model's forward (`usable`), which reads the new one
        self._tree = tuple((m._modules, name) for m in model.modules() for name in m._modules)
        self._children = [d[name] for d, name in self._tree]
        # per layer: its modules' parameter dicts (a parameter assigned anew replaces its entry in place, so each
        # step reads the module's current weights): the norms', qkv, o, the norm's after attention, gate/up, down
        self._layers = tuple(
            (layer.input_layernorm._parameters, layer.self_attn.qkv_proj._parameters,
             layer.self_attn.o_proj._parameters, layer.post_attention_layernorm._parameters,
             layer.mlp.gate_up_proj._parameters, layer.mlp.down_proj._parameters)
            for layer in model.layers)
        self._embed, self._norm = model.embed_tokens._parameters, model.norm._parameters  # (as the layers' dicts)
        self._fallback_logged = False
        # the C++ entry points of the other extensions that cpu_ops' decode_layers calls (see `hidden_states`)
        self._entry_points = [packed_linear._small.linear_address(), *self._kernel.decode_addresses()]
        self._empty = torch.empty(0)  # (an absent bias)
        # decode_layers' per-layer shapes (q heads, kv heads, the four linears' output features) and constants (the
        # norms' eps, the attention's scale)
        self._dims = [n for layer in model.layers for n in (
            layer.self_attn.num_heads, layer.self_attn.num_kv_heads, layer.self_attn.qkv_proj.weight.shape[0],
            layer.self_attn.o_proj.weight.shape[0], layer.mlp.gate_up_proj.weight.shape[0],
            layer.mlp.down_proj.weight.shape[0])]
        self._consts = [c for layer in model.layers for c in (
            layer.input_layernorm.eps, layer.post_attention_layernorm.eps, layer.self_attn.scale)]

    @classmethod
    def build(cls, model, attn, *, packed: list[torch.Tensor]) -> tuple[DirectDecode | None, str]:
        """(the direct forward, "") for a model and attention it serves exactly, else (None, why not)."""
        cfg = model.config
        if not isinstance(attn, PagedAttention) or attn.rotary_kv_write is not cpu_ops.rotary_kv_write \
                or not attn.cpu_decode:
            return None, "the attention does not run the C++ rotary + KV write and decode kernels"
        if model.batch_invariant or cfg.is_moe or cfg.is_mla or cfg.qk_norm:
            return None, "batch_invariant, MoE, MLA and qk-norm models run the model's forward"
        g = model.groups
        if g.tp_size != 1 or g.sequence_parallel or not (model.is_first_stage and model.is_last_stage):
            return None, "a parallel model runs the model's forward"
        if model.dtype != torch.float32 or packed_linear._small is None or train_elementwise.kernel() is None:
            return None, "fp32 with the small-M GEMM and the C++ RMSNorm / SwiGLU only"
        registered = {id(w) for w in packed}
        for layer in model.layers:
            a, mlp = layer.self_attn, layer.mlp
            linears = (a.qkv_proj, a.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if any(id(m.weight) not in registered or m._dense is not packed_linear.linear for m in linears):
                return None, "a linear that is not packed or not the registry's packed dense"
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            if any(m._parameters.get("weight") is not m.weight
                   or m._parameters.get("bias") is not getattr(m, "bias", None) for m in linears + norms):
                return None, "a weight or bias that is not its module's parameter"
            if a.o_proj.bias is not None or mlp.down_proj.bias is not None:
                return None, "a bias on a residual linear"
            if any(n._rms_norm is not engine_elementwise.rms_norm for n in norms) \
                    or mlp._silu_and_mul is not engine_elementwise.silu_and_mul:
                return None, "RMSNorm or SwiGLU resolved to another backend"
        if model.norm._rms_norm is not engine_elementwise.rms_norm:
            return None, "RMSNorm resolved to another backend"
        return cls(model, attn), ""

    def usable(self, routing) -> bool:
        """This step may run it: the attention calls its kernels directly (a decode step, no observer), no routing
        is recorded, inside the runner's packed reading under inference mode, outside the trainer's forwards, and no
        forward hook or pre-hook is registered on the model's modules or globally (the direct calls run no module's
        `forward`, so such a step runs the model's forward and its hooks see it), and every module is the one it was
        built for (a replaced module's weights and hooks are the model forward's to read)."""
        attn = self.attn
        return (routing is None and attn.direct_decode and attn.decode_observer is None
                and torch.is_inference_mode_enabled() and packed_linear._reading()
                and not training_kernels() and not self._hooked()
                and [d.get(name) for d, name in self._tree] == self._children)  # (modules compare by identity)

    def _hooked(self) -> bool:
        return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks or any(self._hook_dicts))

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """The final hidden states [T, H], or None when a weight has no packed copy or a kernel refused a call
        (the caller runs the model's forward)."""
        model, attn = self.model, self.attn
        slots, tables, max_context = attn.slot_mapping, attn.decode_tables, attn.max_context_len
        T = input_ids.shape[0]
        if T != attn.num_single:  # the decode kernel reads `T` rows of the tables `prepare` made (it checks not)
            return None

        try:
            one_row = T == 1 and packed_linear._gemv is not None  # (`packed_linear._one_row`'s test for the gemv)
            tensors = []
            empty = self._empty
            for i, (norm_p, qkv_p, o_p, post_p, gate_up_p, down_p) in enumerate(self._layers):
                qkv_b, gate_up_b = qkv_p.get("bias"), gate_up_p.get("bias")
                tensors += (norm_p["weight"], _weight(qkv_p, one_row), empty if qkv_b is None else qkv_b,
                            _weight(o_p, one_row), post_p["weight"], _weight(gate_up_p, one_row),
                            empty if gate_up_b is None else gate_up_b, _weight(down_p, one_row),
                            attn.k_caches[i], attn.v_caches[i])
            cos, sin = model.rotary.half_width_table(positions.device, model.inv_freq)  # (rows read in C++)
            return cpu_ops.extension().decode_layers(
                self._entry_points, input_ids, self._embed["weight"], tensors, self._dims, self._consts, cos, sin,
                slots, positions, *tables, max_context, self._norm["weight"], model.norm.eps, one_row, PANEL,
                ROW_BLOCK, MIN_MACS_PER_THREAD)
        except (_NotPacked, RuntimeError) as e:
            if not self._fallback_logged:  # (a step that falls back costs up to two forwards: say it once)
                self._fallback_logged = True
                why = ("a weight without a packed copy" if isinstance(e, _NotPacked)
                       else str(e).partition("\n")[0] or type(e).__name__)
                logger.info("an eager decode step ran the model's forward after its direct calls stopped: %s", why)
            return None
