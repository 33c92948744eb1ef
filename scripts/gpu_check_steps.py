"""The steps of scripts/gpu_check.py, each a function `(ctx) -> None` that fills `ctx.figures` and
raises on failure (`NotInstalled` when an optional library is missing).

Each step calls the project's own code: the test suite (pytest, in a child process), the engine
(`LLM`), its graph cache (`ModelRunner.graphs`), the kernel registry, the benchmarks and the CLI.
Written without a GPU: none of these bodies has run on CUDA yet (issue 23).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")


class NotInstalled(Exception):
    """An optional library (FlashInfer, Transformer Engine) cannot be imported here."""


@dataclass(kw_only=True)
class StepContext:
    work: str  # a scratch folder of this step
    figures: dict = field(default_factory=dict)  # written to the report even when the step fails


# Tests that take the `test_device` fixture (tests/conftest.py): engine, graph cache, log-prob contract.
DEVICE_TESTS = ["tests/inference/test_logprobs.py", "tests/inference/test_graph_cache.py",
                "tests/inference/test_hf_parity.py", "tests/policy/test_policy_logprobs.py"]
GENERATE_ARGS = ["--device", "cuda", "--dtype", "bfloat16", "--size", "0.5b", "--batches", "1,64",
                 "--new-tokens", "64", "--repeats", "1", "--threads", "4"]
TRAIN_STEP_ARGS = ["--device", "cuda", "--dtype", "bfloat16", "--hidden", "512", "--layers", "4",
                   "--heads", "8", "--kv-heads", "2", "--seqs", "32", "--max-len", "1024"]
DEMO_ARGS = ["train", "train.device=cuda"]


def _env(**extra: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH", "")) if p)
    return env


def _run(cmd: list[str], *, env: dict | None = None, cwd: str = REPO) -> subprocess.CompletedProcess:
    """A child process whose output goes to this step's log (our stdout) and is returned."""
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True)
    print(proc.stdout[-20000:], proc.stderr[-20000:], sep="\n", flush=True)
    return proc


def pytest_command(args: list[str], junit: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *args]


def run_pytest(ctx: StepContext, args: list[str], *, env: dict | None = None, min_passed: int = 1) -> None:
    """pytest in a child process; counts from its JUnit XML into ctx.figures; failures raise."""
    junit = os.path.join(ctx.work, "junit.xml")
    proc = _run(pytest_command(args, junit), env=env)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed: list[str] = []
    if os.path.exists(junit):
        for suite in ET.parse(junit).getroot().iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
        for case in ET.parse(junit).getroot().iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    ctx.figures.update(passed=passed, failed=counts["failures"] + counts["errors"], skipped=counts["skipped"],
                       failed_tests=failed[:30], pytest_exit_code=proc.returncode)
    if proc.returncode not in (0, 5) or failed:
        raise RuntimeError(f"pytest exit {proc.returncode}; failed: {', '.join(failed[:10]) or proc.stdout[-500:]}")
    if passed < min_passed:
        raise RuntimeError(f"pytest ran {passed} passing tests, expected at least {min_passed}")


