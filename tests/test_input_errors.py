"""Every user error of `rl-engine train` / `generate` (a config value out of range, an unknown key, bad
YAML, a missing or broken model directory, a bad dataset row) is one line on stderr naming the key
and its allowed range, or the file (`file:line` for a row), and exit code 2, before any work: `run`
(the warm start, the actors) is never reached."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from rl_engine import train_cli
from rl_engine.cli import main

# A small run on a user dataset: no warm start, no builtin data written.
SMALL = ["warmup.path=null", "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=8",
         "train.steps=1", "data.num_eval=2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from rl_engine.policy.presets import write_preset_checkpoint

    return write_preset_checkpoint("tiny", str(tmp_path_factory.mktemp("model")), seed=0)


@pytest.fixture
def no_run(monkeypatch):
    """Fails the test if the run itself (warm start, trainer, actors) is reached."""
    def reached(*args, **kwargs):
        pytest.fail("the run started: the error was not caught before any work")

    monkeypatch.setattr(train_cli, "run", reached)


def write_rows(path, rows) -> str:
    path.write_bytes(b"".join(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode() for r in rows))
    return str(path)


GOOD_ROWS = [{"prompt": "upper abc", "answer": "ABC"}, {"prompt": "upper de", "answer": "DE"}]


def one_error_line(argv: list[str], capsys) -> str:
    rc = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2, captured
    assert len(lines) == 1, lines
    assert "warm start" not in captured.out and "Traceback" not in captured.err
    return lines[0]


# (overrides, the error line's start): each value of issue 13 and one of every kind of field.
CONFIG_VALUES = [
    ("rollout.top_p=1.5", "config error: rollout.top_p=1.5 must be in (0, 1]"),
    ("rollout.top_p=0", "config error: rollout.top_p=0.0 must be in (0, 1]"),
    ("rollout.top_k=-5", "config error: rollout.top_k=-5 must be >= 1, or 0 / -1 (off)"),
    ("rollout.kv_cache_memory_mb=0", "config error: rollout.kv_cache_memory_mb=0 must be >= 1"),
    ("optim.lr=-1", "config error: optim.lr=-1.0 must be finite and > 0"),
    ("optim.lr=nan", "config error: optim.lr=nan must be finite and > 0"),
    ("optim.lr=.inf", "config error: optim.lr=inf must be finite and > 0"),
    ("optim.betas=[2,3]", "config error: optim.betas[0]=2.0 must be in [0, 1)"),
    ("optim.betas=[0.9,1]", "config error: optim.betas[1]=1.0 must be in [0, 1)"),
    ("optim.eps=0", "config error: optim.eps=0.0 must be finite and > 0"),
    ("optim.weight_decay=-0.1", "config error: optim.weight_decay=-0.1 must be finite and >= 0"),
    ("optim.grad_clip=0", "config error: optim.grad_clip=0.0 must be > 0"),
    ("train.steps=-1", "config error: train.steps=-1 must be >= 1"),
    ("train.micro_batch_tokens=1", "config error: train.micro_batch_tokens=1 must be at least the longest prompt"),
    ("train.tp=0", "config error: train.tp=0 must be >= 1"),
    ("train.seed=-1", "config error: train.seed=-1 must be in [0, 9223372036854775807]"),
    ("train.keep_checkpoints=0", "config error: train.keep_checkpoints=0 must be >= 1"),
    ("train.device=gpu", "config error: train.device='gpu' must be cpu, cuda"),
    ("rollout.temperature=inf", "config error: rollout.temperature=inf must be > 0 and <= 100"),
    ("rollout.temperature=0", "config error: rollout.temperature=0.0 must be > 0 and <= 100; 0 (greedy) is not"),
    ("rollout.n=100000", "config error: rollout.n=100000 must be in [1, 4096]"),
    ("rollout.n=0", "config error: rollout.n=0 must be in [1, 4096]"),
    ("rollout.prompts_per_step=0", "config error: rollout.prompts_per_step=0 must be >= 1"),
    ("rollout.max_new_tokens=0", "config error: rollout.max_new_tokens=0 must be >= 1"),
    ("rollout.max_staleness=-1", "config error: rollout.max_staleness=-1 must be >= 0"),
    ("warmup.lr=nan", "config error: warmup.lr=nan must be finite and > 0"),
    ("warmup.batch_size=0", "config error: warmup.batch_size=0 must be >= 1"),
    ("data.num_eval=0", "config error: data.num_eval=0 must be in [1, 10000]"),
    ("placement.heartbeat_interval_s=-1", "config error: placement.heartbeat_interval_s=-1.0 must be finite and > 0"),
    ("placement.startup_timeout_s=inf", "config error: placement.startup_timeout_s=inf must be finite and > 0"),
    ("placement.host=0.0.0.0", "config error: placement.host=0.0.0.0 is a wildcard address"),
    ("placement.host='::'", "config error: placement.host=:: is a wildcard address"),
    ("reward.timeout_s=inf", "config error: reward.timeout_s=inf must be finite and > 0"),
    ("reward.num_workers=-1", "config error: reward.num_workers (-1) must be >= 0"),
    ("advantage.eps=0", "config error: advantage.eps (0.0) must be > 0"),
    ("loss.clip_low=1.5", "config error: loss.clip_low (1.5) must be in (0, 1)"),
    ("loss.entropy_coef=.inf", "config error: loss.entropy_coef=inf must be finite and >= 0"),
    ("loss.importance_sampling.mode=clip", "config error: loss.importance_sampling.mode='clip' is not valid"),
    ("rollout.top_q=1", "config error: unknown config key 'rollout.top_q'; did you mean 'rollout.top_p'?"),
    ("model.path=builtin:huge", "config error: model.path='builtin:huge' names no builtin; known: builtin:tiny"),
    ("data.path=builtin:sort", "config error: data.path='builtin:sort' names no builtin; known: builtin:upper"),
]


@pytest.mark.parametrize(("override", "expected"), CONFIG_VALUES, ids=[c[0] for c in CONFIG_VALUES])
def test_bad_config_values_are_one_line_before_any_work(override, expected, tmp_path, capsys, no_run):
    line = one_error_line(["train", f"train.output_dir={tmp_path}", override], capsys)
    assert line.startswith(expected), line
    assert not os.listdir(tmp_path)  # refused at load: not even the builtin model was written


@pytest.mark.parametrize(("text", "expected"), [
    ("rollout:\n  n: 4\n  top_p: 0.9\n  n: 8\n", "cfg.yaml: invalid YAML config: line 4, column 3: duplicate key 'n' "
                                                 "(first at line 2)"),
    ("base: &b {n: 4}\nrollout: *b\n", "cfg.yaml: invalid YAML config: line 1, column 7: YAML anchors and aliases"),
    ("rollout:\n  n: 4\n top_p: [\n", "cfg.yaml: invalid YAML config: line 3, column 2:"),
    ("rollout: [1, 2]\n", "config error: rollout: expected a mapping for RolloutSection"),
    ("- 1\n", "cfg.yaml: the top level must be a mapping"),
    (b"rollout:\n  mode: \xff\n", "cfg.yaml: invalid YAML config:"),
])
def test_bad_yaml_files_name_the_file_and_line(text, expected, tmp_path, capsys, no_run):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    line = one_error_line(["train", str(path), f"train.output_dir={tmp_path / 'out'}"], capsys)
    assert line.startswith("config error: ") and expected in line, line


def test_missing_config_file(tmp_path, capsys, no_run):
    line = one_error_line(["train", str(tmp_path / "nope.yaml")], capsys)
    assert line == f"config error: config file {str(tmp_path / 'nope.yaml')!r} does not exist"


def _break_model(model_dir: str, target: str, how: str) -> str:
    """A copy of the model directory with `how` done to its file `target`."""
    broken = os.path.join(os.path.dirname(model_dir), f"broken_{how}_{target}")
    shutil.rmtree(broken, ignore_errors=True)
    shutil.copytree(model_dir, broken)
    path = os.path.join(broken, target)
    if how == "remove":
        os.remove(path)
    elif how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how == "duplicate":
        text = open(path).read()
        open(path, "w").write(text.replace("{", '{"model_type": "qwen2", ', 1))
    elif how == "unsupported":
        hf = json.load(open(path))
        open(path, "w").write(json.dumps({**hf, "model_type": "gpt2"}))
    return broken


@pytest.mark.parametrize(("target", "how", "expected"), [
    ("config.json", "remove", "no config.json in '{dir}'"),
    ("config.json", "truncate", "{dir}/config.json: invalid JSON ("),
    ("config.json", "duplicate", "{dir}/config.json: invalid JSON (duplicate key 'model_type')"),
    ("config.json", "unsupported", "{dir}/config.json: unsupported model_type 'gpt2'"),
    ("model.safetensors", "truncate", "{dir}/model.safetensors: not a readable safetensors file"),
    ("model.safetensors", "remove", "no model.safetensors or model.safetensors.index.json in '{dir}'"),
    ("tokenizer.json", "remove", "no tokenizer.json in '{dir}'"),
    ("tokenizer.json", "truncate", "{dir}: cannot load its tokenizer"),
])
def test_broken_model_dirs_name_the_file(model_dir, target, how, expected, tmp_path, capsys, no_run):
    broken = _break_model(model_dir, target, how)
    data = write_rows(tmp_path / "p.jsonl", GOOD_ROWS)
    line = one_error_line(["train", *SMALL, f"model.path={broken}", f"data.path={data}",
                           f"train.output_dir={tmp_path / 'out'}"], capsys)
    assert line.startswith("error: " + expected.format(dir=broken)), line


def test_missing_model_dir(tmp_path, capsys, no_run):
    data = write_rows(tmp_path / "p.jsonl", GOOD_ROWS)
    line = one_error_line(["train", *SMALL, f"model.path={tmp_path / 'nope'}", f"data.path={data}",
                           f"train.output_dir={tmp_path / 'out'}"], capsys)
    assert line == f"error: model directory {str(tmp_path / 'nope')!r} does not exist"


@pytest.mark.parametrize(("rows", "expected"), [
    ([GOOD_ROWS[0], {"prompt": "upper x", "answer": None}], "p.jsonl:2: key 'answer' is null"),
    ([GOOD_ROWS[0], {"prompt": None, "answer": "X"}], "p.jsonl:2: key 'prompt' is null"),
    ([GOOD_ROWS[0], {"prompt": "upper x"}], "p.jsonl:2: missing key 'answer'"),
    ([GOOD_ROWS[0], b"{not json\n"], "p.jsonl:2: invalid JSON (Expecting property name"),
    ([GOOD_ROWS[0], GOOD_ROWS[1], b'{"prompt": "upper \xff", "answer": "X"}\n'], "p.jsonl:3: invalid UTF-8 (byte 0xff"),
    ([b'{"prompt": "a", "answer": "A", "answer": "B"}\n'], "p.jsonl:1: invalid JSON (duplicate key 'answer')"),
    ([], "dataset {dir}/p.jsonl has no rows"),
])
def test_bad_dataset_rows_name_file_and_line(model_dir, rows, expected, tmp_path, capsys, no_run):
    data = write_rows(tmp_path / "p.jsonl", rows)
    line = one_error_line(["train", *SMALL, f"model.path={model_dir}", f"data.path={data}",
                           f"train.output_dir={tmp_path / 'out'}"], capsys)
    assert line.startswith("error: ") and expected.format(dir=tmp_path) in line, line


def test_missing_dataset_and_bad_warm_start_rows(model_dir, tmp_path, capsys, no_run):
    base = ["train", *SMALL, f"model.path={model_dir}", f"train.output_dir={tmp_path / 'out'}"]
    line = one_error_line([*base, f"data.path={tmp_path / 'nope.jsonl'}"], capsys)
    assert line == f"error: dataset {str(tmp_path / 'nope.jsonl')!r} does not exist"
    data = write_rows(tmp_path / "p.jsonl", GOOD_ROWS)
    line = one_error_line([*base, f"data.path={data}", f"data.eval_path={tmp_path / 'nope.jsonl'}"], capsys)
    assert line == f"error: dataset {str(tmp_path / 'nope.jsonl')!r} does not exist"
    sft = write_rows(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "A"}, {"prompt": "b"}])
    line = one_error_line([*base, f"data.path={data}", f"warmup.path={sft}", "warmup.steps=5"], capsys)
    assert line == (f"error: {sft}:2: a warm-start row needs a string 'response' and a string 'prompt' or a list "
                    "of chat 'messages'")
    line = one_error_line([*base, f"data.path={data}", "warmup.path=builtin"], capsys)
    assert line.startswith("config error: warmup.path='builtin' needs a builtin task in data.path")


def test_lengths_against_the_data_and_the_model(model_dir, tmp_path, capsys, no_run):
    """What needs the tokenized prompts: the micro-batch budget, the model's context, the KV pool."""
    rows = [GOOD_ROWS[0], {"prompt": "upper " + "a" * 40, "answer": "A" * 40}, GOOD_ROWS[1]]
    data = write_rows(tmp_path / "p.jsonl", rows)
    base = ["train", *SMALL, f"data.path={data}", f"train.output_dir={tmp_path / 'out'}"]
    line = one_error_line([*base, f"model.path={model_dir}", "train.micro_batch_tokens=40"], capsys)
    assert line.startswith("config error: train.micro_batch_tokens=40 must be >= ") and f"{data}:2)" in line, line
    long_rows = [GOOD_ROWS[0], {"prompt": "upper " + "a" * 600, "answer": "A"}]
    long_data = write_rows(tmp_path / "long.jsonl", long_rows)
    line = one_error_line([*base, f"model.path={model_dir}", f"data.path={long_data}"], capsys)
    assert line.startswith(f"error: {long_data}:2: the prompt has ") and "context holds 512" in line, line
    # The "small" preset's KV cache: 32 KiB per 16-token block, so 1 MiB holds 31 usable blocks.
    line = one_error_line([*base, "model.path=builtin:small", "rollout.max_new_tokens=500",
                           "train.micro_batch_tokens=4096", "rollout.kv_cache_memory_mb=1"], capsys)
    assert line.startswith("config error: rollout.kv_cache_memory_mb=1 holds 496 tokens"), line
    assert line.endswith("needs 512: give at least 2"), line


