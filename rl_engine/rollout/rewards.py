"""Reward functions: a registry of verifiers, user functions by dotted path, and a safe evaluator.

A reward function is `fn(response: str, answer: str | None, **metadata) -> float` (or a dict with
a "score" key; other keys are kept as extra info). Built-ins are registered by name (`math`,
`exact_match`, `format`, in `verifiers.py`); anything else is found by dotted path
(`pkg.module:func` or `pkg.module.func`).

`RewardComputer` runs them in worker processes of its own (spawn context) rather than in a
`ProcessPoolExecutor`, because a per-item timeout needs to know when each item *started* and must
be able to kill just the worker that hangs: that worker is terminated and replaced, the item
scores `failure_score`, and the rest of the batch goes on. Every failure is logged and counted.
A worker's start-up (a fresh interpreter importing the reward's module: seconds for a module that
imports torch or sympy) is not an item's time: a worker says when it is ready, only then gets items,
and has its own bound, `startup_timeout_s`. This module imports no torch, so workers start fast.
"""

from __future__ import annotations

import importlib
import logging
import math
import multiprocessing as mp
import time
import traceback
import warnings
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

logger = logging.getLogger(__name__)

RewardFn = Callable[..., float | Mapping[str, Any]]

# The plug-in registry. A module-level table (not a hidden context) on purpose: a spawned worker
# re-imports the module that defines a registered function, and the decorator re-registers it.
_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make `fn` available as `get_reward_fn(name)`."""

    def decorator(fn: RewardFn) -> RewardFn:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not fn and _qualname(existing) != _qualname(fn):
            raise ValueError(f"reward {name!r} is already registered to {_qualname(existing)}; pick another name")
        _REGISTRY[name] = fn
        return fn

    return decorator


def _qualname(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def registered_rewards() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def _load_builtins() -> None:
    # Registers math / exact_match / format; imported lazily because it imports this module.
    importlib.import_module("rl_engine.rollout.verifiers")


def get_reward_fn(name_or_path: str) -> RewardFn:
    """A registered name, or a dotted path `pkg.module:func` / `pkg.module.func`."""
    _load_builtins()
    if name_or_path in _REGISTRY:
        return _REGISTRY[name_or_path]
    if ":" in name_or_path:
        module_name, _, attr = name_or_path.partition(":")
    elif "." in name_or_path:
        module_name, _, attr = name_or_path.rpartition(".")
    else:
        raise ValueError(
            f"unknown reward {name_or_path!r}; registered: {sorted(_REGISTRY)}, "
            "or give a dotted path like 'my_pkg.rewards:score'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"reward {name_or_path!r}: cannot import module {module_name!r} ({e}); check the path and that "
            "the module is importable (on PYTHONPATH or installed)"
        ) from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"reward {name_or_path!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"reward {name_or_path!r} is a {type(fn).__name__}, not a function")
    return fn


def _call_reward(fn: RewardFn, response: str, answer: str | None, kwargs: Mapping[str, Any]) -> tuple[float, dict]:
    """Run one reward and validate its result -> (score, extra). Raises on a bad result."""
    out = fn(response, answer, **kwargs)
    extra: dict[str, Any] = {}
    if isinstance(out, Mapping):
        if "score" not in out:
            raise ValueError(f"reward returned a dict without a 'score' key (keys: {sorted(out)})")
        extra = {k: v for k, v in out.items() if k != "score"}
        out = out["score"]
    if isinstance(out, (str, bytes)) or not hasattr(out, "__float__"):  # numpy / 0-d torch scalars are fine
        raise TypeError(f"reward returned {type(out).__name__}; expected a float or a dict with 'score'")
    score = float(out)
    if not math.isfinite(score):
        raise ValueError(f"reward returned a non-finite score ({score})")
    return score, extra


@dataclass(kw_only=True)
class RewardConfig:
    """name: registered reward or dotted path. num_workers=0 runs in-process (no timeout).
    kwargs are passed to every call along with the item's metadata (e.g. format `pattern`).
    timeout_s bounds one call of the function; startup_timeout_s bounds a worker's start-up
    (interpreter and imports), which never counts against an item."""

    name: str = "math"
    num_workers: int = 2
    timeout_s: float = 10.0
    startup_timeout_s: float = 120.0
    failure_score: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"num_workers ({self.num_workers}) must be >= 0 (0: evaluate in-process)")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s ({self.timeout_s}) must be > 0")
        if not (math.isfinite(self.startup_timeout_s) and self.startup_timeout_s > 0):
            raise ValueError(f"startup_timeout_s ({self.startup_timeout_s}) must be finite and > 0 (seconds a reward"
                             " worker may take to start and import the reward's module)")
        if not math.isfinite(self.failure_score):
            raise ValueError(f"failure_score ({self.failure_score}) must be finite")


@dataclass(frozen=True, kw_only=True)
class RewardOutcome:
    score: float
    error: str | None = None  # None when the reward function ran fine
    timed_out: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(kw_only=True)
class RewardStats:
    num_items: int = 0
    num_errors: int = 0  # raised, returned a bad value, or killed its worker
    num_timeouts: int = 0
    num_worker_restarts: int = 0

    @property
    def num_failed(self) -> int:
        return self.num_errors + self.num_timeouts


_READY = "ready"


def _worker_main(conn: Connection, fn: RewardFn, kwargs: dict[str, Any]) -> None:
    """Worker loop: (index, response, answer, metadata) -> (index, score, extra, error), after one
    `_READY`: `fn` arrived unpickled, so its module (and whatever that imports) is loaded."""
    conn.send(_READY)
    while True:
        try:
            task = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if task is None:
            return
        index, response, answer, metadata = task
        try:
            score, extra = _call_reward(fn, response, answer, {**kwargs, **metadata})
            conn.send((index, score, extra, None))
        except Exception as e:  # the user's function may raise anything; report, never die
            conn.send((index, 0.0, {}, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"))


class _Worker:
    def __init__(self, ctx: mp.context.SpawnContext, fn: RewardFn, kwargs: dict[str, Any]) -> None:
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child_conn, fn, kwargs), daemon=True)
        try:
            self.process.start()
        except Exception as e:  # typically pickling: a lambda or a function defined inside a function
            raise ValueError(
                f"reward function {_qualname(fn)} cannot be sent to a worker process ({e}); define it at "
                "module top level, or use num_workers=0"
            ) from e
        child_conn.close()
        self.started = time.monotonic()
        self.ready = False  # until the worker's _READY: its start-up is not an item's time
        self.task: tuple[int, float] | None = None  # (item index, start time) while busy

    def kill(self) -> None:
        self.process.kill()
        self.process.join(5)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.process.join(2)
        if self.process.is_alive():
            self.kill()
        else:
            self.conn.close()


class RewardComputer:
    """Evaluates a batch of rewards, in `num_workers` spawned processes with a per-item timeout."""

    def __init__(self, config: RewardConfig) -> None:
        self.config = config
        self.fn = get_reward_fn(config.name)
        self._workers: list[_Worker] = []
        self._ctx = mp.get_context("spawn")
        if config.num_workers == 0 and config.name not in registered_rewards():
            # Built-in verifiers are pure string functions that cannot hang; a user function can.
            warnings.warn(f"RewardComputer num_workers=0: timeout_s ({config.timeout_s}) is not enforced", stacklevel=2)

    def __enter__(self) -> RewardComputer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers.clear()

    def compute(
        self,
        responses: Sequence[str],
        answers: Sequence[str | None],
        *,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> tuple[list[RewardOutcome], RewardStats]:
        """Score every (response, answer, metadata) item; failures score `failure_score`."""
        if len(answers) != len(responses) or (metadata is not None and len(metadata) != len(responses)):
            raise ValueError(
                f"got {len(responses)} responses, {len(answers)} answers and "
                f"{'no' if metadata is None else len(metadata)} metadata entries; they must match"
            )
        metas = [dict(m) for m in metadata] if metadata is not None else [{} for _ in responses]
        for m in metas:
            if "response" in m or "answer" in m:
                raise ValueError("metadata keys 'response' and 'answer' are reserved by the reward signature")
        stats = RewardStats(num_items=len(responses))
        outcomes: list[RewardOutcome | None] = [None] * len(responses)
        tasks = [(i, responses[i], answers[i], metas[i]) for i in range(len(responses))]
        if self.config.num_workers == 0:
            for task in tasks:
                outcomes[task[0]] = self._run_inline(task)
        else:
            self._run_pool(tasks, outcomes, stats)
        for o in outcomes:
            assert o is not None
            if o.timed_out:
                stats.num_timeouts += 1
            elif o.error is not None:
                stats.num_errors += 1
        return outcomes, stats  # type: ignore[return-value]

    def _failure(self, index: int, error: str, *, timed_out: bool = False) -> RewardOutcome:
        logger.warning("reward %r failed on item %d: %s", self.config.name, index, error)
        return RewardOutcome(score=self.config.failure_score, error=error, timed_out=timed_out)

    def _run_inline(self, task: tuple) -> RewardOutcome:
        index, response, answer, meta = task
        try:
            score, extra = _call_reward(self.fn, response, answer, {**self.config.kwargs, **meta})
        except Exception as e:
            return self._failure(index, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}")
        return RewardOutcome(score=score, extra=extra)

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self.fn, dict(self.config.kwargs))

    def _run_pool(self, tasks: list[tuple], outcomes: list[RewardOutcome | None], stats: RewardStats) -> None:
        while len(self._workers) < self.config.num_workers:
            self._workers.append(self._spawn())
        pending = deque(tasks)
        timeout, startup = self.config.timeout_s, self.config.startup_timeout_s
        while pending or any(w.task is not None for w in self._workers):
            for worker in self._workers:
                if worker.ready and worker.task is None and pending:
                    task = pending.popleft()
                    worker.conn.send(task)
                    worker.task = (task[0], time.monotonic())  # the item's clock starts here
            busy = [w for w in self._workers if w.task is not None]
            starting = [w for w in self._workers if not w.ready]
            next_deadline = min([w.task[1] + timeout for w in busy]  # type: ignore[index]
                                + [w.started + startup for w in starting])
            ready = wait([w.conn for w in busy + starting], timeout=max(0.0, next_deadline - time.monotonic()))
            for worker in starting:
                self._check_started(worker, worker.conn in ready)
            for worker in busy:
                assert worker.task is not None
                index = worker.task[0]
                if worker.conn in ready:
                    try:
                        got_index, score, extra, error = worker.conn.recv()
                    except (EOFError, OSError):  # the worker died (segfault, os._exit, OOM kill)
                        worker.process.join(5)  # reap it, so the exit code is known
                        outcomes[index] = self._failure(index, f"worker died (exit code {worker.process.exitcode})")
                        self._replace(worker, stats)
                        continue
                    assert got_index == index
                    outcomes[index] = (
                        self._failure(index, error) if error else RewardOutcome(score=score, extra=extra)
                    )
                    worker.task = None
                elif time.monotonic() - worker.task[1] >= timeout:
                    outcomes[index] = self._failure(index, f"timed out after {timeout}s", timed_out=True)
                    self._replace(worker, stats)

    def _check_started(self, worker: _Worker, has_message: bool) -> None:
        """Mark a starting worker ready on its _READY; a worker that dies or overruns
        `startup_timeout_s` while starting cannot score anything: an error naming the reward."""
        if has_message:
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):
                worker.process.join(5)
                worker.kill()
                self._workers.remove(worker)
                raise RuntimeError(
                    f"reward worker for {self.config.name!r} exited with code {worker.process.exitcode} while"
                    " starting (importing the reward's module in a fresh process): see its error above") from None
            assert message == _READY, message
            worker.ready = True
        elif time.monotonic() - worker.started >= self.config.startup_timeout_s:
            worker.kill()
            self._workers.remove(worker)
            raise RuntimeError(
                f"reward worker for {self.config.name!r} did not start within reward.startup_timeout_s="
                f"{self.config.startup_timeout_s:g}s (a fresh process importing the reward's module); raise"
                " reward.startup_timeout_s or make the module's imports lighter")

    def _replace(self, worker: _Worker, stats: RewardStats) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = self._spawn()
        stats.num_worker_restarts += 1