def _last_json(text: str) -> dict:
    """The last JSON object a benchmark printed (an indented block starting with a lone '{')."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line == "{"]
    if not starts:
        raise RuntimeError("the benchmark printed no JSON report")
    return json.loads("\n".join(lines[starts[-1]:]))


# --- steps -------------------------------------------------------------------------------------------

def step_env(ctx: StepContext) -> None:
    import torch
    import triton

    from rl_engine.kernels import registry

    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device")
    props = torch.cuda.get_device_properties(0)
    ctx.figures.update(device=props.name, capability=f"{props.major}.{props.minor}",
                       memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                       torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__,
                       python=sys.version.split()[0],
                       backends={r.op: r.backend for r in registry.describe("cuda")})


def step_cuda_tests(ctx: StepContext) -> None:
    """The tests that skip without CUDA (marked `cuda`). A test module that cannot even be imported on
    the GPU machine (a missing package) is reported as an error, and the others still run."""
    run_pytest(ctx, ["-m", "cuda", "--continue-on-collection-errors", "tests"], env=_env(TRITON_INTERPRET="0"),
               min_passed=0)


def step_triton_compiled(ctx: StepContext) -> None:
    """Every Triton kernel compiled for the GPU (not interpreted), against its torch reference."""
    check = ("import rl_engine.kernels.triton as t, json; from rl_engine.kernels import registry; "
             "print(json.dumps({'interpreted': t.INTERPRETED, 'triton_ops': sorted(r.op for r in "
             "registry.describe('cuda') if r.backend == 'triton')}))")
    proc = _run([sys.executable, "-c", check], env=_env(TRITON_INTERPRET="0"))
    if proc.returncode:
        raise RuntimeError(f"importing the Triton kernels failed: {proc.stderr[-500:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    ctx.figures.update(info)
    if info["interpreted"]:
        raise RuntimeError("the Triton kernels were built in interpreter mode")
    if not info["triton_ops"]:
        raise RuntimeError("the kernel registry picks Triton for no op on CUDA")
    run_pytest(ctx, ["tests/kernels"], env=_env(TRITON_INTERPRET="0"))


def step_device_tests(ctx: StepContext) -> None:
    """The CPU suite's engine and policy tests that take a device, on cuda."""
    run_pytest(ctx, DEVICE_TESTS, env=_env(RL_ENGINE_TEST_DEVICE="cuda"))


def _tiny_checkpoint(ctx: StepContext) -> str:
    sys.path.insert(0, TESTS)
    from hf_models import make_hf_model

    path = os.path.join(ctx.work, "qwen2-tiny")
    make_hf_model("qwen2", seed=0, tie_word_embeddings=False).save_pretrained(path)
    return path


def _trainer_logprobs(model, prompt: list[int], output: list[int], temperature: float):
    import torch

    seq, device = prompt + output, next(model.parameters()).device
    with torch.no_grad():
        hidden = model.hidden_states(torch.tensor(seq, device=device), positions=torch.arange(len(seq), device=device),
                                     cu_seqlens=torch.tensor([0, len(seq)], dtype=torch.int32, device=device))
        rows = hidden[len(prompt) - 1:len(seq) - 1]
        logprobs, _ = model.token_logprobs(rows, torch.tensor(output, device=device), temperature=temperature)
    return logprobs.float().cpu()


def step_engine_parity(ctx: StepContext) -> None:
    """Greedy tokens of CUDA fp32 (identical) and bf16 (agreement) vs CPU fp32; the log-prob contract."""
    import torch

    from rl_engine import LLM, SamplingParams
    from rl_engine.policy import from_pretrained

    sys.path.insert(0, TESTS)
    from inference_helpers import mixed_prompts

    path = _tiny_checkpoint(ctx)
    prompts = mixed_prompts(16, seed=0)
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)

    def tokens(**kw) -> list[list[int]]:
        return [o.outputs[0].token_ids for o in LLM(path, **kw).generate(prompts, greedy)]

    ref = tokens(device="cpu", dtype=torch.float32)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        got = tokens(device="cuda", dtype=dtype)
        same = sum(a == b for a, b in zip(ref, got))
        equal_tokens = sum(x == y for a, b in zip(ref, got) for x, y in zip(a, b))
        ctx.figures[f"{name}_identical_sequences"] = f"{same}/{len(ref)}"
        ctx.figures[f"{name}_token_agreement"] = round(equal_tokens / sum(len(a) for a in ref), 4)
    gaps = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = from_pretrained(path, dtype=dtype, device="cuda")
        llm = LLM(model, block_size=8, max_num_batched_tokens=128)
        worst = 0.0
        for temperature in (1.0, 0.7):
            params = SamplingParams(temperature=temperature, max_tokens=20, n=2, seed=7, ignore_eos=True)
            for prompt, out in zip(prompts[:8], llm.generate(prompts[:8], params)):
                for c in out.outputs:
                    expected = _trainer_logprobs(model, prompt, c.token_ids, temperature)
                    worst = max(worst, (torch.tensor(c.logprobs) - expected).abs().max().item())
        gaps[name] = worst
        ctx.figures[f"logprob_gap_{name}"] = worst
    if ctx.figures["fp32_identical_sequences"] != f"{len(ref)}/{len(ref)}":
        raise RuntimeError(f"CUDA fp32 greedy differs from CPU fp32: {ctx.figures['fp32_identical_sequences']}")
    if gaps["fp32"] > 1e-5:
        raise RuntimeError(f"log-prob contract broken on CUDA fp32: engine vs trainer gap {gaps['fp32']:.2e} > 1e-5")


