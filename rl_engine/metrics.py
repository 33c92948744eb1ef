"""Per-step training metrics: a deterministic JSONL file, a progress line, curves, TensorBoard, W&B.

`MetricsLogger.log(step, metrics)` appends one JSON row per step. The main design choice is a split
by determinism: the JSONL row holds only what the computation determines (sorted keys, compact
separators, Python's shortest float repr, no timestamps), so two runs with the same seed write
byte-identical files. Anything measured with a clock goes under a prefix listed in
`exclude_from_jsonl` (default `time/` and `perf/`: tokens/s, step and weight-sync seconds) and lands in
a sibling `<name>.wallclock.jsonl` instead, together with the logger's own step timings. The numeric
scalars of both rows go, under the same names, to the backends of `rl_engine.metrics_backends`
(TensorBoard, Weights & Biases); at the end `metrics.png` is drawn from the two files
(`rl_engine.metrics_plot`).

Rows are written with one `os.write` on an `O_APPEND` descriptor (one complete line per call,
nothing buffered in Python). A resumed run passes `resume_step`: rows after that step are removed
(rewrite to a temp file + rename) so the files never hold a step twice, and a torn last line left
by a crash is dropped. Only one process (rank 0) should own a logger.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, TextIO

from rl_engine.metrics_backends import ScalarBackend, WandbConfig, open_backends

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ProgressKeys:
    """Which metric keys the progress line shows (metrics.png has its own panels: rl_engine.metrics_plot)."""

    reward: str = "reward/mean"
    response_length: str = "response_length/mean"
    num_tokens: str = "tokens/total"  # tokens processed in the step; tokens/s = this / step seconds


def to_json_value(value: Any, *, key: str = "") -> Any:
    """A metric as a plain JSON value. Tensors and numpy scalars become Python numbers; non-finite
    floats become null (strict JSON); lists and dicts (e.g. a histogram) are converted inside."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # torch / numpy 0-d
        return to_json_value(value.item(), key=key)
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        items = value.tolist() if hasattr(value, "tolist") else value
        return [to_json_value(v, key=key) for v in items]
    if isinstance(value, Mapping):
        return {str(k): to_json_value(v, key=f"{key}.{k}") for k, v in value.items()}
    raise TypeError(f"metric {key!r} has type {type(value).__name__}; log numbers, strings, lists or dicts")


def dumps_row(row: Mapping[str, Any]) -> str:
    """The canonical, byte-stable form of one row (no trailing newline)."""
    return json.dumps(row, sort_keys=True, separators=(",", ":"), allow_nan=False)


