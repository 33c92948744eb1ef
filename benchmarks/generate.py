"""Output tokens/s of `LLM.generate` against transformers `generate`, measured in the same run.

Same checkpoint, same prompts (mixed lengths), same number of new tokens per prompt (EOS ignored on
both sides), fp32 on CPU (`--device cuda --dtype bfloat16` on a GPU), at batch 1 and batch 64, greedy
and sampled. Each configuration is timed
`--repeats` times alternating engine and transformers, and the best time of each is kept (the machine
is shared, so the best run is the least disturbed one); at batch 1 each prompt is such a unit. Also
reports the achieved fraction of this machine's fp32 matmul peak (a large matmul timed in the same
run): 2 * matmul params * tokens processed / time, and of its memory bandwidth (a large copy timed in
the same run): the weights read once per step plus the KV cache read by decode attention, per second;
and the matmul-only ceiling: the engine's own linears (`kernels.cpu.packed_linear.linear` where it
packs: fp32 the small-M GEMM's panels, bf16 oneDNN-prepacked weights, one-row products through the C++
`cpu_gemv`) timed alone on inputs of each step's shape, against transformers' time. The engine asks for no log-probs
(`SamplingParams(logprobs=None)`), as transformers' `generate` and vLLM compute none; the same engine
returning behaviour log-probs, as RL rollouts do, is timed beside it (`engine_with_logprobs_*`; `--skip
with_logprobs` leaves it out).

On CPU the engine also runs with every C++ CPU kernel (`rl_engine/kernels/cpu`; override `*=cpu`; since
d1cb556 every op with a C++ kernel is a CPU default, so this engine runs the default engine's kernels: a check),
interleaved with transformers, so their ratios come from one run. `--under-load` adds rows at `--load-threads 2` with a busy process (normal priority) on the machine:
the engine with a fixed thread count and OpenMP's default (spinning) wait policy, with
OMP_WAIT_POLICY=PASSIVE, and with `cpu_threads="auto"` (threads follow the free cores), each in a
fresh process (the wait policy is read when torch loads), beside the same runs on a quiet machine.

    python benchmarks/generate.py                 # the ~3M Qwen2-shaped model
    python benchmarks/generate.py --large         # also the ~50M model with a 32k vocabulary
    python benchmarks/generate.py --model builtin:smollm2-135m-instruct --batches 1,32   # the real model
    python benchmarks/generate.py --device cuda --dtype bfloat16 --size 0.5b   # Qwen2-0.5B-shaped, random
    python benchmarks/generate.py --under-load   # also decode at 2 threads with a core taken by another process
    python benchmarks/generate.py --vs-vllm VENV/bin/python --vs-vllm-only   # against vLLM's CPU backend

On CPU the engine also runs with `compile_decode` (each decode bucket's step compiled by torch.compile;
its compile time per bucket is reported, the compiling runs untimed) beside the eager one. `--vs-vllm
PYTHON` compares greedy decode with vLLM's CPU backend on the ~3.4M and ~40M models in fp32 and bf16, at
2 threads, each run a fresh process (benchmarks/vs_vllm.py).

`--processes N` measures the models in N fresh processes, one after another (each as above: the engines
interleaved, best of `--repeats`), and reports each row from its median process by speedup, every process's
ratios listed beside it (`speedup_per_process`, ...). A ratio moves more between processes than between the
rounds of one (session 27, batch 64 greedy: transformers 2,898-3,754 tok/s and the engine 10,280-12,310
across processes), so the targets are read from the median of several processes (the README's table: `--processes 5`;
`--large` 3).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_helpers import fresh_processes, interleaved_best, median_row, parse_args  # noqa: E402


# Model shapes by --size: (hidden, layers, heads, kv_heads, intermediate, vocab, tied). "0.5b" is
# Qwen2-0.5B's shape (~494M parameters), written with random weights (no download).
SIZES = {"3m": (256, 4, 8, 2, 768, 2048, True), "0.5b": (896, 24, 14, 2, 4864, 151936, True)}


def _sync(device: torch.device) -> None:
    """Host clocks time device work only after the device has finished it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_checkpoint(path: str, *, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
                     vocab: int, tie: bool, seed: int = 0, dtype: torch.dtype = torch.float32) -> str:
    from rl_engine.policy import CausalLM, ModelConfig

    hf = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
          "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
          "num_key_value_heads": kv_heads, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
          "rope_theta": 10000.0, "tie_word_embeddings": tie, "hidden_act": "silu",
          "torch_dtype": str(dtype).removeprefix("torch."),
          "eos_token_id": 2, "bos_token_id": 1}
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig.from_hf_dict(hf), dtype=dtype)
    with torch.no_grad():  # weights large enough that the next token depends on the context
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    model.save_pretrained(path)
    return path


