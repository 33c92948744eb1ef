"""Runs `rl_engine.launch.launch` in its own process (so tests can signal it): argv = SPEC_JSON RESULT_JSON."""

import json
import sys

from rl_engine.launch import ProcessSpec, launch


def main() -> int:
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    result = launch([ProcessSpec(**s) for s in cfg["specs"]], log_dir=cfg["log_dir"],
                    grace_period_s=cfg.get("grace_period_s", 10.0))
    out = {"status": result.status, "exit_code": result.exit_code, "summary": result.summary(),
           "processes": [{"name": p.name, "pid": p.pid, "returncode": p.returncode} for p in result.processes]}
    with open(sys.argv[2], "w") as f:
        json.dump(out, f)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
