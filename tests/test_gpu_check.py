"""scripts/gpu_check.sh on CPU: the dry run lists every step and passes without wheels, writes a report
that matches its schema; bad arguments and a machine without CUDA are refused (issue 23)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import gpu_check  # noqa: E402


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_check.sh"), *args], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHON=sys.executable, **env))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("gpu_check_dry")
    proc = run_script("--dry-run", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(os.listdir(out)) == ["gpu_check.log", "report.json"]  # scratch files go elsewhere
    return proc, json.loads((out / "report.json").read_text())


def test_dry_run_lists_every_step_and_writes_a_valid_report(dry_run):
    proc, report = dry_run
    for name in gpu_check.STEP_NAMES:
        assert f"\n{name} " in "\n" + proc.stdout
    assert "wheels in .whl/:" in proc.stdout
    assert gpu_check.validate_report(report) == []
    assert report["dry_run"] is True
    assert [s["name"] for s in report["steps"]] == gpu_check.STEP_NAMES
    # On CPU every step's code path was checked, none was run.
    assert {s["status"] for s in report["steps"]} == {"skipped"}
    assert all(s["figures"]["checked"] for s in report["steps"])
    assert set(report["wheels"]["present"]) | set(report["wheels"]["missing"]) == {
        "pyzmq", "msgspec", "cryptography", "cffi", "pycparser"}


def test_every_step_has_a_body_and_the_budgets_fit_eight_minutes():
    import gpu_check_steps

    for step in gpu_check.STEPS:
        assert callable(getattr(gpu_check_steps, f"step_{step.name}"))
        assert step.budget_s <= gpu_check.DEFAULT_BUDGET_S
    assert gpu_check.DEFAULT_BUDGET_S + 10 <= 8 * 60  # + wheel install and report


def test_schema_validation_rejects_broken_reports(dry_run):
    good = dry_run[1]
    breakages = {
        "unknown status": lambda r: r["steps"][0].update(status="ok"),
        "failed without error": lambda r: (r["steps"][0].update(status="failed", error=None),
                                           r["summary"].update(skipped=r["summary"]["skipped"] - 1, failed=1)),
        "summary mismatch": lambda r: r["summary"].update(passed=3),
        "schema name": lambda r: r.update(schema="other/1"),
        "missing wheels field": lambda r: r["wheels"].pop("missing"),
        "figures not a dict": lambda r: r["steps"][1].update(figures=[]),
        "duplicate step": lambda r: (r["steps"].append(copy.deepcopy(r["steps"][0])),
                                     r["summary"].update(skipped=r["summary"]["skipped"] + 1)),
    }
    for what, breaks in breakages.items():
        report = copy.deepcopy(good)
        breaks(report)
        assert gpu_check.validate_report(report), what


def test_wheels_present_are_found_by_package_name(tmp_path, monkeypatch):
    (tmp_path / "pyzmq-27.3.0-cp312-abi3-manylinux_2_28_x86_64.whl").write_bytes(b"x")
    (tmp_path / "msgspec-0.23.0-cp312-cp312-manylinux_2_17_x86_64.whl").write_bytes(b"yy")
    monkeypatch.setattr(gpu_check, "WHEEL_DIR", str(tmp_path))
    state = gpu_check.wheel_state()
    assert state["present"] == ["pyzmq", "msgspec"] and "cryptography" in state["missing"]
    assert state["bytes"] == 3


@pytest.mark.parametrize("args, message", [
    (["--dry-run", "--only", "env,nope"], "unknown step(s) ['nope']"),
    ([], "OUT_DIR is required"),
    (["--dry-run", "--budget-s", "0"], "--budget-s must be positive"),
])
def test_bad_arguments_exit_2_with_the_reason(args, message):
    proc = run_script(*args)
    assert proc.returncode == 2 and message in proc.stderr


def test_only_runs_the_named_steps(tmp_path):
    proc = run_script("--dry-run", "--only", "cuda_graphs,env", str(tmp_path))
    assert proc.returncode == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["name"] for s in report["steps"]] == ["env", "cuda_graphs"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_real_run_without_cuda_is_refused(tmp_path):
    proc = run_script(str(tmp_path))
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    assert not (tmp_path / "report.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="uses steps that fail or are absent without CUDA")
def test_steps_run_in_child_processes_failures_and_timeouts_are_recorded(tmp_path):
    """The driver's own machinery on CPU: a missing library, a failing step, a step past its budget."""
    steps = {s.name: s for s in gpu_check.STEPS}
    with open(tmp_path / "log", "w") as log:
        absent = gpu_check._run_step(steps["flashinfer"], budget_s=60, work_dir=str(tmp_path), log=log)
        failed = gpu_check._run_step(steps["env"], budget_s=60, work_dir=str(tmp_path), log=log)
        late = gpu_check._run_step(steps["env"], budget_s=0.05, work_dir=str(tmp_path), log=log)
    assert absent["status"] == "not_installed" and absent["error"] and absent["figures"]["available"] is False
    assert failed["status"] == "failed" and "no CUDA device" in failed["error"]
    assert late["status"] == "failed" and "timed out" in late["error"]
    assert "===== env" in (tmp_path / "log").read_text()
    assert json.loads((tmp_path / "flashinfer" / "result.json").read_text())["status"] == "not_installed"