def wallclock_path_for(path: str | Path) -> Path:
    """`metrics.wallclock.jsonl` for `metrics.jsonl`: where the clock-measured keys of a JSONL file go."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".jsonl") + ".wallclock.jsonl")


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The row's values that the scalar backends receive: numbers (not booleans, not nulls), without
    `step` (the x axis) and `time/unix` (a timestamp)."""
    return {k: v for k, v in row.items() if k not in ("step", "time/unix")
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics file, skipping a torn last line."""
    rows, _ = _read_rows(Path(path))
    return rows


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """(complete rows, whether an unparsable or unterminated line was found at the end)."""
    if not path.exists():
        return [], False
    rows: list[dict[str, Any]] = []
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = lines[-1] != b""  # the file should end with a newline
    for i, line in enumerate(lines[:-1]):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i != len(lines) - 2:
                raise ValueError(f"{path}: line {i + 1} is not JSON and is not the last line") from None
            torn = True
    return rows, torn


def _rewrite_through(path: Path, last_step: int) -> list[dict[str, Any]]:
    """Keep rows with step <= last_step (atomically: temp + fsync + rename); return them."""
    rows, torn = _read_rows(path)
    kept = [r for r in rows if r.get("step", -1) <= last_step]
    if len(kept) != len(rows) or torn:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(b"".join(dumps_row(r).encode() + b"\n" for r in kept))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    return kept


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _fmt_num(v: Any, fmt: str = ".3f") -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return "-"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div and fmt == "rate":
            return f"{v / div:.2f}{unit}"
    return f"{v:.1f}" if fmt == "rate" else format(v, fmt)


class MetricsLogger:
    """One JSONL row per step, a progress line, the scalar backends, curves at the end.

    `path` is the JSONL file (e.g. `run/metrics.jsonl`); beside it go `metrics.wallclock.jsonl`,
    `metrics.png` (`plot`), `tensorboard/` (`tensorboard`) and `wandb/` (`wandb`, a WandbConfig with
    a project; `run_config` is the run's config recorded with it). Keys starting with a prefix in
    `exclude_from_jsonl` are wall-clock quantities: they go to the wallclock file, the console and the
    backends, never to the deterministic JSONL (pass `exclude_from_jsonl=()` to keep everything in
    one file).
    `resume_step=k` continues a run whose step k is the last one kept; `None` starts afresh and
    overwrites existing files. The progress line is redrawn in place on a terminal and printed
    as one plain line per step otherwise.
    """

    def __init__(self, path: str | Path, *, total_steps: int | None = None, resume_step: int | None = None,
                 exclude_from_jsonl: Sequence[str] = ("time/", "perf/"), keys: ProgressKeys = ProgressKeys(),
                 show_progress: bool = True, stream: TextIO | None = None, plot: bool = True,
                 tensorboard: bool = True, wandb: WandbConfig | None = None,
                 run_config: Mapping[str, Any] | None = None, fsync: bool = False) -> None:
        if total_steps is not None and total_steps < 0:
            raise ValueError(f"total_steps must be >= 0, got {total_steps}")
        self.path = Path(path)
        self.wallclock_path = wallclock_path_for(self.path)
        self.plot_path = self.path.with_name(self.path.name.removesuffix(".jsonl") + ".png") if plot else None
        self.total_steps = total_steps
        self.exclude_from_jsonl = tuple(exclude_from_jsonl)
        self.keys = keys
        self._show_progress = show_progress
        self._stream = stream
        self._fsync = fsync
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)

        if resume_step is None:
            for p in (self.path, self.wallclock_path):
                if p.exists() and p.stat().st_size > 0:
                    logger.warning("starting a new run: overwriting %s", p)
                p.write_bytes(b"")
            self.history: list[dict[str, Any]] = []
        else:
            self.history = _rewrite_through(self.path, resume_step)
            _rewrite_through(self.wallclock_path, resume_step)
        self._last_step = resume_step
        self._tty_line_open = False
        self._fds = {p: os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                     for p in (self.path, self.wallclock_path)}
        self._step_seconds: deque[float] = deque(maxlen=20)  # recent steps, for the ETA
        self._last_time = time.monotonic()
        try:
            self._backends: list[ScalarBackend] = open_backends(
                tensorboard=tensorboard, wandb=wandb, jsonl_path=self.path, resume_step=resume_step,
                run_config=run_config)
        except BaseException:
            for fd in self._fds.values():
                os.close(fd)
            raise

    # -- writing ---------------------------------------------------------------------------------
    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Record step `step`; returns the deterministic row written to the JSONL file."""
        if self._closed:
            raise RuntimeError("MetricsLogger.log called after close()")
        if "step" in metrics:
            raise ValueError("'step' is reserved: pass it as the `step` argument, not in metrics")
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"step {step} is not after the last logged step {self._last_step}; "
                             "steps must increase (resume with resume_step to rewind)")
        now = time.monotonic()
        step_seconds = now - self._last_time
        self._last_time = now
        self._step_seconds.append(step_seconds)

        row: dict[str, Any] = {"step": int(step)}
        clock: dict[str, Any] = {"step": int(step), "time/unix": time.time(), "time/step_s": step_seconds}
        for key, value in metrics.items():
            target = clock if key.startswith(self.exclude_from_jsonl) else row
            target[key] = to_json_value(value, key=key)
        num_tokens = row.get(self.keys.num_tokens, clock.get(self.keys.num_tokens))
        if isinstance(num_tokens, (int, float)) and step_seconds > 0:
            clock.setdefault("time/tokens_per_s", float(num_tokens) / step_seconds)

        self._append(self.path, row)
        self._append(self.wallclock_path, clock)
        self.history.append(row)
        self._last_step = step
        if self._backends:
            values = scalars({**row, **clock})
            for backend in self._backends:
                backend.log(step, values)
        if self._show_progress:
            self._print_progress(step, {**row, **clock})
        return row

    def _append(self, path: Path, row: Mapping[str, Any]) -> None:
        data = (dumps_row(row) + "\n").encode()
        fd = self._fds[path]
        view = memoryview(data)
        while view:  # a regular-file write is complete in practice; loop for correctness anyway
            view = view[os.write(fd, view):]
        if self._fsync:
            os.fsync(fd)

    # -- console -----------------------------------------------------------------------------------
    def progress_line(self, step: int, values: Mapping[str, Any], *, bar_width: int = 0) -> str:
        """The compact progress text for one step (no control characters)."""
        parts = []
        if self.total_steps:
            frac = min(1.0, step / self.total_steps)
            head = f"step {step}/{self.total_steps} {100 * frac:3.0f}%"
            if bar_width > 0:
                filled = int(round(frac * bar_width))
                head = f"{head} [{'#' * filled}{'-' * (bar_width - filled)}]"
        else:
            head = f"step {step}"
        parts.append(head)
        parts.append(f"reward {_fmt_num(values.get(self.keys.reward))}")
        parts.append(f"len {_fmt_num(values.get(self.keys.response_length), '.1f')}")
        parts.append(f"{_fmt_num(values.get('time/tokens_per_s'), 'rate')} tok/s")
        recent = list(self._step_seconds)
        mean_s = sum(recent) / len(recent) if recent else math.nan
        parts.append(f"{_fmt_num(mean_s, '.2f')} s/step")
        if self.total_steps and math.isfinite(mean_s):
            parts.append(f"ETA {_fmt_duration(max(0, self.total_steps - step) * mean_s)}")
        return " | ".join(parts)

    def _print_progress(self, step: int, values: Mapping[str, Any]) -> None:
        stream = self._stream or sys.stdout
        is_tty = bool(getattr(stream, "isatty", lambda: False)())
        if is_tty:  # redraw in place; the newline comes at close()
            stream.write("\r\x1b[K" + self.progress_line(step, values, bar_width=20))
        else:
            stream.write(self.progress_line(step, values) + "\n")
        stream.flush()
        self._tty_line_open = is_tty

    # -- end of run ------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the files and the backends, then draw the curves PNG from the files. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for fd in self._fds.values():
            os.close(fd)
        if self._tty_line_open:
            (self._stream or sys.stdout).write("\n")
        for backend in self._backends:
            backend.close()
        if self.plot_path is not None and self.history:
            from rl_engine.metrics_plot import plot_run

            plot_run(self.path, self.plot_path)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