def matmul_peak_gflops(seconds: float = 1.0, *, device: torch.device = torch.device("cpu"),
                       dtype: torch.dtype = torch.float32) -> float:
    n = 8192 if device.type == "cuda" else 2048  # a GPU needs a large product to reach its peak
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def memory_bandwidth_gbs(seconds: float = 0.5, *, device: torch.device = torch.device("cpu")) -> float:
    """Best copy bandwidth (read + write bytes per second, GB/s) of a 256 MiB tensor: the machine's
    memory roofline, measured in the same run as the matmul peak."""
    a = torch.empty(1 << 26, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    _sync(device)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        b.copy_(a)
        _sync(device)
        best = max(best, 2 * a.numel() * a.element_size() / (time.perf_counter() - t) / 1e9)
    return best


def decode_bytes(prompts: list[list[int]], new_tokens: int, *, weight_bytes: int, kv_bytes_per_token: int,
                 batch_at_once: bool) -> int:
    """Bytes a generation must move at least: every weight once per step (steps: new_tokens per group
    of prompts run together) plus each decode step's KV cache read."""
    groups = 1 if batch_at_once else len(prompts)
    kv = sum(new_tokens * len(p) + new_tokens * (new_tokens - 1) // 2 for p in prompts) * kv_bytes_per_token
    return groups * new_tokens * weight_bytes + kv


def make_prompts(num: int, vocab: int, *, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (num,), generator=g).tolist()
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def run_engine(llm, prompts, new_tokens: int, sampled: bool, *, logprobs: bool = False) -> float:
    """Seconds to generate `new_tokens` per prompt. `logprobs=False`: SamplingParams(logprobs=None), no
    log-prob pass, as transformers' `generate` (no output_scores) and vLLM (logprobs=None) compute none;
    True: the behaviour log-probs every RL rollout keeps."""
    from rl_engine import SamplingParams

    params = SamplingParams(temperature=1.0 if sampled else 0.0, max_tokens=new_tokens, ignore_eos=True, seed=None,
                            logprobs=0 if logprobs else None)
    llm.reset_prefix_cache()  # every run starts cold, like transformers
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
    return dt


def run_transformers(hf, prompts, new_tokens: int, sampled: bool) -> float:
    """Batch 1: one generate per prompt. Batch > 1: one left-padded batch with an attention mask."""
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, do_sample=sampled)
    if sampled:  # plain sampling from the full distribution, as RL rollouts do (no top-k / top-p)
        kw.update(temperature=1.0, top_k=0, top_p=1.0)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=hf.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=hf.device)
    t = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=mask, **kw)
    _sync(hf.device)
    dt = time.perf_counter() - t
    assert out.shape[1] == width + new_tokens
    return dt


