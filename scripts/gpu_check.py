"""The GPU check (issue 23): every CUDA path of the project on one GPU, in at most 8 minutes, one JSON
report. Run it through scripts/gpu_check.sh, whose header documents the report's schema.

A script, not a module of `rl_engine`: it drives tests/ and benchmarks/, which are not part of the
installed package, and the package must not depend on them. Each step runs in a child process of its
own (`--run-step`) under its own time budget, so a hang, a crash of the CUDA context or a timeout
costs that step alone: it is recorded as failed and the next step runs. The whole run stops starting
steps once the global budget is spent (the rest are recorded as skipped).

    python scripts/gpu_check.py OUT_DIR [--only a,b] [--budget-s 470]
    python scripts/gpu_check.py --dry-run [OUT_DIR]   # on CPU: steps, wheels, schema, imports
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SCHEMA = "rl_engine.gpu_check/1"
STATUSES = ("passed", "failed", "skipped", "not_installed")
WHEEL_DIR = os.path.join(REPO, ".whl")
WHEEL_LIST = os.path.join(HERE, "gpu_wheels.txt")


@dataclass(frozen=True)
class Step:
    name: str
    budget_s: int
    what: str
    modules: tuple[str, ...] = ()  # imported by the dry run: the step's code path exists
    files: tuple[str, ...] = ()  # must exist (relative to the repository)
    benchmark: tuple[str, str] | None = None  # (script, name of its args in gpu_check_steps)


# Ordered by value for the time: correctness first, benchmarks last. Budgets sum past the global
# budget on purpose: most steps finish well inside theirs.
STEPS = (
    Step("env", 20, "CUDA device, versions, the kernel registry's choice per op",
         ("torch", "rl_engine.kernels.registry")),
    Step("cuda_tests", 45, "pytest -m cuda: the tests that skip without CUDA", ("pytest",),
         ("tests/kernels/test_te_adapter.py", "tests/kernels/test_flashinfer_adapter.py")),
    Step("triton_compiled", 80, "every Triton kernel compiled (TRITON_INTERPRET=0) vs its torch reference",
         ("triton", "rl_engine.kernels.backends"), ("tests/kernels/conftest.py",)),
    Step("device_tests", 50, "engine/graph/log-prob/policy tests with RL_ENGINE_TEST_DEVICE=cuda",
         ("pytest",), ("tests/inference/test_logprobs.py", "tests/inference/test_graph_cache.py",
                       "tests/inference/test_hf_parity.py", "tests/policy/test_policy_logprobs.py")),
    Step("engine_parity", 40, "greedy CUDA fp32 (identical) and bf16 (agreement) vs CPU fp32; log-prob contract",
         ("rl_engine.inference.llm", "rl_engine.policy"), ("tests/hf_models.py", "tests/inference_helpers.py")),
    Step("cuda_graphs", 45, "capture per bucket, lookup, replay == eager (<= 1e-5 fp32), replay speed-up",
         ("rl_engine.inference.graph_cache", "rl_engine.inference.model_runner")),
    Step("weight_sync_zero_copy", 25, "colocated engine on the trainer's CUDA tensors: zero-copy update",
         ("rl_engine.weight_sync",), ("tests/weight_sync/wsync_helpers.py",)),
    Step("flashinfer", 15, "FlashInfer attention and sampling tests (not_installed when absent)",
         ("rl_engine.kernels.flashinfer_adapter",)),
    Step("transformer_engine", 15, "Transformer Engine linear tests (not_installed when absent)",
         ("rl_engine.kernels.te_adapter",)),
    Step("bench_train_step", 30, "benchmarks/train_step.py --device cuda (bf16)",
         benchmark=("benchmarks/train_step.py", "TRAIN_STEP_ARGS")),
    Step("rl_demo", 75, "rl-engine train train.device=cuda (the built-in demo)",
         ("rl_engine.cli", "rl_engine.train_cli")),
    Step("bench_generate", 90, "benchmarks/generate.py on CUDA vs transformers, Qwen2-0.5B shape, bf16, batch 1 and 64",
         benchmark=("benchmarks/generate.py", "GENERATE_ARGS")),
)
STEP_NAMES = [s.name for s in STEPS]
DEFAULT_BUDGET_S = 470  # 8 minutes less the wheel install and the report


def validate_report(report: dict) -> list[str]:
    """What is wrong with a report against the schema in gpu_check.sh's header (empty: valid)."""
    problems = []
    expect = {"schema": str, "dry_run": bool, "started_at": str, "seconds": (int, float),
              "budget_seconds": (int, float), "host": dict, "wheels": dict, "steps": list, "summary": dict}
    for key, kind in expect.items():
        if not isinstance(report.get(key), kind):
            problems.append(f"{key}: expected {kind}, got {type(report.get(key)).__name__}")
    if report.get("schema") != SCHEMA:
        problems.append(f"schema: expected {SCHEMA!r}")
    wheels = report.get("wheels") or {}
    for key in ("present", "missing", "installed"):
        if key not in wheels:
            problems.append(f"wheels.{key} missing")
    names = []
    for i, step in enumerate(report.get("steps") or []):
        for key, kind in (("name", str), ("status", str), ("seconds", (int, float)), ("budget_seconds", int),
                          ("figures", dict), ("what", str)):
            if not isinstance(step.get(key), kind):
                problems.append(f"steps[{i}].{key}: expected {kind}")
        if step.get("status") not in STATUSES:
            problems.append(f"steps[{i}].status {step.get('status')!r} not one of {STATUSES}")
        if not (step.get("error") is None or isinstance(step.get("error"), str)):
            problems.append(f"steps[{i}].error must be null or a string")
        if step.get("status") in ("failed", "not_installed") and not step.get("error"):
            problems.append(f"steps[{i}] is {step.get('status')} without an error text")
        names.append(step.get("name"))
    if names and sorted(names) != sorted(set(names)):
        problems.append(f"duplicate step names: {names}")
    counts = {s: sum(step.get("status") == s for step in report.get("steps") or []) for s in STATUSES}
    if report.get("summary") != counts:
        problems.append(f"summary {report.get('summary')} != counts of statuses {counts}")
    return problems


