"""MTP drafting acceptance on the demo task, before and after a short training of the MTP head,
against the n-gram drafter on the same prompts (issue 18).

Model: the `tiny_dsv3` preset (DeepSeek-V3 shape, character vocabulary) with one MTP layer. Phase 1
trains the main model on the builtin `upper` task's demonstrations (all correct) with the next-token
loss; the MTP layer is untouched (random). Phase 2 trains only the MTP layer with the MTP loss
(`policy.mtp.mtp_loss`, the model's hidden states detached). After each phase, greedy generation of
the held-out prompts with speculative decoding reports each drafter's acceptance rate (accepted
drafts / verified drafts, k drafts per step) and checks that the outputs equal plain decoding's.

    python benchmarks/mtp_acceptance.py             # 400 + 300 steps, k = 2
    python benchmarks/mtp_acceptance.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_helpers import emit, parse_args  # noqa: E402


def encode(vocab: dict[str, int], prompt: str, response: str | None = None) -> list[int]:
    ids = [vocab["<|user|>"], *(vocab[c] for c in prompt), vocab["<|assistant|>"]]
    if response is not None:
        ids += [*(vocab[c] for c in response), vocab["<|eos|>"]]
    return ids


def batches(rows: list[list[int]], *, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        picked = [rows[i] for i in torch.randint(0, len(rows), (batch,), generator=g).tolist()]
        ids = torch.tensor([t for r in picked for t in r])
        positions = torch.cat([torch.arange(len(r)) for r in picked])
        cu = torch.zeros(len(picked) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor([len(r) for r in picked]), 0)
        yield ids, positions, cu


def train(model, rows, *, steps: int, lr: float, mtp_only: bool, seed: int) -> float:
    from rl_engine.policy.mtp import mtp_loss

    params = list(model.mtp_layers.parameters()) if mtp_only else [
        p for n, p in model.named_parameters() if not n.startswith("mtp_layers.")]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.zeros(())
    for _, (ids, positions, cu) in zip(range(steps), batches(rows, batch=64, seed=seed)):
        if mtp_only:
            with torch.no_grad():
                hidden = model.hidden_states(ids, positions=positions, cu_seqlens=cu)
            loss = mtp_loss(model, hidden, ids, positions=positions, cu_seqlens=cu)
        else:
            hidden = model.hidden_states(ids[:-1], positions=positions[:-1], cu_seqlens=torch.clamp(cu, max=len(ids) - 1))
            logprobs, _ = model.token_logprobs(hidden, ids[1:])
            loss = -logprobs.mean()  # packed: a sequence's last row predicts the next one's first token (noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def acceptance(model, prompts: list[list[int]], *, k: int, max_tokens: int) -> dict:
    from rl_engine import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    plain = [o.outputs[0].token_ids for o in LLM(model).generate(prompts, params)]
    out = {}
    for name, spec in (("ngram", {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 3,
                                  "prompt_lookup_min": 1}),
                       ("mtp", {"method": "mtp", "num_speculative_tokens": k})):
        llm = LLM(model, speculative_config=spec)
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        stats = llm.engine.stats()["speculative"]
        out[name] = {"acceptance_rate": round(stats["acceptance_rate"], 4),
                     "mean_accepted_length": round(stats["mean_accepted_length"], 4),
                     "draft_tokens": stats["draft_tokens"], "equals_plain": tokens == plain}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="main-model training steps (batch 64)")
    parser.add_argument("--mtp-steps", type=int, default=300, help="MTP-layer training steps (batch 64)")
    parser.add_argument("--k", type=int, default=2, help="num_speculative_tokens")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parse_args(parser, argv, smoke={"steps": 2, "mtp_steps": 2, "num_prompts": 4})

    from rl_engine.demo_task import write_task
    from rl_engine.policy import CausalLM
    from rl_engine.policy.presets import char_vocab, preset_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = preset_config("tiny_dsv3").replace(num_mtp_layers=1)
    model = CausalLM(config)
    vocab = char_vocab()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_task(tmp, "upper", seed=args.seed, p_correct=1.0)
        with open(paths["sft"]) as f:
            demos = [json.loads(line) for line in f]
        with open(paths["eval"]) as f:
            evals = [json.loads(line) for line in f][:args.num_prompts]
    rows = [encode(vocab, d["prompt"], d["response"]) for d in demos]
    prompts = [encode(vocab, e["prompt"]) for e in evals]
    max_tokens = len(evals[0]["answer"]) + 1
    t0 = time.time()
    main_loss = train(model, rows, steps=args.steps, lr=3e-3, mtp_only=False, seed=args.seed)
    before = acceptance(model, prompts, k=args.k, max_tokens=max_tokens)
    mtp_loss_value = train(model, rows, steps=args.mtp_steps, lr=3e-3, mtp_only=True, seed=args.seed + 1)
    after = acceptance(model, prompts, k=args.k, max_tokens=max_tokens)
    result = {"benchmark": "mtp_acceptance", "model": "tiny_dsv3 + 1 MTP layer", "task": "upper (held-out prompts)",
              "k": args.k, "prompts": len(prompts), "main_steps": args.steps, "mtp_steps": args.mtp_steps,
              "main_loss_last": round(main_loss, 4), "mtp_loss_last": round(mtp_loss_value, 4),
              "mtp_untrained": before["mtp"], "mtp_trained": after["mtp"], "ngram": after["ngram"],
              "mtp_trained_over_ngram_acceptance": round(after["mtp"]["acceptance_rate"]
                                                        / max(after["ngram"]["acceptance_rate"], 1e-9), 2),
              "seconds": round(time.time() - t0, 1)}
    emit(result)
    return result


if __name__ == "__main__":
    main()
