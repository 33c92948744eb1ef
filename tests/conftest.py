import os
import sys

import pytest
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


@pytest.fixture(autouse=True)
def _suite_threads() -> None:
    """Every test starts with the suite's thread count: a GRPOTrainer sets its process's to
    train.threads (1 by default), which would otherwise hold for every later test of the session."""
    torch.set_num_threads(int(_threads))


# RL_ENGINE_TEST_DEVICE=cuda re-runs the tests that take the `test_device` fixture (engine, graph
# cache, log-prob contract, fused log-probs) on a GPU; scripts/gpu_check.sh does that (issue 23).
_test_device = os.environ.get("RL_ENGINE_TEST_DEVICE", "cpu")
if _test_device != "cpu" and not _test_device.startswith("cuda"):
    raise ValueError(f"RL_ENGINE_TEST_DEVICE must be cpu, cuda or cuda:<index>, got {_test_device!r}")
if _test_device.startswith("cuda") and not torch.cuda.is_available():
    raise ValueError(f"RL_ENGINE_TEST_DEVICE={_test_device} but torch sees no CUDA device")


@pytest.fixture(scope="session")
def test_device() -> torch.device:
    """The device of the tests that can run anywhere: cpu unless RL_ENGINE_TEST_DEVICE says otherwise."""
    return torch.device(_test_device)
