"""The scalar backends hold what metrics.jsonl holds: TensorBoard event files read back with
tensorboard's own reader, a Weights & Biases offline run's files read back record by record (no
network), under the same names; the `metrics` config section refuses bad keys and values."""

import importlib.util
import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

from rl_engine.config import ConfigError, InputError, load_config
from rl_engine.metrics import MetricsLogger, read_jsonl, scalars
from rl_engine.metrics_backends import WandbConfig
from rl_engine.train_config import RLConfig

REPO = Path(__file__).resolve().parents[1]


def _step_metrics(step: int) -> dict:
    return {"reward/mean": 0.1 * step + 1 / 3, "response_length/mean": 10 + step, "tokens/total": 100 * step,
            "train/entropy": math.pi / step, "train/nan_metric": math.nan, "flag": True, "note": "text",
            "hist": [1, 2], "time/weight_sync_s": 0.01 * step, "perf/rollout_tokens_per_s": 1234.5 + step}


def _jsonl_scalars(jsonl: Path) -> dict[int, dict[str, float]]:
    """step -> the numeric scalars of metrics.jsonl and metrics.wallclock.jsonl merged (what every
    backend must hold)."""
    out: dict[int, dict[str, float]] = {}
    for row in read_jsonl(jsonl) + read_jsonl(jsonl.with_name(jsonl.stem + ".wallclock.jsonl")):
        out.setdefault(row["step"], {}).update(scalars(row))
    return out


