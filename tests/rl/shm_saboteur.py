"""Fault injection for tests/rl/test_shm_cleanup.py: a required process of a run that fails on purpose
once the run has written its first metrics row (weights have gone through shared memory by then).

    python -m shm_saboteur OUTPUT_DIR
"""

from __future__ import annotations

import os
import sys
import time


def main() -> int:
    metrics = os.path.join(sys.argv[1], "metrics.jsonl")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
            print("saboteur: failing the run on purpose", flush=True)
            return 3
        time.sleep(0.05)
    print("saboteur: the run wrote no metrics in time", flush=True)
    return 4


if __name__ == "__main__":
    sys.exit(main())
