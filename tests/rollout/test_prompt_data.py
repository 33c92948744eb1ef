"""Prompt data: parsing and its errors, chat templates, deterministic order, exact resume."""

import json
from pathlib import Path

import pytest

from rl_engine.config import InputError
from rl_engine.rollout.data import PromptDataConfig, PromptDataset, read_records


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def toy_template(messages: list[dict], add_generation_prompt: bool = False) -> str:
    text = "".join(f"<|{m['role']}|>{m['content']}" for m in messages)
    return text + ("<|assistant|>" if add_generation_prompt else "")


def make_dataset(tmp_path: Path, n: int = 7, **config: object) -> PromptDataset:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}", "answer": i} for i in range(n)])
    return PromptDataset.from_config(PromptDataConfig(path=str(path), **config))


def test_parsing_string_and_chat_prompts_with_template(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"question": "2+2?", "solution": "#### 4", "level": 1},
        "",  # blank lines are skipped
        {"question": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "3+3?"}],
         "solution": 6, "level": 2},
    ])
    config = PromptDataConfig(path=str(path), prompt_key="question", answer_key="solution",
                              metadata_keys=("level",), shuffle=False)
    ds = PromptDataset.from_config(config, apply_chat_template=toy_template)
    a, b = ds.take(2)
    assert a.text == "<|user|>2+2?<|assistant|>" and a.messages == [{"role": "user", "content": "2+2?"}]
    assert b.text == "<|system|>be brief<|user|>3+3?<|assistant|>"
    assert (a.answer, b.answer) == ("#### 4", "6")
    assert (a.metadata, b.metadata) == ({"level": 1}, {"level": 2})
    assert (a.uid, b.uid) == ("0:0", "0:1")
    with pytest.raises(ValueError, match="d.jsonl:3: key 'question' is a list of chat messages but no apply_chat"):
        PromptDataset.from_config(PromptDataConfig(path=str(path), prompt_key="question", answer_key=None))
    plain_path = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "raw text", "answer": 1}])
    (item,) = PromptDataset.from_config(PromptDataConfig(path=str(plain_path))).take(1)
    assert (item.text, item.messages) == ("raw text", None)


@pytest.mark.parametrize(
    "rows,config,needle",
    [
        ([{"prompt": "a", "answer": 1}, "{not json"], {}, "p.jsonl:2: invalid JSON"),
        ([{"prompt": "a", "answer": 1}, {"prompt": "b"}], {}, "p.jsonl:2: missing key 'answer' (row has ['prompt'])"),
        ([{"prompt": "a", "answer": 1}, {"prompt": "b", "answer": 2}], {"metadata_keys": ("difficulty",)},
         "p.jsonl:1: missing key 'difficulty'"),
        ([[1, 2]], {}, "p.jsonl:1: expected a JSON object, got list"),
        ([{"prompt": 5, "answer": 1}], {}, "p.jsonl:1: key 'prompt' must be a string or"),
        ([{"prompt": [{"role": "user"}], "answer": 1}], {"template": True}, "key 'prompt' must be a string or"),
    ],
)
def test_malformed_rows_name_file_line_and_key(tmp_path: Path, rows: list, config: dict, needle: str) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    template = toy_template if config.pop("template", False) else None
    with pytest.raises(ValueError) as info:
        PromptDataset.from_config(PromptDataConfig(path=str(path), **config), apply_chat_template=template)
    assert needle in str(info.value)


def test_template_must_return_text(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "answer": 1}])
    with pytest.raises(TypeError, match="tokenize=False"):
        PromptDataset.from_config(PromptDataConfig(path=str(path)), apply_chat_template=lambda m, **k: [1, 2])


def test_file_format_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="missing.jsonl' does not exist"):
        read_records(tmp_path / "missing.jsonl")
    (tmp_path / "d.xlsx").write_text("a,b\n")
    with pytest.raises(InputError, match="unknown format '.xlsx'; use .jsonl"):
        read_records(tmp_path / "d.xlsx")
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(InputError, match="d.parquet: not a readable Parquet file"):
        read_records(tmp_path / "d.parquet")


