import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
# One intra-op thread: the models in tests are tiny, so a second thread buys little, and on a
# loaded 2-core machine an OpenMP team whose second thread is descheduled can make a test 50x slower.
# RL_ENGINE_TEST_THREADS=2 runs the suite with another thread count, to check that no tolerance
# holds only for one reduction order (issue 22; with ATEN_CPU_CAPABILITY=avx2 / default likewise).
_threads = os.environ.get("RL_ENGINE_TEST_THREADS", "1")
if not _threads.isdigit() or int(_threads) < 1:
    raise ValueError(f"RL_ENGINE_TEST_THREADS must be a positive integer, got {_threads!r}")
torch.set_num_threads(int(_threads))