def _tensorboard_scalars(log_dir: Path) -> dict[int, dict[str, float]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    out: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            out.setdefault(event.step, {})[tag] = event.value
    return out


def _wandb_records(run_file: Path) -> list:
    """The protobuf Records of a `.wandb` file: a 7-byte header (':W&B', magic 0xBEE1, version 0),
    then LevelDB's log format (32 KiB blocks; each chunk is crc32 u32, length u16, type u8 with
    1 = full, 2 = first, 3 = middle, 4 = last)."""
    data = run_file.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0)
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        if kind == 0:
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _wandb_history(run_dir: Path) -> tuple[dict[int, dict[str, float]], dict]:
    """(step -> logged scalars, the run's config) from the newest offline run under run_dir/wandb.
    `run.finish()` can return before W&B's service process has flushed the file: wait for the run's
    exit record (its last), up to a minute."""
    (run_file,) = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))[-1:]
    deadline = time.monotonic() + 60
    records = _wandb_records(run_file)
    while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
        time.sleep(0.2)
        records = _wandb_records(run_file)
    history: dict[int, dict[str, float]] = {}
    config: dict = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            step = items.pop("_step")
            history[step] = {k: v for k, v in items.items() if not k.startswith("_")}
        elif kind == "run":
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
    return history, config


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B offline with every directory it writes under tmp_path and no account."""
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": tmp_path / "wandb_dir",
                        "WANDB_CONFIG_DIR": tmp_path / "wandb_config", "WANDB_CACHE_DIR": tmp_path / "wandb_cache",
                        "WANDB_DATA_DIR": tmp_path / "wandb_data", "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return WandbConfig(project="rl-engine-test", mode="offline", name="unit", tags=["ci"])


def test_tensorboard_events_hold_the_jsonl_scalars(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(path, show_progress=False, plot=False) as log:
        for step in range(1, 6):
            log.log(step, _step_metrics(step))
    expected = _jsonl_scalars(path)
    got = _tensorboard_scalars(tmp_path / "tensorboard")
    assert sorted(got) == [1, 2, 3, 4, 5]
    for step, values in expected.items():
        assert set(got[step]) == set(values)  # same names; nulls, bools, strings and lists not sent
        assert "train/nan_metric" not in values and "flag" not in values and "time/unix" not in values
        assert {"reward/mean", "time/step_s", "time/tokens_per_s", "perf/rollout_tokens_per_s"} <= set(values)
        for key, value in values.items():  # a TensorBoard scalar is the float32 nearest the value
            assert got[step][key] == np.float32(value), key


def test_tensorboard_resume_purges_later_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(path, show_progress=False, plot=False) as log:
        for step in range(1, 6):
            log.log(step, {"reward/mean": float(step)})
    with MetricsLogger(path, show_progress=False, plot=False, resume_step=3) as log:
        for step in range(4, 7):
            log.log(step, {"reward/mean": 10.0 * step})
    got = _tensorboard_scalars(tmp_path / "tensorboard")
    assert {s: v["reward/mean"] for s, v in got.items()} == {1: 1, 2: 2, 3: 3, 4: 40, 5: 50, 6: 60}
    assert {r["step"]: r["reward/mean"] for r in read_jsonl(path)} == {1: 1, 2: 2, 3: 3, 4: 40, 5: 50, 6: 60}


def test_wandb_offline_run_holds_the_jsonl_scalars(tmp_path, wandb_offline):
    path = tmp_path / "run" / "metrics.jsonl"
    with MetricsLogger(path, show_progress=False, plot=False, tensorboard=False, wandb=wandb_offline,
                       run_config={"optim": {"lr": 0.002}, "rollout": {"n": 8}}) as log:
        for step in range(1, 6):
            log.log(step, _step_metrics(step))
    history, config = _wandb_history(tmp_path / "run")
    assert history == _jsonl_scalars(path)  # same steps, names and values (JSON floats are exact)
    assert config["optim"] == {"lr": 0.002} and config["rollout"] == {"n": 8}
    run_id = (tmp_path / "run" / "metrics.wandb_run_id").read_text().strip()
    assert list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}"))

    # A resumed run continues the same W&B run (same id) and logs the new steps.
    with MetricsLogger(path, show_progress=False, plot=False, tensorboard=False, wandb=wandb_offline,
                       resume_step=5) as log:
        log.log(6, _step_metrics(6))
    assert (tmp_path / "run" / "metrics.wandb_run_id").read_text().strip() == run_id
    runs = sorted((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) >= 1
    history, _ = _wandb_history(tmp_path / "run")
    assert history[6] == _jsonl_scalars(path)[6]


def test_the_cli_run_writes_the_same_scalars_everywhere(tmp_path, wandb_offline):
    """`rl-engine train` (a few demo steps) with W&B offline: metrics.jsonl, the TensorBoard events and
    the W&B run hold the same scalars; metrics.png is written."""
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "rl_engine.cli", "train", "train.steps=3", "warmup.steps=5", "data.num_eval=4",
           "rollout.prompts_per_step=4", "rollout.n=4", f"train.output_dir={out}", "metrics.wandb.project=demo",
           "metrics.wandb.mode=offline"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = _jsonl_scalars(out / "metrics.jsonl")
    assert sorted(expected) == [1, 2, 3] and "train/entropy" in expected[1] and "time/tokens_per_s" in expected[1]
    history, config = _wandb_history(out)
    assert history == expected
    assert config["train"]["steps"] == 3 and config["metrics"]["wandb"]["project"] == "demo"
    tensorboard = _tensorboard_scalars(out / "tensorboard")
    assert tensorboard == {s: {k: np.float32(v) for k, v in values.items()} for s, values in expected.items()}
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("override, message", [
    ("metrics.wandb.projet=x", "unknown config key 'metrics.wandb.projet'; did you mean 'metrics.wandb.project'"),
    ("metrics.tensorbord=false", "did you mean 'metrics.tensorboard'"),
    ("metrics.wandb.mode=cloud", "metrics.wandb.mode: 'cloud' is not one of ['online', 'offline']"),
    ("metrics.wandb.entity=me", "metrics.wandb.entity is set but metrics.wandb.project is null"),
    ("metrics.wandb.mode=offline", "metrics.wandb.mode is set but metrics.wandb.project is null"),
    ("metrics.wandb.project=a/b", "metrics.wandb.project='a/b' must be 1-128 characters"),
    ("metrics.plot=yes", "metrics.plot: expected true/false"),
])
def test_bad_metrics_config_is_refused(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(RLConfig, overrides=[override])
    assert message in str(info.value)


def test_wandb_without_the_package_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs the wandb package: pip install 'rl_engine\[wandb\]'"):
        load_config(RLConfig, overrides=["metrics.wandb.project=p"])


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.raises(InputError, match="metrics.tensorboard=false"):
        MetricsLogger(tmp_path / "m.jsonl", show_progress=False)
    with MetricsLogger(tmp_path / "m.jsonl", show_progress=False, tensorboard=False, plot=False) as log:
        log.log(1, {"x": 1})  # without TensorBoard the JSONL still works
    assert read_jsonl(tmp_path / "m.jsonl") == [{"step": 1, "x": 1}]
