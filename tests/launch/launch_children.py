"""Tiny child programs for the launcher and heartbeat tests: `python -m launch_children MODE ARGS`."""

import json
import os
import signal
import subprocess
import sys
import time


def write_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def sleep_forever() -> None:
    while True:
        time.sleep(0.1)


def main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "sleep":  # PIDFILE [SIGNALFILE]: record a forwarded signal, then exit 0
        if len(args) > 1:
            def record(signum, frame):
                write_atomic(args[1], signal.Signals(signum).name)
                sys.exit(0)
            signal.signal(signal.SIGINT, record)
            signal.signal(signal.SIGTERM, record)
        write_atomic(args[0], str(os.getpid()))
        sleep_forever()
    elif mode == "stubborn":  # PIDFILE: ignores SIGINT and SIGTERM, so only SIGKILL stops it
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        write_atomic(args[0], str(os.getpid()))
        sleep_forever()
    elif mode == "grandchild":  # PIDFILE: starts a grandchild (in this process group)
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
        write_atomic(args[0], f"{os.getpid()} {proc.pid}")
        sleep_forever()
    elif mode == "fail":  # CODE FILES...: once FILES exist, print and exit CODE
        deadline = time.monotonic() + 20
        while not all(os.path.exists(p) for p in args[1:]) and time.monotonic() < deadline:
            time.sleep(0.02)
        for i in range(30):
            print(f"working {i}")
        print("fatal: something broke", file=sys.stderr)
        sys.exit(int(args[0]))
    elif mode == "ok":
        print("done")
    elif mode == "env":  # OUT
        keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PYTHONUNBUFFERED",
                "RL_ENGINE_PROCESS_NAME", "RL_ENGINE_LAUNCHER_PID", "EXTRA"]
        info = {k: os.environ.get(k) for k in keys}
        info.update(pid=os.getpid(), pgid=os.getpgid(0), sid=os.getsid(0), argv=sys.argv[1:])
        import ctypes

        sig = ctypes.c_int(0)
        ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
        info["pdeathsig"] = sig.value
        write_atomic(args[0], json.dumps(info))
    elif mode in ("dist", "dist_socket"):  # OUT: a real gloo all-reduce through the launcher's environment
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        from rl_engine.launch.rendezvous import init_process_group_from_env

        if mode == "dist":  # rank 0 binds MASTER_PORT itself
            dist.init_process_group("gloo", init_method="env://")
        else:  # rank 0 serves the socket the launcher bound (master_socket=True)
            init_process_group_from_env("gloo", timeout=timedelta(seconds=120))
        t = torch.tensor([dist.get_rank() + 1.0])
        dist.all_reduce(t)
        write_atomic(args[0], json.dumps({"rank": dist.get_rank(), "sum": t.item()}))
        dist.destroy_process_group()
    elif mode == "watchdog_parent":  # PIDFILE: starts a child that dies with it via the watchdog
        subprocess.Popen([sys.executable, "-m", "launch_children", "watchdog_child", args[0], str(os.getpid())])
        sleep_forever()
    elif mode == "watchdog_child":  # PIDFILE PARENT
        from rl_engine.launch.child import die_with_parent

        how = die_with_parent(int(args[1]), use_prctl=False)
        write_atomic(args[0], f"{os.getpid()} {how}")
        sleep_forever()
    elif mode == "heartbeat":  # ADDRESS ID PIDFILE
        from rl_engine.launch.heartbeat import HeartbeatSender

        HeartbeatSender(args[0], sender_id=args[1], interval_s=0.2).start()
        write_atomic(args[2], str(os.getpid()))
        sleep_forever()
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