def matmul_params(model) -> int:
    """Weights multiplied per token: every matrix but the embedding lookup, the LM head (tied or not)
    and, for MoE, the routed experts' share."""
    cfg = model.config
    n = sum(p.numel() for name, p in model.named_parameters()
            if p.dim() == 2 and not name.startswith(("embed_tokens", "lm_head")))
    n += cfg.vocab_size * cfg.hidden_size
    experts = sum(p.numel() for p in model.parameters() if p.dim() == 3)
    return n + (experts * cfg.num_experts_per_tok // cfg.num_experts if cfg.num_experts else 0)


def matmul_floor_step(model, prompts: list[list[int]], *, new_tokens: int, max_batched_tokens: int,
                      packed: bool = False):
    """A function running the engine's matmuls alone for generating from `prompts` at once: prefill
    chunks of `max_batched_tokens` tokens, then `new_tokens - 1` decode steps of len(prompts) rows, the
    LM head on each sampled row (one per sequence per step), each weight times a random input of the step's
    shape. As in the engine's prefill steps, the last layer's weights after its qkv projection (its attention
    output projection and a dense MLP) take only the rows a chunk samples: one per prompt that ends in it.
    `packed`: through the linear the engine's steps call (`kernels.cpu.packed_linear.linear` inside
    `reading()`), so the weights an engine registered are read as it reads them (its packed copies: fp32
    the small-M GEMM's panels, bf16 oneDNN's; a one-row product through the C++ `cpu_gemv` where the extension
    is built); else `F.linear`
    on the parameters. Timed beside the engine it gives what a run would take if attention,
    norms, sampling and Python were free (inputs and weights hot in cache): a bound on any achievable
    speedup with these matmuls."""
    # the parameters themselves (run() reads them under inference mode): the packed copies hang on them
    weights = [p for name, p in model.named_parameters()
               if p.dim() == 2 and not name.startswith(("embed_tokens", "lm_head"))]
    last = model.layers[-1]
    tail = {id(last.self_attn.o_proj.weight)} if hasattr(last.self_attn, "o_proj") else set()
    if not last.is_moe:
        tail |= {id(p) for p in last.mlp.parameters() if p.dim() == 2}
    head = model.lm_head.weight
    device, dtype = head.device, head.dtype
    prompt_tokens = sum(len(p) for p in prompts)
    starts = range(0, prompt_tokens, max_batched_tokens)
    chunks = [min(max_batched_tokens, prompt_tokens - a) for a in starts]
    ends = list(itertools.accumulate(len(p) for p in prompts))  # the prompts' ends in the token stream
    sampled = [sum(a < e <= a + n for e in ends) for a, n in zip(starts, chunks)]
    batch = len(prompts)
    widths = {w.shape[1] for w in weights + [head]}
    inputs = {rows: {n: torch.randn(rows, n, device=device, dtype=dtype) for n in widths}
              for rows in (set(chunks) | set(sampled) | {batch}) - {0}}
    if packed:
        from rl_engine.kernels.cpu import packed_linear

        linear, reading = packed_linear.linear, packed_linear.reading
    else:
        linear, reading = torch.nn.functional.linear, contextlib.nullcontext

    def run() -> None:
        with torch.inference_mode(), reading():
            for rows, tail_rows in list(zip(chunks, sampled)) + [(batch, batch)] * (new_tokens - 1):
                for w in weights:
                    n = tail_rows if id(w) in tail else rows
                    if n:
                        linear(inputs[n][w.shape[1]], w)
                if tail_rows:  # the LM head: the sampled rows
                    linear(inputs[tail_rows][head.shape[1]], head)
        _sync(device)

    return run


def bench_model(name: str, path: str, *, batches: list[int], new_tokens: int, repeats: int, peak: float,
                max_prompt: int, device: torch.device = torch.device("cpu"),
                dtype: torch.dtype = torch.float32, bandwidth: float = 0.0, skip: frozenset = frozenset()) -> dict:
    from transformers import AutoModelForCausalLM

    from rl_engine import LLM, kernels

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    hf.generation_config.eos_token_id = None
    t = time.perf_counter()
    llm = LLM(path, max_num_seqs=max(batches), dtype=dtype, device=device)
    start_s = time.perf_counter() - t
    cpp_engine, cpp = None, []
    if device.type == "cpu" and "cpp_kernels" not in skip:  # every C++ CPU kernel (resolved at model build)
        from rl_engine.kernels import cpu as cpu_kernels

        if cpu_kernels.extension_status()[0]:
            kernels.configure(kernels.KernelConfig(overrides={"*": "cpu"}))
            try:
                cpp = sorted(r.op for r in kernels.describe(device) if r.backend == "cpu")
                cpp_engine = LLM(path, max_num_seqs=max(batches), dtype=dtype, device=device)
            finally:
                kernels.configure(kernels.KernelConfig())
    # the same engine with each decode bucket's step compiled (EngineConfig.compile_decode)
    compiled_engine = None
    if device.type == "cpu" and "compiled" not in skip:
        compiled_engine = LLM(path, max_num_seqs=max(batches), dtype=dtype, device=device, compile_decode=True)
    model = llm.model
    # the matmul floor times the linears the engine's steps run (packed_linear.linear where it packs)
    packed = bool(llm.engine.runner.packed_weights)
    weight_bytes = matmul_params(model) * model.lm_head.weight.element_size()
    kv_bytes_per_token = llm.engine.runner.kv_bytes_per_token
    vocab = model.config.vocab_size
    n_params = sum(p.numel() for p in model.parameters())
    mm_params = matmul_params(model)
    rows = []
    for batch in batches:
        # Batch 1 serves 4 prompts one after the other; larger batches submit all prompts at once.
        prompts = make_prompts(4 if batch == 1 else batch, vocab, min_len=16, max_len=max_prompt, seed=batch)
        groups = [[p] for p in prompts] if batch == 1 else [prompts]
        run_engine(llm, prompts[:2], 4, True)  # warm up both (allocations, runners, lazy imports)
        run_transformers(hf, prompts[:2], 4, True)
        if cpp_engine is not None:
            run_engine(cpp_engine, prompts[:2], 4, True)
        if compiled_engine is not None:  # every bucket the timed runs meet is compiled here, untimed
            for g in groups:
                run_engine(compiled_engine, g, new_tokens, False)
        for sampled in (False, True):
            # Each group (one prompt at batch 1) is timed `repeats` times, alternating engine and
            # transformers (common.interleaved_best), and its best times are summed: short timed units
            # let a burst of load from elsewhere on a shared machine spoil one unit, not the total.
            engine_t = hf_t = floor = cpp_t = compiled_t = logprobs_t = 0.0
            for g in groups:
                floor_step = matmul_floor_step(model, g, new_tokens=new_tokens, packed=packed,
                                               max_batched_tokens=llm.engine.config.max_num_batched_tokens)
                fns = {"engine": lambda: run_engine(llm, g, new_tokens, sampled),
                       "transformers": lambda: run_transformers(hf, g, new_tokens, sampled),
                       "matmul_floor": floor_step}
                if cpp_engine is not None:
                    fns["cpp_kernels"] = lambda: run_engine(cpp_engine, g, new_tokens, sampled)
                if compiled_engine is not None:
                    fns["compiled"] = lambda: run_engine(compiled_engine, g, new_tokens, sampled)
                if "with_logprobs" not in skip:  # the RL rollouts' configuration: behaviour log-probs on
                    fns["with_logprobs"] = lambda: run_engine(llm, g, new_tokens, sampled, logprobs=True)
                best = interleaved_best(fns, repeats=repeats, warmup=0)
                engine_t += best["engine"]
                hf_t += best["transformers"]
                floor += best["matmul_floor"]
                cpp_t += best.get("cpp_kernels", 0.0)
                compiled_t += best.get("compiled", 0.0)
                logprobs_t += best.get("with_logprobs", 0.0)
            tokens = len(prompts) * new_tokens
            processed = tokens + sum(len(p) for p in prompts)
            achieved = 2 * mm_params * processed / engine_t / 1e9
            moved = decode_bytes(prompts, new_tokens, weight_bytes=weight_bytes,
                                 kv_bytes_per_token=kv_bytes_per_token, batch_at_once=batch > 1)
            rows.append({
                "batch": batch, "mode": "sampled" if sampled else "greedy", "prompts": len(prompts),
                "new_tokens_per_prompt": new_tokens,
                "engine_tokens_per_s": round(tokens / engine_t, 1),
                "transformers_tokens_per_s": round(tokens / hf_t, 1),
                "speedup": round(hf_t / engine_t, 2),
                "engine_logprobs": "none (SamplingParams(logprobs=None)); transformers computes none either",
                # the same engine returning behaviour log-probs (what RL rollouts run), in the same run
                **({"engine_with_logprobs_tokens_per_s": round(tokens / logprobs_t, 1),
                    "with_logprobs_speedup": round(hf_t / logprobs_t, 2),
                    "logprobs_time_over_none": round(logprobs_t / engine_t, 3)} if logprobs_t else {}),
                # the engine with every C++ CPU kernel (`*=cpu`), in the same run
                **({"engine_cpp_kernels_tokens_per_s": round(tokens / cpp_t, 1),
                    "cpp_kernels_speedup": round(hf_t / cpp_t, 2),
                    "cpp_kernels_over_torch_ops": round(engine_t / cpp_t, 2)} if cpp_engine is not None else {}),
                # the engine with compiled decode steps (compile_decode), in the same run
                **({"engine_compiled_tokens_per_s": round(tokens / compiled_t, 1),
                    "compiled_speedup": round(hf_t / compiled_t, 2),
                    "compiled_over_eager": round(engine_t / compiled_t, 2)} if compiled_engine is not None else {}),
                # transformers time / the engine's matmul-only time: no engine can beat this here
                "speedup_ceiling_matmul_only": round(hf_t / floor, 2),
                "engine_time_in_matmul_floor": round(floor / engine_t, 3),
                "engine_gflops": round(achieved, 2),
                "fraction_of_matmul_peak": round(achieved / peak, 4),
                "transformers_fraction_of_matmul_peak": round(achieved * engine_t / hf_t / peak, 4),
                "fraction_of_memory_bandwidth": round(moved / engine_t / 1e9 / bandwidth, 4) if bandwidth else None,
            })
            print(json.dumps({"model": name, **rows[-1]}), flush=True)
    return {"model": name, "params": n_params, "matmul_params_per_token": mm_params, "vocab_size": vocab,
            "hidden_size": model.config.hidden_size, "num_layers": model.config.num_layers,
            "engine_start_s": round(start_s, 2), "cpp_kernels": cpp,
            "matmul_floor_linears": ("the engine's packed_linear.linear (fp32: small-M GEMM panels, bf16: oneDNN "
                                     "prepacked; one row: C++ cpu_gemv where built)") if packed else "F.linear",
            # bucket -> seconds of its first step (compilation included), in this process
            "decode_compile_s": compiled_engine.engine.stats()["decode_compile_s"] if compiled_engine else None,
            "results": rows,
            "batch_invariant": None if "batch_invariant" in skip else bench_batch_invariant(
                name, path, llm, batches=batches, new_tokens=new_tokens, repeats=repeats, max_prompt=max_prompt,
                device=device, dtype=dtype)}


def bench_batch_invariant(name: str, path: str, llm, *, batches: list[int], new_tokens: int, repeats: int,
                          max_prompt: int, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """The same generation with the model built under `model.batch_invariant` against the default
    engine `llm`, interleaved in this run: the switch's cost (mostly decode steps: new_tokens each)."""
    from rl_engine import LLM, kernels

    kernels.set_batch_invariant(True)
    try:
        invariant = LLM(path, max_num_seqs=max(batches), dtype=dtype, device=device)
    finally:
        kernels.set_batch_invariant(False)
    rows = []
    for batch in batches:
        prompts = make_prompts(4 if batch == 1 else batch, llm.model.config.vocab_size, min_len=16,
                               max_len=max_prompt, seed=batch)
        groups = [[p] for p in prompts] if batch == 1 else [prompts]
        run_engine(invariant, prompts[:2], 4, True)  # warm up
        for sampled in (False, True):
            default_t = invariant_t = 0.0
            for g in groups:
                # with log-probs: batch invariance is about them matching the trainer's
                best = interleaved_best({"default": lambda: run_engine(llm, g, new_tokens, sampled, logprobs=True),
                                         "invariant": lambda: run_engine(invariant, g, new_tokens, sampled,
                                                                         logprobs=True)},
                                        repeats=repeats, warmup=0)
                default_t += best["default"]
                invariant_t += best["invariant"]
            tokens = len(prompts) * new_tokens
            rows.append({"batch": batch, "mode": "sampled" if sampled else "greedy",
                         "default_tokens_per_s": round(tokens / default_t, 1),
                         "batch_invariant_tokens_per_s": round(tokens / invariant_t, 1),
                         "batch_invariant_time_over_default": round(invariant_t / default_t, 2),
                         "target_time_over_default": 1.5})
            print(json.dumps({"model": name, "batch_invariant": rows[-1]}), flush=True)
    return rows


_CHILD = """
import json, sys, time, torch
torch.set_num_threads({threads})
sys.path.insert(0, {bench_dir!r})
from generate import make_prompts, run_engine
from rl_engine import LLM
from rl_engine.kernels.cpu import threads
llm = LLM({path!r}, max_num_seqs={batch}, cpu_threads={mode!r})
prompts = make_prompts({batch}, llm.model.config.vocab_size, min_len=16, max_len=128, seed={batch})
run_engine(llm, prompts[:2], 4, True)
dt = run_engine(llm, prompts, {new_tokens}, False)
print(json.dumps({{"tokens_per_s": round({batch} * {new_tokens} / dt, 1), "threads_at_end": torch.get_num_threads(),
                  "wait_policy": threads.wait_policy()}}))
"""


def bench_under_load(path: str, *, threads: int, batch: int, new_tokens: int, timeout: float) -> list[dict]:
    """Decode tokens/s in fresh processes, quiet and beside one busy process at normal priority, for
    each wait policy x thread policy (see the module doc). A run past `timeout` s reports a bound."""
    configs = [("default (spin)", "fixed"), ("PASSIVE", "fixed"), ("default (spin)", "auto"), ("PASSIVE", "auto")]
    rows = []
    for loaded in (False, True):
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if loaded else None
        try:
            for policy, mode in configs:
                env = dict(os.environ)
                env.pop("OMP_WAIT_POLICY", None)
                if policy == "PASSIVE":
                    env["OMP_WAIT_POLICY"] = "PASSIVE"
                code = _CHILD.format(threads=threads, bench_dir=os.path.dirname(os.path.abspath(__file__)), path=path,
                                     batch=batch, mode=mode, new_tokens=new_tokens)
                row = {"busy_processes": int(loaded), "torch_threads": threads, "omp_wait_policy": policy,
                       "cpu_threads": mode, "batch": batch, "new_tokens_per_prompt": new_tokens}
                try:
                    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                         timeout=timeout, check=True)
                    row.update(json.loads(out.stdout.strip().splitlines()[-1]))
                except subprocess.TimeoutExpired:
                    row["tokens_per_s_below"] = round(batch * new_tokens / timeout, 1)
                except subprocess.CalledProcessError as exc:
                    row["error"] = exc.stderr.strip().splitlines()[-1] if exc.stderr.strip() else str(exc)
                rows.append(row)
                print(json.dumps({"under_load": row}), flush=True)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    return rows


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", action="store_true", help="also the ~50M-param model with a 32k vocabulary")
    ap.add_argument("--size", choices=sorted(SIZES), default="3m", help="shape of the first model (default 3m)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]: both engines and the peak run there")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both engines (and the peak)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each engine per prompt group (best kept)")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--under-load", action="store_true",
                    help="also decode at --load-threads beside a busy process: wait and thread policies")
    ap.add_argument("--load-threads", type=int, default=2, help="torch threads of the --under-load runs (>= 2)")
    ap.add_argument("--load-batch", type=int, default=64, help="batch of the --under-load runs")
    ap.add_argument("--load-new-tokens", type=int, default=32, help="new tokens per prompt in --under-load runs")
    ap.add_argument("--load-timeout", type=float, default=120.0, help="seconds before an --under-load run is cut")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: cpp_kernels, compiled, "
                    "batch_invariant, with_logprobs (shorter runs)")
    ap.add_argument("--vs-vllm", default=None, metavar="PYTHON",
                    help="also compare greedy decode with vLLM's CPU backend, run by this interpreter (its own venv; "
                         "benchmarks/vs_vllm.py); the row is skipped with a message when it is absent")
    ap.add_argument("--vs-vllm-only", action="store_true", help="only the --vs-vllm comparison")
    ap.add_argument("--vllm-models", default="3m,40m", help="models of the vLLM comparison: 3m, 40m")
    ap.add_argument("--vllm-dtypes", default="float32,bfloat16")
    ap.add_argument("--vllm-threads", type=int, default=2, help="threads of both engines in the vLLM comparison")
    ap.add_argument("--vllm-batch1-prompts", type=int, default=8,
                    help="prompts served one at a time in the vLLM comparison's batch-1 runs")
    ap.add_argument("--vllm-repeats", type=int, default=1, help="fresh processes per engine (best kept)")
    ap.add_argument("--vllm-eager", action="store_true", help="our engine without compile_decode in that comparison")
    ap.add_argument("--vllm-logprobs", action="store_true",
                    help="our engine returns behaviour log-probs in that comparison (vLLM still computes none)")
    ap.add_argument("--model", default=None,
                    help="benchmark this model instead of the synthetic ones: a model directory, a .gguf file or "
                         "builtin:smollm2-135m-instruct (the `real` extra; e.g. --batches 1,32)")
    ap.add_argument("--processes", type=int, default=1,
                    help="measure the models in this many fresh processes, one after another, and report each row "
                         "from its median process (by speedup) with every process's ratios beside it; --under-load "
                         "and --vs-vllm run once, after them")
    ap.add_argument("--models-only", action="store_true", help=argparse.SUPPRESS)  # (a --processes child)
    return ap


