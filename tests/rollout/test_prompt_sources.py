"""Prompt sources beyond JSON lines: Parquet (pyarrow), Hugging Face `datasets` directories
(`save_to_disk`, a repository snapshot of data files), .csv / .tsv / .arrow files and file patterns;
splits refused by name; a `datasets` directory through `rl-engine train`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rl_engine.config import InputError
from rl_engine.rollout.data import PromptDataConfig, PromptDataset, read_records

REPO = Path(__file__).resolve().parents[2]
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "3+3?"}]


def toy_template(messages: list[dict], add_generation_prompt: bool = False) -> str:
    return "".join(f"<|{m['role']}|>{m['content']}" for m in messages) + ("<|assistant|>" if add_generation_prompt else "")


def _items(path, **config) -> list[tuple[str, str | None, dict]]:
    ds = PromptDataset.from_config(PromptDataConfig(path=str(path), shuffle=False, **config),
                                   apply_chat_template=toy_template)
    return [(i.text, i.answer, i.metadata) for i in ds.take(len(ds))]


def _table(n: int, start: int = 0) -> dict:
    return {"question": [f"q{i}" for i in range(start, start + n)], "solution": [i for i in range(start, start + n)],
            "level": [i % 3 for i in range(start, start + n)]}


def _expected(n: int, start: int = 0) -> list:
    return [(f"<|user|>q{i}<|assistant|>", str(i), {"level": i % 3}) for i in range(start, start + n)]


MAPPING = {"prompt_key": "question", "answer_key": "solution", "metadata_keys": ("level",)}


def test_parquet_rows_with_field_mapping_and_chat_messages(tmp_path):
    pq.write_table(pa.table(_table(3)), tmp_path / "d.parquet")
    assert _items(tmp_path / "d.parquet", **MAPPING) == _expected(3)
    pq.write_table(pa.table({"prompt": [CHAT], "answer": ["6"]}), tmp_path / "chat.parquet")
    assert _items(tmp_path / "chat.parquet") == [("<|system|>be brief<|user|>3+3?<|assistant|>", "6", {})]
    pq.write_table(pa.table({"prompt": ["a"]}), tmp_path / "no_answer.parquet")
    with pytest.raises(InputError, match=r"no_answer.parquet:1: missing key 'answer'"):
        _items(tmp_path / "no_answer.parquet")


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets.Dataset.from_dict(_table(4)).save_to_disk(str(tmp_path / "saved"))
    assert _items(tmp_path / "saved", **MAPPING) == _expected(4)
    datasets.Dataset.from_dict({"prompt": [CHAT, [{"role": "user", "content": "hi"}]], "answer": ["6", "x"]}) \
        .save_to_disk(str(tmp_path / "chat"))
    assert [t for t, _, _ in _items(tmp_path / "chat")] == ["<|system|>be brief<|user|>3+3?<|assistant|>",
                                                           "<|user|>hi<|assistant|>"]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict(_table(3)),
                                   "test": datasets.Dataset.from_dict(_table(2, start=10))})
    splits.save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(InputError, match=r"holds the splits \['test', 'train'\]: point the path at one split"):
        read_records(tmp_path / "dict")
    assert _items(tmp_path / "dict" / "train", **MAPPING) == _expected(3)
    assert _items(tmp_path / "dict" / "test", **MAPPING) == _expected(2, start=10)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(_table(2))}).save_to_disk(str(tmp_path / "one"))
    assert _items(tmp_path / "one", **MAPPING) == _expected(2)  # a single split needs no choice


def test_repository_snapshot_directory_and_patterns(tmp_path):
    """A dataset repository as downloaded (data/<split>-NNNNN-of-NNNNN.parquet): the directory names its
    splits; a pattern picks one, its shards in file order."""
    data = tmp_path / "snapshot" / "data"
    data.mkdir(parents=True)
    pq.write_table(pa.table(_table(2)), data / "train-00000-of-00002.parquet")
    pq.write_table(pa.table(_table(3, start=2)), data / "train-00001-of-00002.parquet")
    pq.write_table(pa.table(_table(1, start=50)), data / "test-00000-of-00001.parquet")
    with pytest.raises(InputError, match=r"holds the splits \['test', 'train'\]"):
        read_records(tmp_path / "snapshot")
    assert _items(f"{data}/train-*.parquet", **MAPPING) == _expected(5)
    (tmp_path / "only_train" / "data").mkdir(parents=True)
    pq.write_table(pa.table(_table(2)), tmp_path / "only_train" / "data" / "train-00000-of-00001.parquet")
    assert _items(tmp_path / "only_train", **MAPPING) == _expected(2)
    rows = [json.dumps({"question": f"q{i}", "solution": i, "level": i % 3}) for i in range(3)]
    (tmp_path / "a.jsonl").write_text("\n".join(rows[:2]) + "\n")
    (tmp_path / "b.jsonl").write_text(rows[2] + "\n")
    assert _items(f"{tmp_path}/[ab].jsonl", **MAPPING) == _expected(3)


def test_csv_tsv_and_arrow_files(tmp_path):
    (tmp_path / "d.csv").write_text("question,solution,level\nq0,0,0\nq1,1,1\n")
    assert _items(tmp_path / "d.csv", **MAPPING) == _expected(2)
    (tmp_path / "d.tsv").write_text("question\tsolution\tlevel\nq0\t0\t0\n")
    assert _items(tmp_path / "d.tsv", **MAPPING) == _expected(1)
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as sink:  # the Arrow stream format `datasets` writes
        table = pa.table(_table(3))
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    assert _items(tmp_path / "d.arrow", **MAPPING) == _expected(3)


def test_source_errors_name_the_source(tmp_path, monkeypatch):
    with pytest.raises(InputError, match=r"pattern '.*nothing-\*\.parquet' matches no file"):
        read_records(tmp_path / "nothing-*.parquet")
    (tmp_path / "a.csv").write_text("prompt,answer\na,1\n")
    (tmp_path / "b.parquet").write_bytes(b"")
    with pytest.raises(InputError, match=r"matches files of kinds \['.csv', '.parquet'\]"):
        read_records(f"{tmp_path}/*")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"dataset .*empty: `datasets` cannot read it"):
        read_records(tmp_path / "empty")
    datasets.Dataset.from_dict(_table(1)).save_to_disk(str(tmp_path / "saved"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # the datasets extra not installed
    with pytest.raises(InputError, match=r"needs Hugging Face datasets: pip install 'rl_engine\[datasets\]'"):
        read_records(tmp_path / "saved")
    pq.write_table(pa.table(_table(1)), tmp_path / "plain.parquet")  # Parquet alone needs only pyarrow
    assert [r for _, r in read_records(tmp_path / "plain.parquet")] == [{"question": "q0", "solution": 0, "level": 0}]


def test_train_reads_a_datasets_directory(tmp_path):
    """`rl-engine train` with data.path and data.eval_path on `save_to_disk` directories (no warm start)."""
    words = ["abcd", "bcda", "cdab", "dabc", "aabb", "bbaa"]
    data = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"q": [f"upper {w}" for w in words], "a": [w.upper() for w in words]}),
        "test": datasets.Dataset.from_dict({"q": ["upper dcba"], "a": ["DCBA"]})})
    data.save_to_disk(str(tmp_path / "upper"))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rl_engine.cli", "train", f"data.path={tmp_path / 'upper' / 'train'}",
           f"data.eval_path={tmp_path / 'upper' / 'test'}", "data.prompt_key=q", "data.answer_key=a", "data.num_eval=1",
           "warmup.path=null", "train.steps=2", "rollout.prompts_per_step=3", "rollout.n=2",
           "metrics.tensorboard=false", "metrics.plot=false", f"train.output_dir={out}"]
    result = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["rollout/kept_groups"] == 3 for r in rows)
    assert "held-out accuracy before RL" in result.stdout
    bad = subprocess.run(cmd[:4] + [f"data.path={tmp_path / 'upper'}"] + cmd[5:], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert bad.returncode == 2 and "holds the splits ['test', 'train']" in bad.stderr
