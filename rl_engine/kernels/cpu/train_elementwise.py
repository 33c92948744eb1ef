"""The training forward's RMSNorm, SwiGLU and rotary on CPU (`csrc/train_elementwise.cpp`): forward and backward.

The registry's "cpu" implementations of `rms_norm_train`, `silu_and_mul_train` (the policy's norms and MLP when
autograd records the forward), `rotary_full` (the policy's rotate-half rotary on full-width tables) and
`logprob_shard_stats` / `logprob_entropy_grad` (the per-chunk softmax statistics and logits gradient of the
policy's log-probs and entropy, `kernels/logprob.py`'s contract; exp is fast_exp's, within ~2 ulp), and
`adamw_step`: torch.optim.AdamW's step in one call, with its bits (the trainer's `MasterWeightsAdamW`). In torch
each is a handful of elementwise ops forward and as many backward, each a pass over the activations with its own
dispatch and allocation; at a small model's widths those passes are the cost. Here each direction is one C++ pass
over rows, wrapped in an autograd Function (`once_differentiable`: a double backward is refused, not silently
wrong).

fp32 CPU tensors only: other dtypes, other devices and traced calls (torch.compile) run the torch reference, as
does every call when the extension cannot be built (no compiler, a failed build, `RL_ENGINE_CPU_KERNELS=0`; the
reason is logged once). The trainer's no-grad passes (proximal, reference, teacher log-probs) run these kernels
too (`kernels.grad_mode.trainer_pass`), so they give its recorded pass's values bit for bit; the engine's forwards
take the `rms_norm` / `silu_and_mul` ops. Numerics (tests/kernels/test_cpu_train_elementwise.py): RMSNorm within
a few ulp of the reference (another summation order), SwiGLU within fast_exp's ~2 ulp, rotary bit-equal forward and
backward.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from rl_engine.kernels import cpu, logprob, reference
from rl_engine.kernels.grad_mode import records_autograd


logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "train_elementwise.cpp"


kernel = cpu.source_kernel(SOURCE, "training RMSNorm / SwiGLU / rotary / log-prob stats")


def _takes(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels run these inputs (else the torch reference)."""
    return (all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu") for t in tensors)
            and not torch.compiler.is_compiling() and kernel() is not None)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last dim] with the last dim contiguous (a view where the strides allow): the row layout the
    kernels take (any row stride; `engine_elementwise` passes its fp32 inputs the same way)."""
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, residual):
        shape = x.shape
        out, total, rstd = kernel().rms_norm_forward(as_rows(x), weight.contiguous(), eps,
                                                     None if residual is None else as_rows(residual))
        h = total if residual is not None else as_rows(x)
        ctx.save_for_backward(h, weight, rstd)
        ctx.has_residual = residual is not None
        if residual is None:
            return out.view(shape), None
        return out.view(shape), total.view(shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_sum):
        h, weight, rstd = ctx.saved_tensors
        grad_sum_rows = None if grad_sum is None or not ctx.has_residual else as_rows(grad_sum)
        dh, dw = kernel().rms_norm_backward(as_rows(grad_out), h, weight.contiguous(), rstd, grad_sum_rows)
        dh = dh.view(grad_out.shape)
        return dh, dw.view(weight.shape), None, (dh if ctx.has_residual else None)


class _SiluAndMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, overwrite_input):
        x2 = as_rows(x)
        ctx.save_for_backward(x2)
        ctx.shape = x.shape
        ctx.overwrite, ctx.overwritten = overwrite_input, False
        return kernel().silu_and_mul_forward(x2).view(*x.shape[:-1], x.shape[-1] // 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (x2,) = ctx.saved_tensors
        if ctx.overwritten:
            raise RuntimeError("silu_and_mul(overwrite_input=True): a second backward through it (retain_graph), but "
                               "the first wrote its gradient over the saved input; call it with "
                               "overwrite_input=False to backward through it more than once")
        ctx.overwritten = ctx.overwrite
        return kernel().silu_and_mul_backward(as_rows(grad_out), x2, ctx.overwrite).view(ctx.shape), None


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return kernel().rotary(x, cos, sin, False)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        cos, sin = ctx.saved_tensors
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        return kernel().rotary(grad_out, cos, sin, True), None, None


class _RotaryQKV(torch.autograd.Function):
    """q and k rotated out of the fused projection's output qkv [T, (Hq + 2 Hkv) D], and v as a view of it. The
    backward writes d qkv's three parts in place (rotary's backward of d q and of d k, then d v), where split,
    rotary and split concatenate the parts twice (two copies of the gradient a layer)."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, q_heads, kv_heads):
        T, D = qkv.shape[0], cos.shape[-1]
        qk_width = (q_heads + kv_heads) * D
        rotated = kernel().rotary(qkv[:, :qk_width].view(T, q_heads + kv_heads, D), cos, sin, False)
        ctx.save_for_backward(cos, sin)
        ctx.heads = (q_heads, kv_heads)
        q, k = rotated.split([q_heads, kv_heads], dim=1)
        return q, k, qkv[:, qk_width:].view(T, kv_heads, D)

    @staticmethod
    @once_differentiable
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        (q_heads, kv_heads), T, D = ctx.heads, cos.shape[0], cos.shape[1]
        dqkv = torch.empty(T, (q_heads + 2 * kv_heads) * D, dtype=cos.dtype)
        parts = dqkv.view(T, q_heads + 2 * kv_heads, D).split([q_heads, kv_heads, kv_heads], dim=1)
        for grad, part, rotate in zip((dq, dk, dv), parts, (True, True, False)):
            if grad is None:
                part.zero_()
            elif rotate:
                kernel().rotary_into(grad if grad.stride(-1) == 1 else grad.contiguous(), cos, sin, True, part)
            else:
                part.copy_(grad)
        return dqkv, None, None, None, None


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, q_heads: int,
               kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) of the fused projection's output qkv [T, (q_heads + 2 kv_heads) head_dim]: q and k rotated as
    `rotary_full` rotates them ([T, 1, head_dim] cos and sin), v a view; the same values and gradients as splitting
    qkv, `rotary_full` of q and k together and splitting them (what it runs where the kernel does not apply), the
    backward writing qkv's gradient in one buffer."""
    T, D = qkv.shape[0], cos.shape[-1]
    qk, v = qkv.split([(q_heads + kv_heads) * D, kv_heads * D], dim=1)
    if not (_takes(qkv, cos, sin) and records_autograd(qkv) and qkv.dim() == 2 and qkv.stride(-1) == 1
            and cos.shape == (T, 1, D) and sin.shape == cos.shape and D % 2 == 0):
        q, k = rotary_full(qk.view(T, q_heads + kv_heads, D), cos, sin).split([q_heads, kv_heads], dim=1)
        return q, k, v.view(T, kv_heads, D)
    cos, sin = (t[:, 0] if t[:, 0].stride(-1) == 1 else t[:, 0].contiguous() for t in (cos, sin))
    return _RotaryQKV.apply(qkv, cos, sin, q_heads, kv_heads)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`reference.rms_norm`'s contract, differentiable in x, weight and residual."""
    if not _takes(x, weight, residual):
        return reference.rms_norm(x, weight, eps, residual)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight must be [{x.shape[-1]}] (x's last dim), got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual shape {tuple(residual.shape)} must equal x's {tuple(x.shape)}")
    return _RMSNorm.apply(x, weight, float(eps), residual)


def silu_and_mul(x: torch.Tensor, *, overwrite_input: bool = False) -> torch.Tensor:
    """`reference.silu_and_mul`'s contract, differentiable. `overwrite_input`: the backward writes x's gradient
    over x's own buffer instead of a fresh one (SwiGLUMLP's gate_up output, which nothing else reads; the fresh
    buffer's memory traffic: a cold [7504, 384] backward at 2 threads 0.96 -> 0.73 ms); x then holds its gradient,
    and a second backward through the call (retain_graph) is refused."""
    if not _takes(x):
        return reference.silu_and_mul(x)
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: the last dim ({x.shape[-1]}) must be even ([gate | up])")
    return _SiluAndMul.apply(x, overwrite_input)


def rotary_full(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`reference.rotary_full`'s contract, differentiable in x (bit-equal to the reference, forward and backward)."""
    if not (_takes(x, cos, sin) and x.dim() == 3 and cos.dim() == 3 and cos.shape[1] == 1 and sin.shape == cos.shape):
        return reference.rotary_full(x, cos, sin)
    T, _, D = x.shape
    if cos.shape != (T, 1, D):
        raise ValueError(f"rotary_full: cos and sin must be [{T}, 1, {D}] (x's tokens and head_dim), "
                         f"got {tuple(cos.shape)}")
    if D % 2:
        raise ValueError(f"rotary_full: head_dim ({D}) must be even")
    x = x if x.stride(-1) == 1 else x.contiguous()
    cos, sin = cos[:, 0], sin[:, 0]
    cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
    if records_autograd(x):
        return _Rotary.apply(x, cos, sin)
    return kernel().rotary(x, cos, sin, False)


def _stats_args(logits: torch.Tensor, targets: torch.Tensor, temperature: float, vocab_start: int,
                vocab_size: int | None) -> tuple:
    logprob._check(logits, targets, temperature)
    n_valid = logprob.num_valid_columns(logits.shape[1], vocab_start, vocab_size)
    return as_rows(logits), targets.to(torch.int64).contiguous(), float(temperature), int(vocab_start), n_valid


def logprob_shard_stats(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float, vocab_start: int = 0,
                        vocab_size: int | None = None) -> logprob.ShardStats:
    """`kernels.logprob.logprob_shard_stats`'s contract (not differentiable: the autograd Functions of
    `kernels.logprob` and `policy.logprobs` call it in their forward) in one pass over each row."""
    if not _takes(logits) or records_autograd(logits):
        return logprob.logprob_shard_stats(logits, targets, temperature=temperature, vocab_start=vocab_start,
                                           vocab_size=vocab_size)
    return logprob.ShardStats(*kernel().logprob_stats(*_stats_args(logits, targets, temperature, vocab_start,
                                                                   vocab_size)))


def logprob_entropy_grad(logits: torch.Tensor, targets: torch.Tensor, grad_logprobs: torch.Tensor,
                         grad_entropy: torch.Tensor, logsumexp: torch.Tensor, entropy: torch.Tensor, *,
                         temperature: float, vocab_start: int = 0, vocab_size: int | None = None) -> torch.Tensor:
    """`kernels.logprob.logprob_entropy_grad`'s contract in one pass over each row."""
    if not _takes(logits, grad_logprobs, grad_entropy, logsumexp, entropy):
        return logprob.logprob_entropy_grad(logits, targets, grad_logprobs, grad_entropy, logsumexp, entropy,
                                            temperature=temperature, vocab_start=vocab_start, vocab_size=vocab_size)
    rows, targets, temperature, vocab_start, n_valid = _stats_args(logits, targets, temperature, vocab_start,
                                                                   vocab_size)
    per_token = (t.detach().float().contiguous() for t in (grad_logprobs, grad_entropy, logsumexp, entropy))
    return kernel().logprob_grad(rows, targets, *per_token, temperature, vocab_start, n_valid)


def adamw_step(optimizer: torch.optim.AdamW) -> bool:
    """`optimizer.step()` (a `torch.optim.AdamW` on its single-tensor path: `foreach` and `fused` unset or False, no
    amsgrad / maximize / capturable / differentiable, float hyper-parameters, no step hooks) in one C++ call over its
    parameters, with the same bits in its parameters and state as its own step gives (the kernel's comment, and
    tests/kernels/test_cpu_train_elementwise.py): its six ATen calls a parameter, each a pass with its dispatch, are
    most of an optimizer step at a small model's sizes (the `tiny` preset's 16 parameters: ~0.6 ms). Returns False,
    having done nothing, where it does not apply (another configuration, a parameter or gradient not a dense
    contiguous fp32 CPU tensor, a state not made yet: torch's first step makes it, no kernel, or a torch build whose
    kernels round otherwise: `_adamw_matches_torch`); the caller then runs `optimizer.step()`."""
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

    if (type(optimizer) is not torch.optim.AdamW or optimizer._optimizer_step_pre_hooks
            or optimizer._optimizer_step_post_hooks or _global_optimizer_pre_hooks or _global_optimizer_post_hooks
            or torch.compiler.is_compiling()):
        return False
    calls = []
    for group in optimizer.param_groups:
        if (any(group.get(k) for k in ("amsgrad", "maximize", "capturable", "differentiable", "foreach", "fused"))
                or not group.get("decoupled_weight_decay", True)):  # (.get: a group loaded from an older torch)
            return False
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if not all(type(x) is float for x in (lr, beta1, beta2, eps)) or type(wd) not in (float, int):
            return False
        lists = ([], [], [], [], [])
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            state = optimizer.state.get(p)
            if not state or not _dense_fp32(p, g, state["exp_avg"], state["exp_avg_sq"]) or g.shape != p.shape:
                return False
            step = state["step"]
            if step.dtype != torch.float32 or step.device.type != "cpu" or step.numel() != 1:
                return False
            for out, t in zip(lists, (p, g, state["exp_avg"], state["exp_avg_sq"], step)):
                out.append(t)
        calls.append((lists, lr, beta1, beta2, eps, float(wd)))
    if kernel() is None or not _adamw_matches_torch():  # (asked last: parameters on another device never build it)
        return False
    for (params, grads, exp_avgs, exp_avg_sqs, steps), lr, beta1, beta2, eps, wd in calls:
        if params:
            kernel().adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, wd)
    return True


@functools.cache
def _adamw_matches_torch() -> bool:
    """Whether the kernel gives this process's torch.optim.AdamW bits (checked once, on a few steps of odd-sized
    parameters): its two fused multiply-adds are those ATen's vectorised lerp and addcmul make in the x86 builds it was
    written against; a torch build or CPU dispatch that rounds them apart would differ in the last bits, so the step is
    then left to torch (logged)."""
    g = torch.Generator().manual_seed(0)
    ref = [torch.randn(n, generator=g) for n in (1, 19, 100)]
    mine = [p.clone() for p in ref]
    opts = [torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1) for ps in (ref, mine)]
    for step in range(4):
        for a, b in zip(ref, mine):
            a.grad = torch.randn(a.shape, generator=g) * 10.0 ** -step
            b.grad = a.grad.clone()
        opts[0].step()
        if step == 0:
            opts[1].step()
        else:
            st = [opts[1].state[p] for p in mine]
            kernel().adamw_step(mine, [p.grad for p in mine], [s["exp_avg"] for s in st],
                                [s["exp_avg_sq"] for s in st], [s["step"] for s in st], 1e-2, 0.9, 0.999, 1e-8, 0.1)
    same = all(torch.equal(a, b) for a, b in zip(ref, mine))
    if not same:
        logger.warning("AdamW: the C++ step's bits differ from this torch build's; torch.optim.AdamW steps")
    return same


def _dense_fp32(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.layout == torch.strided
               and t.is_contiguous() for t in tensors)
