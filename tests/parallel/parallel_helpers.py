"""Shared pieces of the multi-process tests: tiny models written as HF checkpoints, deterministic
packed micro-batches, a loss normalised by global counts, the layout runner used in workers, and the
parity harness: `run_parity` trains the single-process references and spawns the layouts,
`check_layout` holds a layout to its reference (`assert_matches_single`), `routing_replay` checks
record / replay of MoE routing, `rank_results` reads what each rank wrote."""

from __future__ import annotations

import json
import math
import os

import torch

from rl_engine.launch.gloo import spawn
from rl_engine.policy import CausalLM, ModelConfig, comm
from rl_engine.policy.moe import RoutingRecord
from rl_engine.policy.optimizer import OptimizerConfig
from rl_engine.policy.parallel import ParallelGroups
from rl_engine.policy.pipeline import MicroBatch
from rl_engine.policy.parallel_trainer import ParallelTrainer

DENSE = ModelConfig(model_type="qwen3", vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=4,
                    num_heads=4, num_kv_heads=1, head_dim=8, tie_word_embeddings=True, qk_norm=True,
                    qkv_bias=True, max_position_embeddings=256, max_context_len=256)
MOE = ModelConfig(model_type="qwen2_moe", vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True, max_position_embeddings=256,
                  max_context_len=256, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                  shared_expert_intermediate_size=32, moe_layers=[0, 1], norm_topk_prob=False,
                  router_aux_loss_coef=0.01, router_z_loss_coef=0.001, router_bias_update_rate=0.01)
# DeepSeek-V3: MLA with q LoRA, one dense layer then two MoE layers with sigmoid group-limited
# routing, ungated shared experts, the aux-loss-free bias (e_score_correction_bias) updated each step.
DSV3 = ModelConfig(model_type="deepseek_v3", vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=3,
                   num_heads=4, num_kv_heads=4, head_dim=4, kv_lora_rank=8, q_lora_rank=12, qk_nope_head_dim=6,
                   v_head_dim=6, rope_interleave=True, max_position_embeddings=256, max_context_len=256,
                   num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                   shared_expert_gated=False, moe_layers=[1, 2], scoring_func="sigmoid", n_group=2, topk_group=1,
                   routed_scaling_factor=2.5, norm_topk_prob=True, router_aux_loss_coef=0.01,
                   router_bias_update_rate=0.01)
# "mixed": the dense model on packed batches of odd lengths, length 1 and sequences longer than
# 2 * cp chunks (context-parallel tests; `micro_batches` takes its lengths from MIXED_LENGTHS).
MODELS = {"dense": DENSE, "moe": MOE, "dsv3": DSV3, "mixed": DENSE}
MIXED_LENGTHS = [[1, 7, 30], [13, 1, 2, 5], [33], [3, 1, 9, 1]]
OPTIM = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, clip_grad=0.5, bucket_elements=3000)


def write_weights(directory: str, kind: str, seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = CausalLM(MODELS[kind])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1)
    model.save_pretrained(directory)
    return directory


def micro_batches(kind: str, *, num: int = 4, seed: int = 1, even: bool = True) -> list[MicroBatch]:
    cfg = MODELS[kind]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num):
        lengths = torch.randint(3, 14, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen).tolist()
        if kind == "mixed":
            lengths = list(MIXED_LENGTHS[i % len(MIXED_LENGTHS)])
        elif even and sum(lengths) % 2:
            lengths[-1] += 1
        ids = torch.randint(0, cfg.vocab_size, (sum(lengths) + 1,), generator=gen)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
        T = sum(lengths)
        out.append(MicroBatch(input_ids=ids[:T], positions=torch.cat([torch.arange(n) for n in lengths]),
                              cu_seqlens=cu, targets=ids[1:],
                              loss_inputs={"advantages": torch.randn(T, generator=gen),
                                           "mask": (torch.rand(T, generator=gen) > 0.2).float()}))
    total = sum(float(mb.loss_inputs["mask"].sum()) for mb in out)
    for mb in out:
        mb.loss_inputs["normaliser"] = torch.tensor(total)
    return out


