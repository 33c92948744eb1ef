"""Thread count and OpenMP wait policy for a shared, loaded CPU machine.

torch 2.13's CPU build runs its intra-op pool on GNU OpenMP (the `libgomp.so.1` bundled in
`torch/lib`; `torch.__config__.parallel_info()` says "ATen parallel backend: OpenMP"), and MKL's
threads use the same runtime. Two things make decode collapse when another process keeps a core
busy (measured: 29-540 tok/s at 2 threads where a quiet machine gives ~4.9k):

- every parallel region ends in a barrier that waits for all of its threads; a thread whose core is
  taken runs only when the scheduler preempts the other process, so each region can cost a
  scheduler time slice. Fewer threads than the free cores avoids that: `FreeCoreThreads`.
- libgomp's idle threads spin (OMP_WAIT_POLICY unset: about 300k spins, ~0.1-1 ms, after every
  region) and take CPU from the process that owns the core, which then holds it longer.
  `OMP_WAIT_POLICY=PASSIVE` makes them sleep at once. libgomp reads it once, when it is loaded
  (the first `import torch`), so it must be in the environment before that: `passive_wait_env()`
  gives the environment for a child process, and `wait_policy()` reports what the running process
  got. (`KMP_BLOCKTIME` is Intel's OpenMP runtime's knob; libgomp ignores it.)

`FreeCoreThreads` measures, every `interval` seconds, how many of this process's allowed cores
other processes kept busy (from /proc/stat, minus this process's own CPU time; niced processes do
not count against a process at normal priority, since the scheduler gives them ~1.5% of a core
beside it) and sets `torch.set_num_threads` to the free cores, between 1 and the count at start.

`single_thread_below` runs an engine step of a small model with little work on one thread, where
splitting ops that small costs more than it gains (figures at `SMALL_STEP_FLOPS`). `StepThreads` does it
for the steps an engine repeats (decode steps, keyed by their rows): it times such a step at one thread and
at all of them, the first steps of that size, and keeps the faster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import sys
import time
from collections.abc import Iterator

import torch

logger = logging.getLogger(__name__)


def wait_policy() -> str:
    """The OpenMP wait policy this process's runtime was loaded with ("PASSIVE", "ACTIVE" or
    "default (spin, then sleep)"): libgomp took it from the environment when torch was imported."""
    value = os.environ.get("OMP_WAIT_POLICY")
    if value is None or "torch" not in sys.modules:
        return "default (spin, then sleep)" if value is None else value.upper() + " (torch not loaded yet)"
    return value.upper()


def passive_wait_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment for a child process whose OpenMP threads sleep as soon as they are idle."""
    env = dict(os.environ if base is None else base)
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def _read_proc_stat() -> tuple[int, int] | None:
    """(busy ticks at normal priority, busy ticks of niced processes) over all cores."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return user + system + irq + softirq + steal, nice


class FreeCoreThreads:
    """Keeps torch's thread count at the cores other processes leave free (see the module doc)."""

    def __init__(self, *, max_threads: int | None = None, interval: float = 0.5) -> None:
        self.max_threads = max_threads or torch.get_num_threads()
        self.interval = interval
        try:
            self.cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            self.cpus = os.cpu_count() or 1
        self._ticks_per_s = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.enabled = self.max_threads > 1 and _read_proc_stat() is not None
        self._last: tuple[float, int, int, float] | None = self._sample() if self.enabled else None
        self._next = time.monotonic() + min(interval, 0.1)  # a first measurement soon after start
        self.threads = self.max_threads
        self.changes = 0

    def _sample(self) -> tuple[float, int, int, float]:
        busy, niced = _read_proc_stat()
        t = os.times()
        return time.monotonic(), busy, niced, t.user + t.system

    def poll(self) -> int:
        """Cheap when called often (a clock read); re-measures every `interval` seconds."""
        if not self.enabled:
            return self.threads
        now = time.monotonic()
        if now < self._next:
            return self.threads
        self._next = now + self.interval
        sample = self._sample()
        last, self._last = self._last, sample
        if last is None:
            return self.threads
        elapsed = sample[0] - last[0]
        if elapsed <= 0:
            return self.threads
        busy = (sample[1] - last[1]) / self._ticks_per_s
        if os.getpriority(os.PRIO_PROCESS, 0) > 0:  # we are niced too: niced work competes with us
            busy += (sample[2] - last[2]) / self._ticks_per_s
        others = max(0.0, busy - (sample[3] - last[3])) / elapsed  # cores busy with other processes
        free = self.cpus - others
        threads = max(1, min(self.max_threads, int(free + 0.5)))
        if threads != self.threads:
            logger.info("CPU threads %d -> %d (other processes kept %.1f of %d cores busy)", self.threads, threads,
                        others, self.cpus)
            torch.set_num_threads(threads)
            self.threads = threads
            self.changes += 1
        return threads

    def restore(self) -> None:
        if self.threads != self.max_threads:
            torch.set_num_threads(self.max_threads)
            self.threads = self.max_threads