def _time_ms(fn, *, repeats: int = 50) -> float:
    import torch

    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def step_cuda_graphs(ctx: StepContext) -> None:
    """Capture per bucket, lookup table, replay == eager (logits <= 1e-5 fp32), speed-up of replay."""
    import torch

    from rl_engine import LLM, SamplingParams
    from rl_engine.inference.graph_cache import CudaGraphRunner
    from rl_engine.policy import from_pretrained

    sys.path.insert(0, TESTS)
    from inference_helpers import mixed_prompts

    path = _tiny_checkpoint(ctx)
    model = from_pretrained(path, dtype=torch.float32, device="cuda")
    buckets = [1, 2, 4, 8, 16, 32]
    t0 = time.perf_counter()
    llm = LLM(model, graph_batch_sizes=buckets, max_num_seqs=32)
    ctx.figures["capture_seconds"] = round(time.perf_counter() - t0, 3)
    graphs = llm.engine.runner.graphs
    runners = {b: graphs.lookup(b) for b in buckets}
    captured = [b for b, r in runners.items() if isinstance(r, CudaGraphRunner) and r.graph is not None]
    ctx.figures["captured_buckets"] = captured
    if captured != buckets:
        raise RuntimeError(f"captured buckets {captured}, expected {buckets}")
    wrong = [b for b in range(1, 33) if graphs.lookup(b).batch_size != min(x for x in buckets if x >= b)]
    ctx.figures["lookup_wrong_batch_sizes"] = wrong
    if wrong or graphs.lookup(33) is not None:
        raise RuntimeError(f"lookup picks the wrong bucket for batch sizes {wrong}")
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    diffs, speed = {}, {}
    with torch.inference_mode():
        for batch in (1, 3, 8, 32):  # 3 is padded into the bucket of 4
            llm.generate(mixed_prompts(batch, seed=batch), greedy)
            runner = runners[graphs.bucket_for(batch)]
            # The static buffers still hold the last decode step: replay it, then run it eagerly.
            runner.graph.replay()
            replayed = model.compute_logits(runner.output.clone())
            eager = model.compute_logits(runner._forward())
            diffs[batch] = (replayed - eager).abs().max().item()
            speed[runner.batch_size] = {"replay_ms": round(_time_ms(runner.graph.replay), 4),
                                        "eager_ms": round(_time_ms(runner._forward), 4)}
            speed[runner.batch_size]["speedup"] = round(speed[runner.batch_size]["eager_ms"]
                                                        / speed[runner.batch_size]["replay_ms"], 2)
    ctx.figures.update(replay_vs_eager_logits_max_abs=diffs, decode_step_ms=speed)
    if max(diffs.values()) > 1e-5:
        raise RuntimeError(f"graph replay differs from eager by {max(diffs.values()):.2e} > 1e-5 (fp32)")
    # The engine end to end: graphs vs enforce_eager=True on the same tensors, same greedy tokens.
    prompts = mixed_prompts(8, seed=11)
    graph_tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    eager_llm = LLM(model, enforce_eager=True, max_num_seqs=32)
    eager_tokens = [o.outputs[0].token_ids for o in eager_llm.generate(prompts, greedy)]
    ctx.figures["engine_graph_equals_eager_tokens"] = graph_tokens == eager_tokens
    if graph_tokens != eager_tokens:
        raise RuntimeError("greedy tokens of the graph engine differ from enforce_eager=True")


