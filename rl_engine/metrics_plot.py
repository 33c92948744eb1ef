"""`metrics.png`: a run's curves drawn with matplotlib from its metrics files.

The plot is made from the files, not from memory: `plot_run(jsonl_path, png_path)` reads
`metrics.jsonl` (the deterministic per-step row) and `metrics.wallclock.jsonl` (clock-measured
throughput) and draws one panel per family of metrics that the run logged: reward, response length,
KL, importance sampling, entropy, loss and throughput. A panel whose metrics are all absent is left
out. Each series is drawn raw (thin, faint) and smoothed (TensorBoard's debiased exponential moving
average), so a noisy RL curve stays readable. matplotlib is used through its object API (`Figure`
with the Agg canvas), never `pyplot`: no global state, safe in any process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from rl_engine.metrics import read_jsonl, wallclock_path_for


@dataclass(frozen=True, kw_only=True)
class PanelSpec:
    """One subplot: a title, a y label and the metric keys drawn in it (those the run logged)."""

    title: str
    ylabel: str
    keys: tuple[str, ...]
    log_y: bool = False


# What an RL researcher looks at first, in reading order (left to right, top to bottom).
PANELS: tuple[PanelSpec, ...] = (
    PanelSpec(title="Reward", ylabel="reward", keys=("reward/mean", "eval/accuracy")),
    PanelSpec(title="Response length", ylabel="tokens", keys=("response_length/mean", "response_length/max")),
    PanelSpec(title="KL", ylabel="nats / token",
              keys=("train/approx_kl", "train/kl_ref", "train/mismatch_k3", "train/behavior_vs_proximal_kl",
                    "train/distill_reverse_kl")),
    PanelSpec(title="Importance sampling and clipping", ylabel="ratio / fraction",
              keys=("train/is_ratio_mean", "train/is_ratio_max", "train/is_affected_frac", "train/pg_clipfrac")),
    PanelSpec(title="Entropy", ylabel="nats / token", keys=("train/entropy",)),
    PanelSpec(title="Loss", ylabel="loss", keys=("train/loss", "train/pg_loss")),
    PanelSpec(title="Throughput", ylabel="tokens / s",
              keys=("time/tokens_per_s", "perf/rollout_tokens_per_s", "perf/train_tokens_per_s")),
)


@dataclass(frozen=True, kw_only=True)
class Series:
    key: str
    steps: tuple[int, ...]
    values: tuple[float, ...]  # NaN where the step has no finite value (a gap in the line)


@dataclass(frozen=True, kw_only=True)
class Panel:
    spec: PanelSpec
    series: tuple[Series, ...]


def _number(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan  # absent, null (a non-finite value in the JSONL) or not a scalar


def collect_panels(rows: Sequence[Mapping[str, Any]], *, panels: Sequence[PanelSpec] = PANELS) -> list[Panel]:
    """The series of each panel from per-step rows (the JSONL rows and the wall-clock rows merged by
    step). A key no row holds as a number is left out, and so is a panel with no key left."""
    by_step: dict[int, dict[str, Any]] = {}
    for row in rows:
        by_step.setdefault(int(row["step"]), {}).update(row)
    steps = tuple(sorted(by_step))
    out = []
    for spec in panels:
        series = []
        for key in spec.keys:
            values = tuple(_number(by_step[s].get(key)) for s in steps)
            if any(math.isfinite(v) for v in values):
                kept = [(s, v) for s, v in zip(steps, values) if key in by_step[s]]
                series.append(Series(key=key, steps=tuple(s for s, _ in kept), values=tuple(v for _, v in kept)))
        if series:
            out.append(Panel(spec=spec, series=tuple(series)))
    return out


def smoothing_weight(num_points: int) -> float:
    """The EMA weight for a series of this length: about a tenth of the run in the window (0 for
    a handful of points, capped at 0.95 so a long run still shows its trend changes)."""
    if num_points < 10:
        return 0.0
    return min(0.95, 1.0 - 10.0 / num_points)


def ema(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard's debiased exponential moving average; NaN points stay NaN and are skipped."""
    out, last, num = [], 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(math.nan)
            continue
        last = last * weight + (1.0 - weight) * v
        num += 1
        debias = 1.0 - weight**num if weight > 0 else 1.0
        out.append(last / debias)
    return out


def draw(panels: Sequence[Panel], path: str | Path, *, title: str | None = None) -> Any:
    """Draw the panels into a PNG at `path`; returns the matplotlib Figure (for inspection)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    ncols = 2 if len(panels) > 1 else 1
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = Figure(figsize=(6.4 * ncols, 3.4 * nrows), dpi=100, layout="constrained")
    if title:
        fig.suptitle(title, fontsize=13)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        for i, s in enumerate(panel.series):
            color = f"C{i}"
            weight = smoothing_weight(len(s.values))
            # gid names each line (raw:<key>, smoothed:<key>) for whoever inspects the Figure.
            if weight > 0:
                ax.plot(s.steps, s.values, color=color, alpha=0.25, linewidth=1.0, gid=f"raw:{s.key}")
                ax.plot(s.steps, ema(s.values, weight), color=color, linewidth=1.8, label=s.key,
                        gid=f"smoothed:{s.key}")
            else:
                ax.plot(s.steps, s.values, color=color, linewidth=1.6, marker="o", markersize=3, label=s.key,
                        gid=f"raw:{s.key}")
        ax.set_title(panel.spec.title, fontsize=11)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.spec.ylabel)
        if panel.spec.title == "Throughput":
            ax.yaxis.set_major_formatter(EngFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if not panels:
        axes[0].set_visible(True)
        axes[0].text(0.5, 0.5, "no metrics logged", ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
    fig.savefig(path, format="png", metadata={"Software": None})
    return fig


def plot_run(jsonl_path: str | Path, png_path: str | Path | None = None, *,
             title: str | None = None) -> Any:
    """Plot a run from its `metrics.jsonl` (and the `metrics.wallclock.jsonl` beside it) into
    `png_path` (default: `metrics.png` beside the JSONL); returns the Figure."""
    jsonl_path = Path(jsonl_path)
    rows = read_jsonl(jsonl_path) + read_jsonl(wallclock_path_for(jsonl_path))
    if png_path is None:
        png_path = jsonl_path.with_suffix(".png")
    return draw(collect_panels(rows), png_path, title=title)
