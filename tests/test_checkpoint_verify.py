"""Verified checkpoints (issue 13): every file a checkpoint holds is listed in its manifest, and a
resume refuses, by name, a file that was flipped, resized, removed or added; `latest.json` cannot
lead outside the run's checkpoints; a damaged rollout buffer is refused whole, never half-loaded.

The single-process files come from a real (tiny) run; the actors' files from the coordinator's own
`save_checkpoint` driven with a stand-in for its sockets, the trainer's half written by a
`ParallelTrainer` in this process as the trainer group would."""

import json
import os
import random
import re
import shutil
from collections import deque
from types import SimpleNamespace

import msgspec
import pytest
import torch

from rl_engine import protocol as P
from rl_engine import run_checkpoint as rc
from rl_engine.actors.ledger import PromptLedger
from rl_engine.actors.rollout_buffer import Prompt, RolloutBuffer, staleness
from rl_engine.cli import main
from rl_engine.config import load_config
from rl_engine.run_checkpoint import CheckpointError
from rl_engine.train_cli import run
from rl_engine.train_config import RLConfig

TINY_RUN = ["warmup.steps=0", "data.num_eval=2", "rollout.prompts_per_step=2", "rollout.n=2",
            "rollout.max_new_tokens=4", "reward.num_workers=0", "train.threads=1", "train.steps=2",
            "train.checkpoint_every=1"]


def flip_byte(path, *, seed: int = 0) -> None:
    data = bytearray(open(path, "rb").read())
    data[random.Random(seed).randrange(len(data))] ^= 0x10
    open(path, "wb").write(bytes(data))


def files_of(checkpoint) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), checkpoint) for d, _, names in os.walk(checkpoint)
                  for n in names if n != rc.MANIFEST)


# ---- single process ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("single"))
    run(load_config(RLConfig, None, [*TINY_RUN, f"train.output_dir={out}"]))
    return out


def test_single_process_manifest_lists_every_file(single_run):
    checkpoint = rc.latest(single_run)
    manifest = json.load(open(os.path.join(checkpoint, rc.MANIFEST)))
    assert sorted(manifest) == files_of(checkpoint) == ["model.pt", "optimizer.pt", "rng.pt", "trainer_state.json"]
    assert rc.resolve_resume(single_run, "auto") == checkpoint


@pytest.mark.parametrize("name", ["model.pt", "optimizer.pt", "rng.pt", "trainer_state.json"])
def test_single_process_flipped_byte_is_refused_naming_the_file(single_run, tmp_path, name):
    out = str(tmp_path / "run")
    shutil.copytree(single_run, out)
    checkpoint = rc.latest(out)
    flip_byte(os.path.join(checkpoint, name))
    with pytest.raises(CheckpointError) as e:
        rc.resolve_resume(out, "auto")
    message = str(e.value)
    assert f"{os.path.join(checkpoint, name)} does not match its sha256" in message
    assert f"train.resume={rc.step_dir(out, 1)}" in message  # the earlier checkpoint to use instead
    with pytest.raises(CheckpointError, match=name):  # an explicit directory is verified the same way
        rc.resolve_resume(out, checkpoint)
    assert rc.resolve_resume(out, rc.step_dir(out, 1)) == rc.step_dir(out, 1)