def loss_fn(logprobs: torch.Tensor, entropy: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    li = mb.loss_inputs
    per_token = -logprobs * li["advantages"] - 0.01 * entropy + 0.1 * logprobs.pow(2)
    return (per_token * li["mask"]).sum() / li["normaliser"]


def build_trainer(spec: dict, weights: str) -> ParallelTrainer:
    groups = ParallelGroups.build(tp=spec.get("tp", 1), cp=spec.get("cp", 1), pp=spec.get("pp", 1),
                                  ep=spec.get("ep", 1), sequence_parallel=spec.get("sp", False))
    return ParallelTrainer(MODELS[spec["kind"]], groups=groups, optim=OptimizerConfig(**OPTIM), hf_path=weights,
                           virtual_stages=spec.get("v", 1), cp_comm=spec.get("cp_comm", "ring"),
                           cp_min_tokens=spec.get("cp_min_tokens", 0))


def my_micro_batches(trainer: ParallelTrainer, kind: str) -> list[MicroBatch]:
    g = trainer.groups
    return micro_batches(kind)[g.dp_rank::g.dp_size]


def write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def _loss_at(trainer: ParallelTrainer, mbs: list[MicroBatch]) -> float:
    """The global loss at the current parameters, without a step (summed as `train_step` does)."""
    g = trainer.groups
    local = sum(float(loss_fn(lp, ent, mb)) for (lp, ent), mb in zip(trainer.forward_logprobs(mbs), mbs))
    loss = torch.tensor([local if g.tp_rank == 0 and g.cp_rank == 0 else 0.0], dtype=torch.float64)
    for group in (g.dp_group, g.pp_group, g.tp_group, g.cp_group):  # cp ranks see the same whole micro-batches
        loss = comm.all_reduce(loss, group)
    return float(loss)


def run_layout(spec: dict, weights: str, out_dir: str, *, steps: int = 3) -> ParallelTrainer:
    """Train `steps` steps in the layout `spec` (tp, pp, ep, sp, v, kind), save a checkpoint to
    out_dir/<name> and to out_dir/<name>.json the losses of the steps and then the loss at the saved
    parameters (so the last update shows in a loss too); returns the trainer. Also saves
    out_dir/<name>_step1 after the first step: its exp_avg is (1 - beta1) times that step's clipped
    gradient, which `assert_matches_single` compares before Adam's normalisation."""
    trainer = build_trainer(spec, weights)
    mbs = my_micro_batches(trainer, spec["kind"])
    losses = []
    for step in range(steps):
        losses.append(trainer.train_step(mbs, loss_fn)["loss"])
        if step == 0:
            trainer.save_checkpoint(os.path.join(out_dir, spec["name"] + "_step1"))
    losses.append(_loss_at(trainer, mbs))
    trainer.save_checkpoint(os.path.join(out_dir, spec["name"]))
    if trainer.groups.world_rank == 0:
        write_json(os.path.join(out_dir, spec["name"] + ".json"), losses)
    return trainer


def run_layouts(layouts: list[dict], weights: dict[str, str], out_dir: str) -> dict[str, ParallelTrainer]:
    """In a worker: `run_layout` for each spec (weights by its kind); the trainers by layout name."""
    return {spec["name"]: run_layout(spec, weights[spec["kind"]], out_dir) for spec in layouts}


def run_parity(out_dir: str, worker, *, world: int, kinds: tuple[str, ...] = ("dense", "moe")) -> str:
    """The parity harness's driver: write one checkpoint per model kind, train the single-process
    reference `single_<kind>` of each in this process, then run `worker(rank, world, weights,
    out_dir)` in `world` gloo processes (weights: kind -> checkpoint directory). Returns out_dir."""
    out_dir = str(out_dir)
    weights = {kind: write_weights(os.path.join(out_dir, f"weights_{kind}"), kind) for kind in kinds}
    for kind in kinds:
        run_layout({"name": f"single_{kind}", "kind": kind}, weights[kind], out_dir)
    spawn(worker, world, weights, out_dir)
    return out_dir


def layout_ids(layouts: list[dict]) -> list[str]:
    return [spec["name"] for spec in layouts]


def check_layout(out_dir: str, spec: dict) -> str:
    """`assert_matches_single` of the layout `spec` against the single-process run of its kind."""
    return assert_matches_single(out_dir, spec["name"], f"single_{spec['kind']}", kind=spec["kind"])


def routing_replay(trainer: ParallelTrainer, mbs: list[MicroBatch], *, num_experts: int) -> dict[str, float]:
    """Record the routing of `mbs`, replay it, then replay every choice moved to the next expert.
    Returns {"same": max |replayed - recorded| log-prob (0 when replay works), "changed": the
    smallest per-micro-batch max |moved - recorded| (> 0 when replay steers the experts)}. Leaves
    `mbs` replaying the recorded routing."""
    for mb in mbs:
        mb.routing = RoutingRecord(mode="record")
    recorded = trainer.forward_logprobs(mbs)
    for mb in mbs:
        mb.routing.mode = "replay"
    replayed = trainer.forward_logprobs(mbs)
    for mb in mbs:
        mb.routing.topk_ids = {k: (v + 1) % num_experts for k, v in mb.routing.topk_ids.items()}
    moved = trainer.forward_logprobs(mbs)
    for mb in mbs:
        mb.routing.topk_ids = {k: (v - 1) % num_experts for k, v in mb.routing.topk_ids.items()}
    return {"same": max((a[0] - b[0]).abs().max().item() for a, b in zip(recorded, replayed)),
            "changed": min((a[0] - b[0]).abs().max().item() for a, b in zip(recorded, moved))}


def rank_results(out_dir: str, prefix: str, *, world: int) -> list[dict]:
    """What each rank wrote with `write_json(out_dir/<prefix><rank>.json)`, by rank."""
    results = []
    for rank in range(world):
        with open(os.path.join(out_dir, f"{prefix}{rank}.json")) as f:
            results.append(json.load(f))
    return results


EPS32 = torch.finfo(torch.float32).eps
# The loss sums n = 66 per-token terms (sum |terms| ~ 5.3) in another order per layout: at worst
# n eps32 sum|terms| = 4e-5, typically sqrt(n) eps32 sum|terms| = 5e-6; measured 1-2 ulps (2.4e-7)
# with 1 and 2 threads and AVX512 / AVX2 / default kernels. Later steps add grad . (parameter
# difference), small: the parameters that differ most are those whose gradient is ~0 (see below).
LOSS_TOL = 1e-5


def adam_sensitivity(beta1: float, beta2: float, step: int) -> tuple[float, float]:
    """(R, K) at `step`, with bc1 = 1 - beta1^step, bc2 = 1 - beta2^step and u = m_hat / (sqrt(v_hat) + eps)
    the update divided by lr. R bounds |u| over every gradient history (Cauchy-Schwarz over m's and
    v's weights; 1 at step 1, ~1.001 at step 3 for betas (0.9, 0.95)). K bounds the sensitivity to
    the newest gradient g: |du/dg| <= K / (sqrt(v_hat) + eps), from m_hat (1 - beta1) / bc1 and from
    v_hat R * sqrt((1 - beta2) / bc2) (|d sqrt(v_hat)/dg| <= that, as v_hat >= (1 - beta2) g^2 / bc2)."""
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    weights = sum((1 - beta1) ** 2 * beta1 ** (2 * k) / ((1 - beta2) * beta2 ** k) for k in range(step))
    r = math.sqrt(weights * bc2) / bc1
    return r, (1 - beta1) / bc1 + r * math.sqrt((1 - beta2) / bc2)


def assert_matches_single(out_dir: str, name: str, single: str, *, kind: str, steps: int = 3) -> str:
    """Asserts that layout `name` trained like the single-process run `single` (both by
    `run_layout`), to the rounding of its other reduction orders; returns a line of the margins.

    Gradients (step 1, from equal weights): every element is a sum over the step's tokens (and
    heads, hidden units) that the layout orders differently (tp halves of a GEMM, dp ranks, pp
    stages, ep token order). Two orders of an n-term fp32 sum differ by <= ~n * eps32 * sum|terms|,
    and the terms are at most of the size of the model's largest gradient element. Per-tensor
    scales would not do: k_proj.bias's gradient is zero in exact arithmetic without qk-norm
    (softmax is shift-invariant over keys), so it is pure rounding of terms of the other tensors' size.
    Parameters after step 1: Adam's update u moves by <= K * delta / (|g| + eps) for a gradient
    difference delta, and by up to 2 R where a gradient lies within delta of zero (its sign is
    rounding); so near-zero gradients may move by ~lr and well-resolved ones by ulps.
    Parameters after `steps` steps: from there on the gradients differ by the Hessian times those
    moves, which no rounding bound covers; |u| <= R in both runs, so they differ by at most
    2 lr sum_t R_t. Errors in later steps' gradients or updates show in the losses instead (LOSS_TOL):
    `run_layout` records one more, at the final parameters."""
    from rl_engine.policy.dist_checkpoint import read_full_tensors

    def load(run: str, suffix: str, state: str = "param") -> dict[str, torch.Tensor]:
        return read_full_tensors(os.path.join(out_dir, run + suffix), state)

    with open(os.path.join(out_dir, name + ".json")) as f:
        losses = json.load(f)
    with open(os.path.join(out_dir, single + ".json")) as f:
        ref = json.load(f)
    assert len(losses) == len(ref) == steps + 1
    loss_diff = max(abs(x - y) for x, y in zip(losses, ref))
    assert loss_diff <= LOSS_TOL, f"{name}: losses {losses} against {ref}"

    lr, (beta1, beta2), eps = OPTIM["lr"], OPTIM["betas"], OPTIM["eps"]
    num_tokens = sum(mb.num_tokens for mb in micro_batches(kind))
    m_a, m_b = load(name, "_step1", "exp_avg"), load(single, "_step1", "exp_avg")
    assert m_a.keys() == m_b.keys(), sorted(set(m_a) ^ set(m_b))
    # exp_avg = (1 - beta1) * clipped gradient after step 1 (m_0 = 0)
    m_bound = num_tokens * EPS32 * max(m.abs().max().item() for m in m_b.values())
    grad_ratio = max((m_a[k] - m_b[k]).abs().max().item() for k in m_b) / m_bound
    worst = max(m_b, key=lambda k: (m_a[k] - m_b[k]).abs().max().item())
    assert grad_ratio <= 1, f"{name}: step-1 gradient of {worst} differs by {grad_ratio:.3g} x the rounding bound"

    r1, k1 = adam_sensitivity(beta1, beta2, 1)
    delta = m_bound / (1 - beta1)
    p_a, p_b = load(name, "_step1"), load(single, "_step1")
    assert p_a.keys() == p_b.keys(), sorted(set(p_a) ^ set(p_b))
    step1_ratio = 0.0
    for k in p_b:
        slack = 4 * EPS32 * (p_b[k].abs() + lr)  # the step's own rounding
        if k in m_b:
            g = torch.minimum(m_a[k].abs(), m_b[k].abs()) / (1 - beta1)
            u_bound = torch.clamp(k1 * delta / (g + eps), max=2 * r1)
            u_bound[g <= delta] = 2 * r1
            bound = lr * u_bound + slack
        else:
            bound = slack  # not Adam's (MoE expert_bias: a sign step from integer loads)
        ratio = ((p_a[k] - p_b[k]).abs() / bound).max().item()
        assert ratio <= 1, f"{name}: {k} after step 1 differs by {ratio:.3g} x its bound"
        step1_ratio = max(step1_ratio, ratio)

    a, b = load(name, ""), load(single, "")
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    final_bound = lr * sum(2 * adam_sensitivity(beta1, beta2, t)[0] for t in range(1, steps + 1))
    param_diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert param_diff <= final_bound, f"{name}: parameters differ by {param_diff:.3g} > {final_bound:.3g}"
    return (f"{name}: loss diff {loss_diff:.2e}, step-1 gradients {grad_ratio:.2f} and parameters "
            f"{step1_ratio:.2f} of their bounds, parameter diff after {steps} steps {param_diff:.2e}")