def wheel_state() -> dict:
    """Wheels named in gpu_wheels.txt, found in .whl/ or not (absent in a fresh clone: not a failure)."""
    wanted = [line.split("==")[0].strip() for line in open(WHEEL_LIST) if line.strip() and not line.startswith("#")]
    files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(WHEEL_DIR, "*.whl")))

    def norm(name: str) -> str:
        return name.lower().replace("-", "_")

    present = [w for w in wanted if any(norm(f.split("-")[0]) == norm(w) for f in files)]
    return {"dir": ".whl", "files": files, "bytes": sum(os.path.getsize(os.path.join(WHEEL_DIR, f)) for f in files),
            "present": present, "missing": [w for w in wanted if w not in present],
            "installed": os.environ.get("RL_ENGINE_GPU_WHEELS", "no")}


def host_info() -> dict:
    info = {"python": sys.version.split()[0], "executable": sys.executable}
    try:
        import torch

        info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name(0)
    except Exception as exc:  # a broken torch is a finding of the report, not a crash of the driver
        info["torch_error"] = f"{type(exc).__name__}: {exc}"
    return info


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _finish(report: dict, out_dir: str | None, started: float) -> dict:
    report["seconds"] = round(time.monotonic() - started, 2)
    report["summary"] = {s: sum(step["status"] == s for step in report["steps"]) for s in STATUSES}
    problems = validate_report(report)
    if problems:
        raise AssertionError(f"the report does not match its schema: {problems}")
    if out_dir:
        with open(os.path.join(out_dir, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
    return report


def _dry_step(step: Step) -> dict:
    """Checks the step's code path on CPU: files exist, modules import, benchmark flags parse."""
    checked, errors = [], []
    for rel in step.files:
        (checked if os.path.exists(os.path.join(REPO, rel)) else errors).append(rel)
    for name in step.modules:
        try:
            importlib.import_module(name)
            checked.append(name)
        except Exception as exc:
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
    figures: dict = {"dry_run": True}
    if step.benchmark is not None:
        script, args_name = step.benchmark
        import gpu_check_steps

        args = getattr(gpu_check_steps, args_name)
        try:
            spec = importlib.util.spec_from_file_location(f"_bench_{step.name}", os.path.join(REPO, script))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            module.build_parser().parse_args(args)
            checked.append(f"{script} {' '.join(args)}")
        except (Exception, SystemExit) as exc:
            errors.append(f"{script} does not take {args}: {type(exc).__name__}: {exc}")
    import gpu_check_steps

    if not callable(getattr(gpu_check_steps, f"step_{step.name}", None)):
        errors.append(f"gpu_check_steps.step_{step.name} is missing")
    figures["checked"] = checked
    return {"status": "failed" if errors else "skipped", "error": "; ".join(errors) or None, "figures": figures}


def _run_step(step: Step, *, budget_s: float, work_dir: str, log) -> dict:
    """The step in a child process of its own session (killed whole on timeout)."""
    work = os.path.join(work_dir, step.name)
    os.makedirs(work, exist_ok=True)
    result_file = os.path.join(work, "result.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--run-step", step.name, "--work", work]
    log.write(f"\n===== {step.name} (budget {budget_s:.0f} s) {_now()}\n")
    log.flush()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    result = {"status": "failed", "error": None, "figures": {}}
    if os.path.exists(result_file):
        with open(result_file) as f:
            result.update(json.load(f))
    if proc.returncode == -signal.SIGKILL:
        result.update(status="failed", error=f"timed out after {budget_s:.0f} s (step budget)")
    elif result["status"] == "failed" and not result["error"]:
        result["error"] = f"the step's process exited {proc.returncode} without a result; see the log"
    return result


def run_one_step(name: str, work: str) -> int:
    """Child side of `_run_step`: run the step function, write its result file."""
    import traceback

    import gpu_check_steps as steps

    ctx = steps.StepContext(work=work)
    result = {"status": "passed", "error": None}
    try:
        getattr(steps, f"step_{name}")(ctx)
    except steps.NotInstalled as exc:
        result = {"status": "not_installed", "error": str(exc) or "not installed"}
    except BaseException as exc:
        traceback.print_exc()
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:4000]}
    result["figures"] = ctx.figures
    with open(os.path.join(work, "result.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    return 0 if result["status"] != "failed" else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", nargs="?", help="report.json and gpu_check.log go here (required unless --dry-run)")
    ap.add_argument("--dry-run", action="store_true", help="on CPU: list steps, check wheels, imports and schema")
    ap.add_argument("--only", help=f"comma-separated steps of: {', '.join(STEP_NAMES)}")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="all steps together (seconds)")
    ap.add_argument("--work-dir", help="the steps' scratch files (checkpoints, junit XML); default: a new "
                    "folder under the system temp dir, so that OUT_DIR holds only report.json and the log")
    ap.add_argument("--run-step", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sys.path.insert(0, HERE)
    if args.run_step:
        return run_one_step(args.run_step, args.work)
    selected = list(STEPS)
    if args.only:
        unknown = [n for n in args.only.split(",") if n not in STEP_NAMES]
        if unknown:
            ap.error(f"unknown step(s) {unknown}; steps are: {', '.join(STEP_NAMES)}")
        selected = [s for s in STEPS if s.name in args.only.split(",")]
    if args.budget_s <= 0:
        ap.error(f"--budget-s must be positive, got {args.budget_s}")
    if not args.dry_run and not args.out_dir:
        ap.error("OUT_DIR is required (or --dry-run)")
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            ap.error("torch sees no CUDA device: run this on a GPU machine, or use --dry-run")
    out_dir = os.path.abspath(args.out_dir) if args.out_dir else None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    work_dir = None
    if not args.dry_run:
        work_dir = os.path.abspath(args.work_dir) if args.work_dir else tempfile.mkdtemp(prefix="rl_engine_gpu_check_")
    started = time.monotonic()
    report = {"schema": SCHEMA, "dry_run": args.dry_run, "started_at": _now(), "seconds": 0.0,
              "budget_seconds": args.budget_s, "host": host_info(), "wheels": wheel_state(), "steps": [],
              "summary": {}}
    w = report["wheels"]
    print(f"wheels in .whl/: {', '.join(w['present']) or 'none'}; missing: {', '.join(w['missing']) or 'none'}"
          f" ({w['bytes'] / 2**20:.1f} MiB); installed: {w['installed']}", flush=True)
    log_path = os.path.join(out_dir, "gpu_check.log") if out_dir else os.devnull
    with open(log_path, "a") as log:
        for step in selected:
            t0 = time.monotonic()
            left = args.budget_s - (t0 - started)
            if args.dry_run:
                result = _dry_step(step)
            elif left < 5:
                result = {"status": "skipped", "error": "the global budget is spent", "figures": {}}
            else:
                result = _run_step(step, budget_s=min(step.budget_s, left), work_dir=work_dir, log=log)
            report["steps"].append({"name": step.name, "what": step.what, "budget_seconds": step.budget_s,
                                    "seconds": round(time.monotonic() - t0, 2), **result})
            line = f"{step.name:<22} {result['status']:<13} {report['steps'][-1]['seconds']:7.1f} s"
            if args.dry_run:
                line += f"  {step.what} (budget {step.budget_s} s)"
            print(line + (f"  {result['error'][:150]}" if result["error"] else ""), flush=True)
    report["finished_at"] = _now()
    _finish(report, out_dir, started)
    print(f"report: {os.path.join(out_dir, 'report.json') if out_dir else '(not written)'}; "
          f"summary: {report['summary']}", flush=True)
    return 1 if report["summary"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