def step_weight_sync_zero_copy(ctx: StepContext) -> None:
    """A colocated engine on the trainer's own CUDA tensors: an update moves nothing and is seen."""
    import torch

    from rl_engine import LLM, SamplingParams
    from rl_engine.policy import from_pretrained
    from rl_engine.weight_sync import EngineLayout, InProcessTransport, TrainLayout, WeightPublisher, WeightReceiver, \
        plan_sync

    sys.path.insert(0, os.path.join(TESTS, "weight_sync"))
    from wsync_helpers import UNTIED, write_weights

    path = write_weights(os.path.join(ctx.work, "untied"), UNTIED, seed=3)
    trainer_model = from_pretrained(path, device="cuda")
    llm = LLM(trainer_model)
    plan = plan_sync(UNTIED, src=TrainLayout(), dst=EngineLayout(), colocated={0: 0})
    transport = InProcessTransport(zero_copy=True)
    receiver = WeightReceiver(llm, plan, transport=transport)
    publisher = WeightPublisher(trainer_model, plan, src_rank=0, transport=transport)
    prompts, greedy = [[1, 2, 3, 4, 5], [7, 8, 9]], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    before = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    with torch.no_grad():
        for p in trainer_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    publisher.publish(1)
    update = receiver.receive()
    version = receiver.apply(update)
    ctx.figures["sync_seconds"] = round(time.perf_counter() - t0, 6)
    ctx.figures.update(zero_copy=bool(update.zero_copy), segments_moved=len(update.segments), version=version)
    same_storage = ({n: p.data_ptr() for n, p in llm.model.named_parameters()}
                    == {n: p.data_ptr() for n, p in trainer_model.named_parameters()})
    after = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    ctx.figures.update(same_storage=same_storage, tokens_changed=after != before)
    if not (update.zero_copy and not update.segments and version == 1 and same_storage and after != before):
        raise RuntimeError(f"zero-copy sync on CUDA: {ctx.figures}")


def _optional_library(ctx: StepContext, status, tests: list[str]) -> None:
    ctx.figures["available"], ctx.figures["reason"] = status.available, status.reason
    if not status.available:
        raise NotInstalled(status.reason)
    run_pytest(ctx, ["-m", "cuda", *tests], env=_env(TRITON_INTERPRET="0"))


def step_flashinfer(ctx: StepContext) -> None:
    from rl_engine.kernels import backends

    _optional_library(ctx, backends.flashinfer_importable(),
                      ["tests/kernels/test_flashinfer_adapter.py", "tests/kernels/test_sampling.py"])


def step_transformer_engine(ctx: StepContext) -> None:
    from rl_engine.kernels import backends

    _optional_library(ctx, backends.transformer_engine_importable(), ["tests/kernels/test_te_adapter.py"])


def step_bench_train_step(ctx: StepContext) -> None:
    proc = _run([sys.executable, "benchmarks/train_step.py", *TRAIN_STEP_ARGS])
    if proc.returncode:
        raise RuntimeError(f"benchmarks/train_step.py exit {proc.returncode}: {proc.stderr[-800:]}")
    ctx.figures.update(_last_json(proc.stdout))


def step_rl_demo(ctx: StepContext) -> None:
    out = os.path.join(ctx.work, "demo")
    proc = _run([sys.executable, "-m", "rl_engine.cli", *DEMO_ARGS, f"train.output_dir={out}"])
    ctx.figures["exit_code"] = proc.returncode
    accuracy = [line.strip() for line in proc.stdout.splitlines() if "held-out accuracy" in line]
    ctx.figures["accuracy_lines"] = accuracy
    if proc.returncode:
        raise RuntimeError(f"rl-engine train train.device=cuda exit {proc.returncode}: {proc.stderr[-800:]}")
    if len(accuracy) < 2:
        raise RuntimeError("the demo did not print its accuracy before and after RL")


def step_bench_generate(ctx: StepContext) -> None:
    proc = _run([sys.executable, "benchmarks/generate.py", *GENERATE_ARGS])
    if proc.returncode:
        raise RuntimeError(f"benchmarks/generate.py exit {proc.returncode}: {proc.stderr[-800:]}")
    report = _last_json(proc.stdout)
    model = report["models"][0]
    ctx.figures.update({k: v for k, v in report.items() if k.startswith("matmul_peak")})
    ctx.figures.update(params=model["params"],
                       results=[{k: r[k] for k in ("batch", "mode", "engine_tokens_per_s",
                                                   "transformers_tokens_per_s", "speedup")}
                                for r in model["results"]])