def test_unknown_reward_and_actor_placements_are_checked_first(model_dir, tmp_path, capsys, no_run):
    data = write_rows(tmp_path / "p.jsonl", GOOD_ROWS)
    base = ["train", *SMALL, f"model.path={model_dir}", f"data.path={data}", f"train.output_dir={tmp_path / 'out'}"]
    line = one_error_line([*base, "reward.name=no_such_reward"], capsys)
    assert line.startswith("config error: reward.name='no_such_reward': unknown reward 'no_such_reward'"), line
    bad = write_rows(tmp_path / "bad.jsonl", [GOOD_ROWS[0], {"prompt": "b", "answer": None}])
    for mode in ("colocated", "disaggregated"):  # before any process is launched
        line = one_error_line([*base, f"data.path={bad}", f"placement.mode={mode}"], capsys)
        assert line == f"error: {bad}:2: key 'answer' is null; every row needs its answer"


@pytest.mark.parametrize(("flags", "expected"), [
    (["--temperature", "inf"], "error: --temperature=inf must be in [0, 100]; 0 means greedy"),
    (["--temperature", "nan"], "error: --temperature=nan must be in [0, 100]"),
    (["--n", "100000"], "error: --n=100000 must be in [1, 4096]"),
])
def test_generate_flags(model_dir, flags, expected, capsys):
    line = one_error_line(["generate", "--model", model_dir, "--prompt", "ab", *flags], capsys)
    assert line.startswith(expected), line


