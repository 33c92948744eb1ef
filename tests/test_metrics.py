"""MetricsLogger: byte-stable JSONL, wall-clock split, resume without duplicates, progress line.
The backends are tested in test_metrics_backends.py, the plot in test_metrics_plot.py."""

import io
import json
import math

import numpy as np
import pytest
import torch

from rl_engine.metrics import MetricsLogger, read_jsonl


def _quiet(path, **kw):
    kw.setdefault("show_progress", False)
    kw.setdefault("tensorboard", False)
    return MetricsLogger(path, **kw)


def _step_metrics(step: int) -> dict:
    return {
        "reward/mean": 0.1 * step,
        "response_length/mean": 10 + step,
        "tokens/total": 100 * step,
        "loss": 1.0 / (step + 3),
        "time/weight_sync_s": 0.01 * step,
        "perf/rollout_tokens_per_s": 1234.5,
    }


def test_row_format_is_canonical_and_excludes_wallclock(tmp_path):
    with _quiet(tmp_path / "m.jsonl") as log:
        row = log.log(1, {"z": 2, "a/b": 1.5, "time/x": 3.0, "perf/y": 4})
    assert row == {"a/b": 1.5, "step": 1, "z": 2}
    assert (tmp_path / "m.jsonl").read_text() == '{"a/b":1.5,"step":1,"z":2}\n'
    (clock,) = read_jsonl(tmp_path / "m.wallclock.jsonl")
    assert clock["step"] == 1 and clock["time/x"] == 3.0 and clock["perf/y"] == 4
    assert clock["time/step_s"] >= 0 and "time/unix" in clock


def test_exclusion_prefixes_are_configurable(tmp_path):
    with _quiet(tmp_path / "m.jsonl", exclude_from_jsonl=()) as log:
        log.log(1, {"time/x": 3.0})
    assert read_jsonl(tmp_path / "m.jsonl") == [{"step": 1, "time/x": 3.0}]


def test_two_runs_give_identical_bytes(tmp_path):
    for name in ("a", "b"):
        with _quiet(tmp_path / name / "metrics.jsonl", plot=False) as log:
            for step in range(1, 6):
                log.log(step, _step_metrics(step))
    a = (tmp_path / "a" / "metrics.jsonl").read_bytes()
    assert a == (tmp_path / "b" / "metrics.jsonl").read_bytes()
    assert b"time/" not in a and b"perf/" not in a and len(a.splitlines()) == 5
    # The wall-clock files differ (timestamps) and hold the excluded keys.
    clock = read_jsonl(tmp_path / "a" / "metrics.wallclock.jsonl")
    assert [r["step"] for r in clock] == [1, 2, 3, 4, 5]
    assert clock[2]["time/weight_sync_s"] == pytest.approx(0.03)
    assert clock[2]["time/tokens_per_s"] > 0  # from tokens/total over the measured step time


def test_values_are_converted(tmp_path):
    with _quiet(tmp_path / "m.jsonl") as log:
        row = log.log(1, {"t": torch.tensor(2.5), "i": np.int64(3), "f": np.float32(0.5), "nan": math.nan,
                          "inf": float("inf"), "hist": torch.tensor([1, 2]), "d": {"b": 1, "a": [1.0, math.nan]},
                          "ok": True, "name": "x"})
    assert row == {"step": 1, "t": 2.5, "i": 3, "f": 0.5, "nan": None, "inf": None, "hist": [1, 2],
                   "d": {"a": [1.0, None], "b": 1}, "ok": True, "name": "x"}
    assert json.loads((tmp_path / "m.jsonl").read_text()) == row
    with _quiet(tmp_path / "n.jsonl") as log, pytest.raises(TypeError, match="'bad'"):
        log.log(1, {"bad": object()})


def test_steps_must_increase_and_step_key_is_reserved(tmp_path):
    with _quiet(tmp_path / "m.jsonl") as log:
        log.log(3, {"x": 1})
        with pytest.raises(ValueError, match="step 3 is not after"):
            log.log(3, {"x": 1})
        with pytest.raises(ValueError, match="reserved"):
            log.log(4, {"step": 4})


def test_resume_truncates_later_rows_and_torn_line(tmp_path):
    path = tmp_path / "m.jsonl"
    with _quiet(path) as log:
        for step in range(1, 7):
            log.log(step, _step_metrics(step))
    uninterrupted = path.read_bytes()
    with open(path, "ab") as f:  # a crash in the middle of a write
        f.write(b'{"reward/mean":0.7,"st')
    with _quiet(path, resume_step=3) as log:
        assert [r["step"] for r in log.history] == [1, 2, 3]
        assert [r["step"] for r in read_jsonl(tmp_path / "m.wallclock.jsonl")] == [1, 2, 3]
        with pytest.raises(ValueError, match="not after"):
            log.log(3, _step_metrics(3))
        for step in range(4, 7):
            log.log(step, _step_metrics(step))
    assert path.read_bytes() == uninterrupted
    assert [r["step"] for r in read_jsonl(tmp_path / "m.wallclock.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_new_run_overwrites(tmp_path):
    path = tmp_path / "m.jsonl"
    with _quiet(path) as log:
        log.log(1, {"x": 1})
        log.log(2, {"x": 2})
    with _quiet(path) as log:
        log.log(1, {"x": 9})
    assert read_jsonl(path) == [{"step": 1, "x": 9}]


def test_progress_plain_lines_when_not_a_tty(tmp_path):
    out = io.StringIO()
    with _quiet(tmp_path / "m.jsonl", total_steps=10, show_progress=True, stream=out, plot=False) as log:
        for step in range(1, 4):
            log.log(step, _step_metrics(step))
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in out.getvalue()
    assert lines[1].startswith("step 2/10  20%")
    assert "reward 0.200" in lines[1] and "len 12.0" in lines[1]
    assert "tok/s" in lines[1] and "s/step" in lines[1] and "ETA" in lines[1]
    assert "-" not in lines[1].split("|")[3]  # tokens/s was computed, not missing


def test_progress_redraws_in_place_on_a_tty(tmp_path):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    log = _quiet(tmp_path / "m.jsonl", total_steps=4, show_progress=True, stream=out, plot=False)
    log.log(1, {"reward/mean": 0.5})
    log.log(2, {"reward/mean": 0.75})
    assert out.getvalue().count("\r") == 2 and "\n" not in out.getvalue()
    assert "[##########----------]" in out.getvalue()  # 2/4 of a 20-wide bar
    log.close()
    assert out.getvalue().endswith("\n")
