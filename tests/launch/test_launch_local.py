"""Local launcher with real processes: failure propagation, signal forwarding, no orphans (also
when the launcher is SIGKILLed), torch.distributed environment, logs and the summary."""

import errno
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rl_engine.launch import LocalLauncher, ProcessSpec, launch

HERE = Path(__file__).resolve().parent
ENV = {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="checks processes through /proc")


def spec(name: str, *args: str, **kw) -> ProcessSpec:
    kw["env"] = {**ENV, **kw.get("env", {})}
    return ProcessSpec(name=name, module="launch_children", args=args, **kw)


def gone(pid: int) -> bool:
    """Not running: no such process, or a zombie nobody reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_for(predicate, timeout_s: float = 10.0) -> bool:
    """Liveness helper: poll until `predicate()` holds or the (generous) bound passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def read_pids(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()]


@pytest.fixture
def leftovers():
    """Pids a test started; any still alive at teardown (a failed test) are SIGKILLed."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_child_failure_stops_the_others_and_is_reported(tmp_path):
    pa, pb = tmp_path / "a.pid", tmp_path / "b.pid"
    result = launch([spec("sleeper", "sleep", str(pa)), spec("stubborn", "stubborn", str(pb)),
                     spec("broken", "fail", "3", str(pa), str(pb))],
                    log_dir=tmp_path / "logs", grace_period_s=1.0)
    assert result.status == "failed" and result.exit_code == 3
    assert result.failed is not None and result.failed.name == "broken" and result.failed.returncode == 3
    assert not result.failed.stopped_by_launcher
    assert result.failed_log_tail[-1] == "fatal: something broke"  # stderr goes to the same log
    assert "working 29" in result.failed_log_tail and "working 0" not in result.failed_log_tail
    by_name = {p.name: p for p in result.processes}
    assert by_name["sleeper"].returncode == -signal.SIGTERM and by_name["sleeper"].stopped_by_launcher
    assert by_name["stubborn"].returncode == -signal.SIGKILL  # ignored SIGTERM: killed after the grace
    summary = result.summary()
    assert summary.startswith("run failed: process 'broken'") and "exited with code 3" in summary
    assert "stubborn" in summary and "killed by SIGKILL (stopped by the launcher)" in summary
    assert summary.endswith("fatal: something broke")
    for pid in (*read_pids(pa), *read_pids(pb)):
        assert gone(pid)
    assert (tmp_path / "logs" / "broken.log").read_text().count("working") == 30


def test_run_ends_when_an_ends_run_process_finishes(tmp_path):
    echo = io.BytesIO()
    result = LocalLauncher([spec("sleeper", "sleep", str(tmp_path / "a.pid")),
                            spec("main", "ok", ends_run=True, echo=True)],
                           log_dir=tmp_path, grace_period_s=5.0, echo_stream=echo).run()
    assert result.status == "completed" and result.exit_code == 0 and result.failed is None
    by_name = {p.name: p for p in result.processes}
    assert by_name["main"].returncode == 0 and not by_name["main"].stopped_by_launcher
    assert by_name["sleeper"].stopped_by_launcher and gone(by_name["sleeper"].pid)
    assert echo.getvalue() == b"done\n" and (tmp_path / "main.log").read_bytes() == b"done\n"


def test_all_processes_finishing_completes_the_run(tmp_path):
    result = launch([spec("a", "ok"), spec("b", "ok")], log_dir=tmp_path)
    assert result.status == "completed" and [p.returncode for p in result.processes] == [0, 0]
    assert result.summary().startswith("run completed: 2 processes")


def test_environment_for_torch_distributed(tmp_path):
    outs = [tmp_path / f"{i}.json" for i in range(3)]
    launcher = LocalLauncher([spec("rank1", "env", str(outs[1]), dist_rank=1),
                              spec("rank0", "env", str(outs[0]), dist_rank=0),
                              spec("coordinator", "env", str(outs[2]), "x y", env={"EXTRA": "1"})],
                             log_dir=tmp_path, env={"RANK": "99"})
    assert launcher.run().status == "completed"
    r1, r0, coord = (json.loads(p.read_text()) for p in (outs[1], outs[0], outs[2]))
    assert (r0["RANK"], r1["RANK"], r0["WORLD_SIZE"], r1["LOCAL_RANK"]) == ("0", "1", "2", "1")
    assert r0["MASTER_ADDR"] == r1["MASTER_ADDR"] == "127.0.0.1"
    assert r0["MASTER_PORT"] == r1["MASTER_PORT"] == str(launcher.master_port)
    assert coord["RANK"] is None and coord["MASTER_PORT"] is None  # not a rank: dist variables removed
    assert coord["EXTRA"] == "1" and coord["argv"] == ["env", str(outs[2]), "x y"]
    assert coord["RL_ENGINE_PROCESS_NAME"] == "coordinator" and coord["PYTHONUNBUFFERED"] == "1"
    assert coord["RL_ENGINE_LAUNCHER_PID"] == str(os.getpid())
    for info in (r0, r1, coord):
        assert info["pgid"] == info["pid"] == info["sid"]  # each child leads its own session
        assert info["pdeathsig"] == signal.SIGKILL  # armed by rl_engine.launch.child


def test_gloo_all_reduce_through_the_launcher_env(tmp_path):
    outs = [tmp_path / f"{i}.json" for i in range(2)]
    result = launch([spec(f"trainer{i}", "dist", str(outs[i]), dist_rank=i) for i in range(2)],
                    log_dir=tmp_path)
    assert result.status == "completed", result.summary()
    assert [json.loads(p.read_text()) for p in outs] == [{"rank": 0, "sum": 3.0}, {"rank": 1, "sum": 3.0}]


def test_master_port_is_held_from_its_choice_until_rank0_serves_it(tmp_path):
    """The launcher binds MASTER_PORT before it publishes it and hands the socket to rank 0: another process
    cannot take the port in between (with a free port picked and closed, the stranger's bind succeeds and
    rank 0 then fails with EADDRINUSE)."""
    outs = [tmp_path / f"{i}.json" for i in range(2)]
    launcher = LocalLauncher([spec(f"trainer{i}", "dist_socket", str(outs[i]), dist_rank=i, master_socket=i == 0)
                              for i in range(2)], log_dir=tmp_path)
    with socket.socket() as stranger, pytest.raises(OSError) as taken:
        stranger.bind(("127.0.0.1", launcher.master_port))
    assert taken.value.errno == errno.EADDRINUSE
    result = launcher.run()
    assert result.status == "completed", result.summary()
    assert [json.loads(p.read_text()) for p in outs] == [{"rank": 0, "sum": 3.0}, {"rank": 1, "sum": 3.0}]


def test_master_port_given_in_use_is_refused_at_once(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        with pytest.raises(OSError, match=rf"cannot listen on 127.0.0.1:{holder.getsockname()[1]}.*in use"):
            LocalLauncher([spec("rank0", "ok", dist_rank=0)], log_dir=tmp_path, master_port=holder.getsockname()[1])
    with pytest.raises(ValueError, match="master_socket=True is for the process with dist_rank 0"):
        LocalLauncher([spec("rank1", "ok", dist_rank=1, master_socket=True), spec("rank0", "ok", dist_rank=0)],
                      log_dir=tmp_path)


def test_invalid_specs():
    with pytest.raises(ValueError, match="unique"):
        LocalLauncher([spec("a", "ok"), spec("a", "ok")], log_dir="x")
    with pytest.raises(ValueError, match=r"dist_rank values must be 0..1"):
        LocalLauncher([spec("a", "ok", dist_rank=0), spec("b", "ok", dist_rank=2)], log_dir="x")
    with pytest.raises(ValueError, match="must match"):
        LocalLauncher([spec("a/b", "ok")], log_dir="x")


def _start_launcher(tmp_path: Path, specs: list[ProcessSpec], pidfiles: list[Path]) -> subprocess.Popen:
    cfg = {"log_dir": str(tmp_path / "logs"), "grace_period_s": 1.0,
           "specs": [{"name": s.name, "module": s.module, "args": list(s.args), "env": dict(s.env)} for s in specs]}
    (tmp_path / "spec.json").write_text(json.dumps(cfg))
    launcher = subprocess.Popen([sys.executable, str(HERE / "run_launcher.py"), str(tmp_path / "spec.json"),
                                 str(tmp_path / "result.json")], env={**os.environ, **ENV})
    assert wait_for(lambda: all(p.exists() for p in pidfiles)), "children did not start"
    return launcher


def test_sigint_to_the_launcher_is_forwarded_and_leaves_no_orphans(tmp_path, leftovers):
    pa, pb, pc, sig_file = (tmp_path / n for n in ("a.pid", "b.pid", "c.pid", "a.signal"))
    launcher = _start_launcher(tmp_path, [spec("polite", "sleep", str(pa), str(sig_file)),
                                          spec("stubborn", "stubborn", str(pb)),
                                          spec("parent", "grandchild", str(pc))], [pa, pb, pc])
    pids = read_pids(pa) + read_pids(pb) + read_pids(pc)  # pc holds the child and its grandchild
    leftovers += [launcher.pid, *pids]
    assert not any(gone(p) for p in pids)
    launcher.send_signal(signal.SIGINT)
    assert launcher.wait(timeout=30) == 128 + signal.SIGINT
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "interrupted" and "interrupted by SIGINT" in result["summary"]
    assert sig_file.read_text() == "SIGINT"  # the signal reached the child, which exited cleanly
    assert {p["name"]: p["returncode"] for p in result["processes"]}["polite"] == 0
    assert wait_for(lambda: all(gone(p) for p in pids)), [p for p in pids if not gone(p)]


def test_sigkill_of_the_launcher_kills_its_children(tmp_path, leftovers):
    pa, pb = tmp_path / "a.pid", tmp_path / "b.pid"
    launcher = _start_launcher(tmp_path, [spec("a", "sleep", str(pa)), spec("b", "stubborn", str(pb))], [pa, pb])
    pids = read_pids(pa) + read_pids(pb)
    leftovers += pids
    launcher.kill()  # SIGKILL: no handler, no cleanup; only PR_SET_PDEATHSIG can act
    launcher.wait(timeout=30)
    assert wait_for(lambda: all(gone(p) for p in pids)), [p for p in pids if not gone(p)]


def test_watchdog_fallback_kills_the_child_when_its_parent_dies(tmp_path, leftovers):
    pidfile = tmp_path / "w.pid"
    parent = subprocess.Popen([sys.executable, "-m", "launch_children", "watchdog_parent", str(pidfile)],
                              env={**os.environ, **ENV})
    try:
        assert wait_for(lambda: pidfile.exists()), "watchdog child did not start"
        pid_text, how = pidfile.read_text().split()
        leftovers.append(int(pid_text))
        assert how == "watchdog" and not gone(int(pid_text))
    finally:
        parent.kill()
        parent.wait(timeout=30)
    assert wait_for(lambda: gone(int(pid_text)))


def test_second_signal_kills_at_once(tmp_path):
    pb = tmp_path / "b.pid"
    launcher = LocalLauncher([spec("stubborn", "stubborn", str(pb))], log_dir=tmp_path, grace_period_s=600.0)
    with launcher:
        assert wait_for(pb.exists)
        launcher.request_stop(signal.SIGINT)  # ignored by the child; the grace period would be 600 s
        assert launcher.poll() is None
        launcher.request_stop(signal.SIGINT)  # a second Ctrl-C: SIGKILL now
        result = launcher.wait()
    assert result.status == "interrupted" and result.exit_code == 130
    assert result.processes[0].returncode == -signal.SIGKILL


def test_exception_in_the_caller_stops_the_children(tmp_path):
    pa = tmp_path / "a.pid"
    with pytest.raises(RuntimeError, match="caller bug"):
        with LocalLauncher([spec("a", "sleep", str(pa))], log_dir=tmp_path, grace_period_s=5.0):
            assert wait_for(pa.exists)
            raise RuntimeError("caller bug")
    assert wait_for(lambda: gone(read_pids(pa)[0]))