# the ratios each merged row lists per process beside its `speedup`
RATIOS = ("compiled_speedup", "with_logprobs_speedup", "cpp_kernels_speedup", "speedup_ceiling_matmul_only")


def merge_processes(reports: list[dict]) -> dict:
    """One report from the `--processes` runs' reports (the same models, batches and modes each): every row of
    every model is its median process's (by `speedup`; a batch-invariant row by its time over the default), with
    each process's ratios listed beside it; the rest is the first process's, plus each one's engine start-up."""
    merged = {**reports[0], "processes": len(reports)}
    merged["models"] = []
    for i, first in enumerate(reports[0]["models"]):
        per = [r["models"][i] for r in reports]
        model = {**first, "engine_start_s_per_process": [p["engine_start_s"] for p in per]}
        model["results"] = [median_row([p["results"][j] for p in per], "speedup", also=RATIOS)
                            for j in range(len(first["results"]))]
        if first.get("batch_invariant"):
            model["batch_invariant"] = [median_row([p["batch_invariant"][j] for p in per],
                                                   "batch_invariant_time_over_default")
                                        for j in range(len(first["batch_invariant"]))]
        merged["models"].append(model)
    return merged


def main() -> None:
    args = parse_args(build_parser(), smoke={"new_tokens": 4, "repeats": 1, "batches": "1,2", "load_batch": 2,
                                             "load_new_tokens": 2, "under_load": True, "processes": 2,
                                             "vs_vllm": "vllm-venv-absent/bin/python"})
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    skip = frozenset(p for p in args.skip.split(",") if p)
    if skip - {"cpp_kernels", "compiled", "batch_invariant", "with_logprobs"}:
        raise SystemExit(f"--skip {args.skip}: the parts are cpp_kernels, compiled, batch_invariant, with_logprobs")
    if args.processes < 1:
        raise SystemExit(f"--processes {args.processes}: must be 1 or more")
    if args.vs_vllm_only:
        if args.vs_vllm is None:
            raise SystemExit("--vs-vllm-only needs --vs-vllm PYTHON")
        print(json.dumps({"vs_vllm": vs_vllm_report(args, batches)}, indent=2))
        return
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no CUDA device")
    with tempfile.TemporaryDirectory() as tmp:
        if args.processes > 1:  # (argparse keeps an option's last value: the children run one process each)
            report = merge_processes(fresh_processes(os.path.abspath(__file__),
                                                     [*sys.argv[1:], "--processes", "1", "--models-only"],
                                                     args.processes))
        else:
            report = measure_models(args, batches, skip, device, dtype, tmp)
        if not args.models_only and args.model is None:
            if args.under_load:
                if device.type != "cpu" or args.load_threads < 2:
                    report["under_load"] = {"skipped": "--under-load measures CPU decode at --load-threads 2 or more"}
                else:
                    report["under_load"] = bench_under_load(first_checkpoint(args, tmp, dtype),
                                                            threads=args.load_threads, batch=args.load_batch,
                                                            new_tokens=args.load_new_tokens,
                                                            timeout=args.load_timeout)
            if args.vs_vllm is not None:
                report["vs_vllm"] = vs_vllm_report(args, batches)
    print(json.dumps(report, indent=2))