def test_generate_model_dir_errors(model_dir, tmp_path, capsys):
    line = one_error_line(["generate", "--model", str(tmp_path / "nope"), "--prompt", "ab"], capsys)
    assert line == f"error: model directory {str(tmp_path / 'nope')!r} does not exist"
    broken = _break_model(model_dir, "model.safetensors", "truncate")
    line = one_error_line(["generate", "--model", broken, "--prompt", "ab"], capsys)
    assert line.startswith(f"error: {broken}/model.safetensors: not a readable safetensors file"), line


@pytest.mark.parametrize("argv", [["train", "rollout.top_p=1.5"], ["train", "model.path=/no/such/model/dir"]])
def test_console_entry_point_prints_one_line(argv, tmp_path):
    """The real process: exit code 2, nothing on stdout, one line on stderr, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "rl_engine.cli", *argv, f"train.output_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "top_p=1.5 must be in (0, 1]" in proc.stderr or "'/no/such/model/dir' does not exist" in proc.stderr


def test_actors_resume_from_a_bad_checkpoint_is_one_line_before_any_process(tmp_path, capsys, monkeypatch):
    """The actors path verifies the checkpoint in `prepare`, before the launcher starts anything."""
    import rl_engine.actors.run as actors_run

    monkeypatch.setattr(actors_run, "LocalLauncher", lambda *a, **k: pytest.fail("processes were launched"))
    root = tmp_path / "checkpoints"
    (root / "step_000002").mkdir(parents=True)
    (root / "latest.json").write_text('{"path": "../../other_run/checkpoints/step_000002", "step": 2}')
    line = one_error_line(["train", f"train.output_dir={tmp_path}", "placement.mode=colocated", "warmup.steps=0",
                           "train.resume=auto"], capsys)
    assert line.startswith("error: ") and "latest.json" in line and "not a step_<k> directory" in line, line