def test_order_is_a_permutation_fixed_by_seed_and_epoch(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path, n=7, seed=3)
    epochs = [[item.index for item in ds.take(7)] for _ in range(3)]
    assert all(sorted(e) == list(range(7)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3  # each epoch reshuffled
    again = make_dataset(tmp_path, n=7, seed=3)
    assert [[item.index for item in again.take(7)] for _ in range(3)] == epochs
    other = make_dataset(tmp_path, n=7, seed=4)
    assert [item.index for item in other.take(7)] != epochs[0]
    unshuffled = make_dataset(tmp_path, n=7, shuffle=False)
    assert [item.index for item in unshuffled.take(9)] == [0, 1, 2, 3, 4, 5, 6, 0, 1]


@pytest.mark.parametrize("stop_after", [0, 3, 7, 12])
def test_resume_takes_exactly_the_uninterrupted_prompts(tmp_path: Path, stop_after: int) -> None:
    sizes = [3, 4, 2, 5, 3]
    reference = make_dataset(tmp_path, seed=11)
    expected = [item.uid for size in sizes for item in reference.take(size)]
    assert len(set(expected)) == len(expected)  # ids are unique across epochs

    first = make_dataset(tmp_path, seed=11)
    taken = [item.uid for item in first.take(stop_after)]
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as plain data
    resumed = make_dataset(tmp_path, seed=11)
    resumed.load_state_dict(state)
    taken += [item.uid for item in resumed.take(sum(sizes) - stop_after)]
    assert taken == expected


def test_resume_refuses_a_different_dataset_or_seed(tmp_path: Path) -> None:
    state = make_dataset(tmp_path, seed=1).state_dict()
    with pytest.raises(ValueError, match="saved seed=1 but this run has seed=2"):
        make_dataset(tmp_path, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="saved num_rows=7 but this run has num_rows=5"):
        make_dataset(tmp_path, n=5, seed=1).load_state_dict(state)


def test_max_epochs_ends_the_stream(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path, n=3, max_epochs=2)
    assert len(ds.take(5)) == 5 and not ds.exhausted
    assert len(ds.take(5)) == 1 and ds.exhausted and ds.take(1) == []
    with pytest.raises(ValueError, match="max_epochs \\(0\\) must be > 0"):
        PromptDataConfig(path="x", max_epochs=0)


@pytest.mark.parametrize(
    "lines,needle",
    [
        ([b'{"prompt": "a", "answer": 1}', b'{"prompt": "b", "answer": null}'],
         "p.jsonl:2: key 'answer' is null; every row needs its answer"),
        ([b'{"prompt": null, "answer": 1}'], "p.jsonl:1: key 'prompt' is null; every row needs its prompt"),
        ([b'{"prompt": "", "answer": 1}'], "p.jsonl:1: key 'prompt' is an empty prompt"),
        ([b'{"prompt": "a", "answer": 1}', b"", b'{"prompt": "caf\xe9", "answer": 1}'],
         "p.jsonl:3: invalid UTF-8 (byte 0xe9 at column 16)"),
        ([b'{"prompt": "a", "prompt": "b", "answer": 1}'], "p.jsonl:1: invalid JSON (duplicate key 'prompt')"),
        ([b'{"prompt": "a", "answer": {"x": 1, "x": 2}}'], "p.jsonl:1: invalid JSON (duplicate key 'x')"),
    ],
)
def test_null_values_bad_bytes_and_duplicate_keys_name_file_and_line(tmp_path: Path, lines: list, needle: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(InputError) as info:
        PromptDataset.from_config(PromptDataConfig(path=str(path)))
    assert needle in str(info.value)


def test_no_answer_key_allows_rows_without_answers(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "answer": None}])
    (item,) = PromptDataset.from_config(PromptDataConfig(path=str(path), answer_key=None)).take(1)
    assert item.answer is None


def test_byte_order_mark_and_row_locations(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "answer": 1}\n\n{"prompt": "b", "answer": 2}\n')
    ds = PromptDataset.from_config(PromptDataConfig(path=str(path), shuffle=False))
    assert [row.text for row in ds.rows] == ["a", "b"]
    assert [ds.where(row.index) for row in ds.rows] == [f"{path}:1", f"{path}:3"]


def test_unreadable_paths_are_input_errors(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()  # a directory is read through `datasets` (tests/rollout/test_prompt_sources.py)
    with pytest.raises(InputError, match="doesn't contain any data files"):
        read_records(tmp_path / "dir")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(InputError, match="empty.jsonl has no rows"):
        PromptDataset.from_config(PromptDataConfig(path=str(tmp_path / "empty.jsonl")))
