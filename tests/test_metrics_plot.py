"""metrics.png: drawn by matplotlib from metrics.jsonl and metrics.wallclock.jsonl (read back with
PIL; the plotted lines' data compared with the files' values)."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from rl_engine import metrics_plot
from rl_engine.metrics import MetricsLogger, read_jsonl
from rl_engine.metrics_plot import PANELS, collect_panels, ema, plot_run, smoothing_weight


def _row(step: int) -> dict:
    return {"reward/mean": 0.02 * step + 0.1 * math.sin(step), "response_length/mean": 10 + step % 7,
            "response_length/max": 12 + step % 5, "train/approx_kl": 1e-3 * step, "train/mismatch_k3": 1e-6,
            "train/is_ratio_mean": 1.0, "train/is_ratio_max": 1.0 + 0.01 * step, "train/entropy": 3.0 - 0.05 * step,
            "train/loss": 0.1 / step, "tokens/total": 1000 + step, "perf/rollout_tokens_per_s": 5000.0 + step,
            "text": "not a number"}


def _lines(fig) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """gid -> (panel title, x, y) of every line in the figure."""
    out = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_gid():
                out[line.get_gid()] = (ax.get_title(), np.asarray(line.get_xdata(), float),
                                       np.asarray(line.get_ydata(), float))
    return out


def test_the_logger_writes_a_readable_png(tmp_path):
    with MetricsLogger(tmp_path / "metrics.jsonl", show_progress=False, tensorboard=False) as log:
        for step in range(1, 31):
            log.log(step, _row(step))
    with Image.open(tmp_path / "metrics.png") as image:
        image.load()
        assert image.format == "PNG"
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"))
    # 7 panels (reward, length, KL, IS, entropy, loss, throughput) in 2 columns of 6.4 x 3.4 inches at 100 dpi.
    assert (width, height) == (1280, 4 * 340)
    # Something is drawn: many distinct colours (lines, text, legend), mostly white background.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    assert (pixels == 255).all(axis=-1).mean() > 0.5


def test_plotted_series_are_the_files_values(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(path, show_progress=False, tensorboard=False, plot=False) as log:
        for step in range(1, 41):
            log.log(step, _row(step))
    # Edit the file after the run: the plot must follow the file, not the logger's memory.
    rows = read_jsonl(path)
    rows[4]["train/entropy"] = None  # a non-finite value is written as null: a gap
    rows[5]["reward/mean"] = 7.0
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = plot_run(path, tmp_path / "again.png")
    assert (tmp_path / "again.png").stat().st_size > 0
    lines = _lines(fig)
    clock = read_jsonl(tmp_path / "metrics.wallclock.jsonl")
    steps = np.arange(1, 41, dtype=float)
    for key, title, source in (("reward/mean", "Reward", rows), ("train/entropy", "Entropy", rows),
                               ("train/is_ratio_max", "Importance sampling and clipping", rows),
                               ("perf/rollout_tokens_per_s", "Throughput", clock),
                               ("time/tokens_per_s", "Throughput", clock)):
        expected = np.array([np.nan if r[key] is None else r[key] for r in source], float)
        panel, x, y = lines[f"raw:{key}"]
        assert panel == title
        np.testing.assert_array_equal(x, steps)
        np.testing.assert_array_equal(y, expected)  # NaN where the file has null
        _, _, smoothed = lines[f"smoothed:{key}"]
        np.testing.assert_allclose(smoothed, ema(list(expected), smoothing_weight(40)), rtol=1e-12)
    assert lines["raw:reward/mean"][2][5] == 7.0
    assert math.isnan(lines["raw:train/entropy"][2][4])
    # Keys never logged draw nothing, and strings are not plotted.
    assert "raw:train/kl_ref" not in lines and not any("text" in gid for gid in lines)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == [p.title for p in PANELS]
    for ax in fig.axes:
        if ax.get_visible():
            assert ax.get_xlabel() == "step" and ax.get_ylabel()


def test_panels_without_data_are_left_out(tmp_path):
    panels = collect_panels([{"step": 1, "reward/mean": 0.5}, {"step": 2, "reward/mean": None}])
    assert [p.spec.title for p in panels] == ["Reward"]
    (series,) = panels[0].series
    assert series.steps == (1, 2) and series.values[0] == 0.5 and math.isnan(series.values[1])
    fig = metrics_plot.draw(panels, tmp_path / "one.png")
    assert sum(ax.get_visible() for ax in fig.axes) == 1
    with Image.open(tmp_path / "one.png") as image:
        assert image.size == (640, 340)
    fig = metrics_plot.draw([], tmp_path / "none.png")  # a run with no rows still gets a readable image
    with Image.open(tmp_path / "none.png") as image:
        assert image.size == (640, 340)


def test_eval_points_only_where_logged():
    rows = [{"step": s, "reward/mean": 0.1 * s} for s in range(1, 7)] + [{"step": 3, "eval/accuracy": 0.5},
                                                                      {"step": 6, "eval/accuracy": 0.75}]
    (reward,) = collect_panels(rows)
    by_key = {s.key: s for s in reward.series}
    assert by_key["eval/accuracy"].steps == (3, 6) and by_key["eval/accuracy"].values == (0.5, 0.75)
    assert by_key["reward/mean"].steps == tuple(range(1, 7))


def test_ema_is_tensorboards_debiased_average():
    values = [1.0, 3.0, math.nan, 2.0]
    w = 0.6
    # TensorBoard: last = last * w + (1 - w) * v; shown = last / (1 - w ** n) over the n finite points.
    l1 = 0.4 * 1.0
    l2 = l1 * w + 0.4 * 3.0
    l3 = l2 * w + 0.4 * 2.0
    expected = [l1 / (1 - w), l2 / (1 - w**2), math.nan, l3 / (1 - w**3)]
    got = ema(values, w)
    assert got[0] == pytest.approx(1.0) and math.isnan(got[2])
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert ema([2.0] * 50, 0.9) == pytest.approx([2.0] * 50)
    assert smoothing_weight(5) == 0.0 and smoothing_weight(20) == 0.5 and smoothing_weight(10_000) == 0.95