def first_checkpoint(args: argparse.Namespace, tmp: str, dtype: torch.dtype) -> str:
    """The `--size` model's checkpoint under `tmp` (written once)."""
    path = os.path.join(tmp, args.size)
    if not os.path.exists(os.path.join(path, "config.json")):
        hidden, layers, heads, kv_heads, inter, vocab, tie = SIZES[args.size]
        write_checkpoint(path, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, intermediate=inter,
                         vocab=vocab, tie=tie, dtype=dtype)
    return path


def measure_models(args: argparse.Namespace, batches: list[int], skip: frozenset, device: torch.device,
                   dtype: torch.dtype, tmp: str) -> dict:
    """This process's report of the models: `--model`'s, or the `--size` model's and with `--large` the ~50M's,
    beside this machine's matmul peak and memory bandwidth, measured in the same run."""
    peak = matmul_peak_gflops(device=device, dtype=dtype)
    bandwidth = memory_bandwidth_gbs(device=device)
    report = {"torch_threads": args.threads, "device": str(device), "dtype": args.dtype,
              f"matmul_peak_gflops_{'fp32' if dtype == torch.float32 else 'bf16'}": round(peak, 1),
              "memory_bandwidth_gbs": round(bandwidth, 1), "models": []}
    common = dict(batches=batches, new_tokens=args.new_tokens, repeats=args.repeats, peak=peak, max_prompt=128,
                  device=device, dtype=dtype, bandwidth=bandwidth, skip=skip)
    if args.model is not None:
        from rl_engine.builtin_models import resolve_model_path

        path = resolve_model_path(args.model, output_dir=tmp, seed=0)  # a GGUF is converted once, cached
        report["models"].append(bench_model(args.model, path, **common))
    else:
        report["models"].append(bench_model(f"qwen2-{args.size}", first_checkpoint(args, tmp, dtype), **common))
        if args.large:
            large = write_checkpoint(os.path.join(tmp, "50m"), hidden=512, layers=10, heads=8, kv_heads=2,
                                     intermediate=1792, vocab=32000, tie=True, dtype=dtype)
            report["models"].append(bench_model("qwen2-50m-32k", large, **common))
    report["peak_measured_again_gflops"] = round(matmul_peak_gflops(device=device, dtype=dtype), 1)
    return report


def vs_vllm_report(args: argparse.Namespace, batches: list[int]) -> dict:
    import vs_vllm

    return vs_vllm.compare(args.vs_vllm, write_checkpoint=write_checkpoint, make_prompts=make_prompts,
                           models=args.vllm_models.split(","), dtypes=args.vllm_dtypes.split(","), batches=batches,
                           new_tokens=args.new_tokens, batch1_prompts=args.vllm_batch1_prompts,
                           threads=args.vllm_threads, repeats=args.vllm_repeats, compile_decode=not args.vllm_eager,
                           logprobs=args.vllm_logprobs)


if __name__ == "__main__":
    main()
