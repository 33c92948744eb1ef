"""`train.compile`: the training forward's decoder layers compiled by torch.compile (torchtitan's
`apply_compile`: each block compiled on its own, applied from outside the model).

A layer runs as two compiled halves around its attention: (input norm, qkv projection, rotary) and
(output projection + residual, post-attention norm, SwiGLU MLP + residual). Inductor fuses each half's
elementwise chain (norms, rotary, SiLU-and-multiply, residual adds) in forward and backward; the
matmuls stay oneDNN/BLAS calls. The attention between them stays eager: its packed variable-length
and shared-prefix layouts are Python over `cu_seqlens` (per-sequence calls, masks built per
micro-batch). Both halves are traced once for all layers (their parameters are graph inputs) with a
dynamic token count (`maybe_mark_dynamic` on dim 0), so packed micro-batches of any size reuse them;
the first training step pays the compile.

Only forwards that autograd records take the compiled halves (`DecoderLayer.forward`): the same
layers serve the inference engine, and the no-grad log-prob passes stay eager. Dense attention
decoders at tensor-parallel size 1 only (`apply_compile` refuses the rest). Verified on CPU; on CUDA
inductor would emit Triton kernels, not run here.
"""

from __future__ import annotations

import functools

import torch

from rl_engine.policy.layers import select_rows
from rl_engine.policy.model import Attention, CausalLM, DecoderLayer


def apply_compile(model: CausalLM) -> None:
    """Give every decoder layer of `model` its compiled training forward."""
    if model.groups.tp_size > 1:
        raise ValueError(f"train.compile=true needs tensor_parallel_size 1 (got {model.groups.tp_size}): the "
                         "compiled layers would hold the tensor-parallel collectives; set train.compile=false")
    if model.batch_invariant:
        raise ValueError("train.compile=true with model.batch_invariant=true is not supported: the batch-invariant "
                         "ops are checked outside compiled graphs; set train.compile=false")
    for layer in model.layers:
        if not isinstance(layer.self_attn, Attention) or layer.is_moe:
            kind = "an MoE block" if layer.is_moe else "multi-head latent attention"
            raise ValueError(f"train.compile=true compiles dense attention decoder layers; layer {layer.layer_idx} "
                             f"has {kind}: set train.compile=false")
        layer.compiled_forward = compiled_layer_forward


def compiled_layer_forward(layer: DecoderLayer, x: torch.Tensor, rotary, rope, cu_seqlens,
                           attn_context, *, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
    """`DecoderLayer.forward` of a dense layer with its two attention-free halves compiled."""
    for t in (x, *rope):
        torch._dynamo.maybe_mark_dynamic(t, 0)  # [T, ...]: one graph for every micro-batch size
    q, k, v = _compiled(_attention_inputs)(layer, x, rotary, rope)
    o = layer.self_attn.attend(q, k, v, cu_seqlens=cu_seqlens, attn_context=attn_context)
    if rows is not None:  # (DecoderLayer.forward's `rows`)
        o, x = select_rows(o, rows), select_rows(x, rows)
        torch._dynamo.maybe_mark_dynamic(x, 0)
    torch._dynamo.maybe_mark_dynamic(o, 0)
    return _compiled(_output_and_mlp)(layer, o, x)


def _attention_inputs(layer: DecoderLayer, x: torch.Tensor, rotary, rope):
    return layer.self_attn.project(layer.input_layernorm(x), rotary, rope)


def _output_and_mlp(layer: DecoderLayer, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    x = layer.self_attn.o_proj(o.reshape(o.shape[0], -1), x)
    return layer.mlp(layer.post_attention_layernorm(x), x)


@functools.cache
def _compiled(fn):
    """One torch.compile wrapper per half, shared by every layer and model of the process."""
    return torch.compile(fn)  # (dynamic=False would ignore maybe_mark_dynamic)