def test_single_process_cli_resume_refuses_a_damaged_checkpoint(single_run, tmp_path, capsys):
    out = str(tmp_path / "run")
    shutil.copytree(single_run, out)
    model = os.path.join(rc.latest(out), "model.pt")
    flip_byte(model, seed=1)
    assert main(["train", *TINY_RUN, f"train.output_dir={out}", "train.resume=auto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("config error: checkpoint ") and model in err[0], err


def test_missing_resized_and_unlisted_files_are_refused(single_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(single_run, out)
    checkpoint = rc.latest(out)
    rng = os.path.join(checkpoint, "rng.pt")
    saved = open(rng, "rb").read()
    open(rng, "ab").write(b"\0")
    with pytest.raises(CheckpointError, match=f"{rng} has {len(saved) + 1} bytes, its manifest says {len(saved)}"):
        rc.verify(checkpoint)
    os.remove(rng)
    with pytest.raises(CheckpointError, match=f"{rng} is missing"):
        rc.verify(checkpoint)
    open(rng, "wb").write(saved)
    rc.verify(checkpoint)
    extra = os.path.join(checkpoint, "trainer", "rank00001.safetensors")
    os.makedirs(os.path.dirname(extra))
    open(extra, "wb").write(b"x")
    with pytest.raises(CheckpointError, match=f"{extra} is not listed in its manifest"):
        rc.verify(checkpoint)
    shutil.rmtree(os.path.dirname(extra))
    manifest = os.path.join(checkpoint, rc.MANIFEST)
    open(manifest, "w").write("{not json")
    with pytest.raises(CheckpointError, match=f"{manifest} is unreadable"):
        rc.verify(checkpoint)
    os.remove(manifest)
    with pytest.raises(CheckpointError, match="holds no manifest.json"):
        rc.verify(checkpoint)
    first = rc.step_dir(out, 1)
    flip_byte(os.path.join(first, "optimizer.pt"))
    with pytest.raises(CheckpointError, match="no earlier checkpoint of this run is left"):
        rc.verify(first)


# ---- latest.json -----------------------------------------------------------------------------------
def _committed_run(out: str, step: int) -> str:
    os.makedirs(rc.step_dir(out, step))
    open(os.path.join(rc.step_dir(out, step), "state.json"), "w").write("{}")
    return rc.commit(out, step, keep=2)


@pytest.mark.parametrize("pointer", [
    {"step": 3, "path": "../../other/checkpoints/step_000003"},
    {"step": 3, "path": "ABSOLUTE"},
    {"step": 3, "path": "step_000003/.."},
    {"step": 3, "path": "LINK"},
    {"step": 4, "path": "step_000003"},  # the step does not match the directory
    {"path": "step_000003"},
    ["step_000003"],
])
def test_latest_json_may_only_name_a_checkpoint_of_its_run(tmp_path, pointer):
    other = _committed_run(str(tmp_path / "other"), 3)
    out = str(tmp_path / "run")
    _committed_run(out, 1)
    root = rc.checkpoints_root(out)
    if isinstance(pointer, dict) and pointer["path"] == "ABSOLUTE":
        pointer["path"] = other
    if isinstance(pointer, dict) and pointer["path"] == "LINK":  # a step_<k> name that links elsewhere
        os.symlink(other, os.path.join(root, "step_000003"))
        pointer["path"] = "step_000003"
    rc.write_json_atomic(os.path.join(root, rc.LATEST), pointer)
    with pytest.raises(CheckpointError, match="latest.json"):
        rc.resolve_resume(out, "auto")


def test_latest_json_that_is_not_json_is_refused(tmp_path):
    out = str(tmp_path)
    _committed_run(out, 1)
    open(os.path.join(rc.checkpoints_root(out), rc.LATEST), "w").write('{"step": 1, "pa')
    with pytest.raises(CheckpointError, match="latest.json is unreadable"):
        rc.latest(out)


# ---- actors -----------------------------------------------------------------------------------------
def _result(rid: str, versions: list[int], reason: str, *, samples: int = 2) -> P.GenerateResult:
    n = len(versions)
    return P.GenerateResult(request_id=rid, interrupted=reason == "abort", samples=[P.SampleResult(
        sample_id=f"{rid}/{i}", token_ids=torch.arange(n) + i, behavior_logprobs=-torch.rand(n),
        policy_versions=torch.tensor(versions), kv_versions=torch.tensor(versions), finish_reason=reason)
        for i in range(samples)])


def _buffer() -> RolloutBuffer:
    buf = RolloutBuffer()
    for i in range(4):
        buf.add(f"0:{i}", Prompt([1, 2, 3 + i], {"answer": str(i), "tags": ["a", i]}, 100 + i))
    buf.queue.popleft()
    buf.interrupted("0:0", _result("0:0#1", [3, 3, 4], "abort"))
    buf.queue.remove("0:1")
    buf.buffer.append(("0:1", _result("0:1#1", [4, 5], "stop"), [1.0, 0.0]))
    return buf


def _coordinator_checkpoint(out: str, *, step: int) -> str:
    """Coordinator.save_checkpoint (the real one) with its trainer answering from this process."""
    from rl_engine.actors.coordinator import Coordinator
    from rl_engine.policy.optimizer import OptimizerConfig
    from rl_engine.policy.parallel import SINGLE
    from rl_engine.policy.parallel_trainer import ParallelTrainer
    from rl_engine.policy.presets import preset_config

    trainer = ParallelTrainer(preset_config("tiny"), groups=SINGLE, optim=OptimizerConfig(lr=1e-3))

    def send(to: str, msg: P.Message) -> None:
        assert to == "trainer" and isinstance(msg, P.SaveCheckpoint)
        trainer.save_checkpoint(msg.path, extra={"policy_version": 2, "step": msg.step})

    ledger = PromptLedger()
    for uid in ("0:0", "0:1", "0:2", "0:3"):
        ledger.take(uid)
    coordinator = SimpleNamespace(
        cfg=load_config(RLConfig, None, [f"train.output_dir={out}", "placement.mode=disaggregated",
                                         "rollout.mode=async"]),
        send=send, take=lambda predicate, what: None, stream=_buffer(), version=2, eval_before=0.25,
        prompts=SimpleNamespace(dataset=SimpleNamespace(state_dict=lambda: {"cursor": 4})), ledger=ledger,
        async_counts={"interrupted": 1})
    return Coordinator.save_checkpoint(coordinator, step)


@pytest.fixture(scope="module")
def actors_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("actors"))
    _coordinator_checkpoint(out, step=1)
    _coordinator_checkpoint(out, step=2)
    return out


def test_actors_manifest_lists_every_file_and_shard(actors_run):
    checkpoint = rc.resolve_resume(actors_run, "auto")
    assert checkpoint == rc.step_dir(actors_run, 2)
    manifest = json.load(open(os.path.join(checkpoint, rc.MANIFEST)))
    assert sorted(manifest) == files_of(checkpoint) == [
        "coordinator_state.json", "rollout_buffer.msgpack",
        "trainer/metadata.json", "trainer/rank00000.json", "trainer/rank00000.safetensors"]
    saved = RolloutBuffer.from_bytes(open(os.path.join(checkpoint, "rollout_buffer.msgpack"), "rb").read())
    assert saved.prompts == _buffer().prompts and list(saved.queue) == ["0:0", "0:2", "0:3"]


@pytest.mark.parametrize("name", ["coordinator_state.json", "rollout_buffer.msgpack", "trainer/metadata.json",
                                  "trainer/rank00000.json", "trainer/rank00000.safetensors"])
def test_actors_flipped_byte_is_refused_naming_the_file(actors_run, tmp_path, name):
    out = str(tmp_path / "run")
    shutil.copytree(actors_run, out)
    checkpoint = rc.latest(out)
    flip_byte(os.path.join(checkpoint, name), seed=len(name))
    with pytest.raises(CheckpointError) as e:
        rc.resolve_resume(out, "auto")
    assert f"{os.path.join(checkpoint, name)} does not match its sha256" in str(e.value)
    assert f"train.resume={rc.step_dir(out, 1)}" in str(e.value)


def test_a_flipped_tensor_value_in_a_shard_is_refused(actors_run, tmp_path):
    """The case the issue saw resume silently: one value altered, the file still well-formed."""
    from safetensors.torch import load_file

    out = str(tmp_path / "run")
    shutil.copytree(actors_run, out)
    shard = os.path.join(rc.latest(out), "trainer", "rank00000.safetensors")
    before = {name: t.clone() for name, t in load_file(shard).items()}
    data = bytearray(open(shard, "rb").read())
    data[-1] ^= 0x7F  # the last byte of the last tensor's data
    open(shard, "wb").write(bytes(data))
    after = load_file(shard)  # loads without complaint, one value changed
    assert [name for name in before if not torch.equal(before[name], after[name])] != []
    with pytest.raises(CheckpointError, match="rank00000.safetensors does not match its sha256"):
        rc.resolve_resume(out, "auto")


# ---- the rollout buffer's decoding ---------------------------------------------------------------------
def _assert_consistent(buf: RolloutBuffer) -> None:
    """What a buffer the coordinator resumes with must satisfy, checked independently of `check`."""
    for uid in [*buf.queue, *buf.partials, *(u for u, _, _ in buf.buffer)]:
        assert isinstance(uid, str) and isinstance(buf.prompts[uid], Prompt)
    for p in buf.prompts.values():
        assert all(isinstance(t, int) for t in p.prompt_ids) and isinstance(p.seed, int)
    results = [*buf.partials.values(), *(r for _, r, _ in buf.buffer)]
    for uid, result, rewards in buf.buffer:
        assert len(rewards) == len(result.samples) and all(isinstance(x, float) for x in rewards)
    for result in results:
        assert isinstance(result, P.GenerateResult)
        for s in result.samples:
            n = s.token_ids.numel()
            assert s.behavior_logprobs.numel() == s.policy_versions.numel() == s.kv_versions.numel() == n
        staleness(result, 10)
    assert RolloutBuffer.from_bytes(buf.to_bytes()).to_bytes() == buf.to_bytes()


def _mutations(data: bytes, count: int, seed: int):
    rng = random.Random(seed)
    for _ in range(count):
        kind = rng.choice(["truncate", "flip", "flip3", "delete", "insert", "splice"])
        b = bytearray(data)
        i = rng.randrange(len(b))
        if kind == "truncate":
            b = b[:i]
        elif kind == "flip":
            b[i] ^= rng.randrange(1, 256)
        elif kind == "flip3":
            for j in rng.sample(range(len(b)), 3):
                b[j] ^= rng.randrange(1, 256)
        elif kind == "delete":
            del b[i:i + rng.randint(1, 8)]
        elif kind == "insert":
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:  # a run of bytes copied from elsewhere in the file
            j = rng.randrange(len(b))
            b[i:i + 8] = data[j:j + 8]
        if bytes(b) != data:
            yield kind, bytes(b)


def test_mutated_rollout_buffer_is_refused_or_fully_consistent(actors_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(actors_run, out)
    checkpoint = rc.latest(out)
    file = os.path.join(checkpoint, "rollout_buffer.msgpack")
    data = open(file, "rb").read()
    refused = decoded = 0
    for kind, mutated in _mutations(data, 400, seed=13):
        # Through a resume: the manifest refuses every one, naming the file.
        open(file, "wb").write(mutated)
        with pytest.raises(CheckpointError, match="rollout_buffer.msgpack (has|does not match)"):
            rc.resolve_resume(out, "auto")
        # Bypassing the manifest: one clear error naming the file, or a wholly consistent buffer.
        try:
            buf = RolloutBuffer.from_bytes(mutated, source=file)
        except CheckpointError as e:
            assert str(e).startswith(f"{file} is damaged and cannot be loaded ("), str(e)
            refused += 1
            continue
        assert kind != "truncate"  # a cut-off buffer never decodes
        _assert_consistent(buf)
        decoded += 1
    assert refused + decoded >= 380 and refused > decoded > 0, (refused, decoded)


def test_rollout_buffer_refuses_orphans_and_any_decoding_failure():
    good = _buffer()
    orphan = _buffer()
    orphan.queue.append("9:9")
    wrong_rewards = _buffer()
    wrong_rewards.buffer[0] = (*wrong_rewards.buffer[0][:2], [1.0])
    extra_field = msgspec.msgpack.encode({**msgspec.msgpack.decode(good.to_bytes()), "more": 1})
    not_a_result = msgspec.msgpack.decode(good.to_bytes())
    not_a_result["partials"]["0:0"] = [bytes(f) for f in P.encode(P.Ack(ref="x"))]
    nested = msgspec.msgpack.decode(good.to_bytes())
    nested["prompts"]["0:1"][1] = "DEEP"  # an answer nested far deeper than the recursion limit
    deep = b"\x91" * 100_000 + b"\xc0"
    nested = msgspec.msgpack.encode(nested).replace(msgspec.msgpack.encode("DEEP"), deep)
    cases = {
        "queue holds ['9:9'], which have no prompt": orphan.to_bytes(),
        "has 2 samples but 1 rewards": wrong_rewards.to_bytes(),
        "unknown field `more`": extra_field,
        "decodes to Ack, not GenerateResult": msgspec.msgpack.encode(not_a_result),
        "RecursionError": nested,
        "ValidationError: Expected `object`, got `array`": b"\x93\x01\x02",
        "DecodeError": b"",
    }
    for expected, data in cases.items():
        with pytest.raises(CheckpointError, match=f"^ckpt/rollout_buffer.msgpack is damaged.*{re.escape(expected)}"):
            RolloutBuffer.from_bytes(data, source="ckpt/rollout_buffer.msgpack")
    back = RolloutBuffer.from_bytes(good.to_bytes())
    assert back.prompts == good.prompts and list(back.queue) == list(good.queue)
    assert isinstance(back.buffer, deque) and back.buffer[0][2] == [1.0, 0.0]