# An engine step of a small model whose matmul work is below SMALL_STEP_FLOPS runs on one thread: each of
# its ~70 ops a step is too small to split, and every parallel region still pays OpenMP's fork and
# barrier. Measured through the lock on this 2-core machine (engine alone, 16 prompts x 8 samples x 64
# tokens, wall): the tiny preset (105k parameters, batch 128: 27 MFLOP a step) 189 ms at 1 thread against
# 334 ms at 2; the small preset (0.8M, 205 MFLOP a step) 646 against 798 ms; the 3m preset (3M parameters,
# 12 MB: past SMALL_MODEL_BYTES, so unchanged) 1071 against 1085 ms. The model's size bounds it too: a
# larger model's batch-1 step reads its weights from memory, which two threads do faster.
SMALL_STEP_FLOPS = 256e6
SMALL_MODEL_BYTES = 8 << 20


def _small(threads: int, flops: float, model_bytes: int) -> bool:
    return threads > 1 and flops < SMALL_STEP_FLOPS and model_bytes < SMALL_MODEL_BYTES


@contextlib.contextmanager
def single_thread_below(flops: float, *, model_bytes: int) -> Iterator[bool]:
    """torch on one thread inside the block when `flops` (the step's matmul work, ~2 x parameters x
    tokens) < SMALL_STEP_FLOPS and the weights (`model_bytes`) < SMALL_MODEL_BYTES; the thread count is
    restored after it. Yields whether it switched."""
    threads = torch.get_num_threads()
    if not _small(threads, flops, model_bytes):
        yield False
        return
    torch.set_num_threads(1)
    try:
        yield True
    finally:
        torch.set_num_threads(threads)


class StepThreads:
    """One thread or all of them for a small model's small step (`single_thread_below`'s bounds), chosen by timing
    where the engine repeats a step: a decode step of `rows` rows (a power-of-two bucket of them) at torch's thread
    count T. Its first 2 * (SAMPLES + 1) steps alternate between one thread and T, the first at each count not
    counted (a compiled step compiles then), and the count whose median of SAMPLES wall times is lower is kept for
    that (rows bucket, T) from then on. Other steps (prefill chunks, mixed batches: shapes that seldom repeat)
    follow `single_thread_below`.

    Why measured: the fixed rule (one thread below SMALL_STEP_FLOPS) was measured (c9fa91c) on a 2-core AMD EPYC (Zen 4)
    with eager decode steps, and on sessions 25-26's Intel Xeon (AMX, AVX-512) with compiled steps it is wrong:
    the `tiny` preset's 16 x 8 x 64-token EOS-varied rollout (rows 128 down to ~80) took 100 ms at one thread and
    67 at two (compiled; eager 93 and 66), per step 723 against 628 us at 97-128 rows, 340 against 308 at 17-32
    rows, and 170 against 179 at 9-16 rows (one thread still ahead there). The thread count does not change a
    step's bits for these models (each row's and head's sums keep their order: the parallel loops split rows,
    heads and output columns; `tests/inference/test_step_threads.py`), so the choice changes speed only."""

    SAMPLES = 5

    def __init__(self) -> None:
        self._times: dict[tuple[int, int], tuple[list[float], list[float]]] = {}  # key -> (one thread, T): seconds
        self.choice: dict[tuple[int, int], int] = {}  # (rows bucket, T) -> the thread count kept

    @contextlib.contextmanager
    def run(self, flops: float, *, model_bytes: int, rows: int | None) -> Iterator[int]:
        """The block runs at the chosen count (restored after it); yields that count. `rows`: a decode step's rows,
        else None."""
        threads = torch.get_num_threads()
        if not _small(threads, flops, model_bytes):
            yield threads
            return
        if rows is None:
            with single_thread_below(flops, model_bytes=model_bytes):
                yield 1
            return
        key = (1 << max(0, rows - 1).bit_length(), threads)
        use = self.choice.get(key)
        times = None
        if use is None:
            times = self._times.setdefault(key, ([], []))
            use = 1 if len(times[0]) <= len(times[1]) else threads
        if use != threads:
            torch.set_num_threads(use)
        start = time.perf_counter()
        try:
            yield use
        finally:
            seconds = time.perf_counter() - start
            if use != threads:
                torch.set_num_threads(threads)
        if times is not None:  # (a step that raised is not timed)
            self._record(key, times[use != 1], seconds)

    def _record(self, key: tuple[int, int], samples: list[float], seconds: float) -> None:
        samples.append(seconds)
        one, many = self._times[key]
        if min(len(one), len(many)) > self.SAMPLES:  # (each count's first sample is not counted)
            t1, tn = statistics.median(one[1:]), statistics.median(many[1:])
            self.choice[key] = 1 if t1 <= tn else key[1]
            del self._times[key]
            logger.info("decode steps of up to %d rows run on %d thread(s): median %.0f us at 1 thread, %.0f at %d",
                        key[0], self.choice[key], t1 * 1e6, tn * 1e6, key[1])
