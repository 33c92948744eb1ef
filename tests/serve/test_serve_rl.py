"""`placement.serve_port` in an RL run: `rl-engine train` serves its policy over the OpenAI API while it
trains; two greedy answers across a weight update report increasing versions, and the second equals a
fresh engine loaded with that step's checkpointed weights, token for token."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch

from rl_engine.run_checkpoint import step_dir

HERE = os.path.dirname(os.path.abspath(__file__))
RL_TESTS = os.path.join(os.path.dirname(HERE), "rl")
PROMPT_IDS = [30, 31, 32, 33, 34, 35, 36, 37, 38]
MAX_TOKENS = 5
RUN = ["warmup.steps=0", "data.num_eval=4", "rollout.prompts_per_step=4", "rollout.n=4",
       "rollout.max_new_tokens=24", "reward.name=rl_test_rewards:has_vowel", "reward.num_workers=0",
       "train.steps=40", "train.checkpoint_every=1", "train.keep_checkpoints=100", "optim.lr=0.02",
       "placement.serve_port=0"]


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _address(out_dir, name):
    path = os.path.join(out_dir, "serve", f"{name}.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None


def _greedy(client, model):
    """A greedy answer served by one weights version: (version, token ids)."""
    for _ in range(20):
        r = client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=MAX_TOKENS, temperature=0,
                                      logprobs=0, extra_body={"return_token_ids": True, "ignore_eos": True})
        fp = r.system_fingerprint
        if "-" not in fp:  # a weight update fell inside this request: ask again
            assert set(r.choices[0].policy_versions) == {int(fp[1:])}
            return int(fp[1:]), r.choices[0].token_ids, r.choices[0].logprobs.token_logprobs
    raise AssertionError("no answer came from a single weights version in 20 tries")


PLACEMENTS = {  # placement -> (overrides, the server checked, other servers of the run)
    "single_process": ([], "policy", []),
    "colocated": (["placement.mode=colocated", "placement.heartbeat_timeout_s=60"], "trainer-0", []),
    "disaggregated": (["placement.mode=disaggregated", "placement.num_rollout_workers=2",
                       "placement.heartbeat_timeout_s=60"], "rollout-1", ["rollout-0"]),
}


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_serve_from_a_training_run(tmp_path, placement):
    import openai

    overrides, name, others = PLACEMENTS[placement]
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([RL_TESTS, os.environ.get("PYTHONPATH", "")])}
    env.pop("RL_ENGINE_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "rl_engine.cli", "train", *RUN, *overrides,
                             f"train.output_dir={out}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        addr = _wait_for(lambda: _address(out, name) or (proc.poll() is not None and {"exit": proc.returncode}),
                         180, "the run's server")
        assert "url" in addr, proc.stdout.read()
        assert addr["host"] == "127.0.0.1" and addr["model"] == "policy"  # loopback by default
        for other in others:  # each rollout worker serves on its own port
            other_addr = _wait_for(lambda: _address(out, other), 60, f"{other}'s server")
            assert other_addr["port"] != addr["port"]
            assert httpx.get(other_addr["url"] + "/models").json()["data"][0]["id"] == "policy"
        client = openai.OpenAI(base_url=addr["url"], api_key="none", max_retries=0, timeout=60)
        models = client.models.list().data
        assert [m.id for m in models] == ["policy"]
        v1, first, first_lp = _greedy(client, "policy")

        def version():
            return httpx.get(addr["url"] + "/models").json()["data"][0]["weights_version"]

        _wait_for(lambda: version() > v1, 120, "a weight update")
        v2, second, second_lp = _greedy(client, "policy")
        assert v2 > v1
        ckpt = step_dir(str(out), v2)  # weights version k = the weights after step k

        def committed():
            path = os.path.join(out, "checkpoints", "latest.json")
            return os.path.isfile(path) and json.load(open(path))["step"] >= v2

        _wait_for(lambda: committed() or proc.poll() is not None, 120, f"the step-{v2} checkpoint")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    from rl_engine.convert import detect_source, load_model
    from rl_engine.inference import LLM, SamplingParams

    def fresh(step_dir: str | None):
        """A new engine on a checkpoint's weights (None: the run's initial model, version 0)."""
        source = detect_source(step_dir) if step_dir else None
        if source is None:
            from rl_engine.policy import from_pretrained

            model = from_pretrained(str(out / "init_model"), dtype=torch.float32)
        else:
            model = load_model(source, torch.float32)[0]
        llm = LLM(model, kv_cache_memory=8 << 20)
        return llm.generate([PROMPT_IDS], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))[0]

    ref2 = fresh(ckpt).outputs[0]
    assert ref2.token_ids == second
    # log-probs too (fp32; the served request shared batches with rollouts: reduction order differs)
    assert max(abs(a - b) for a, b in zip(ref2.logprobs, second_lp)) < 1e-4
    # and the weights did move between the two answers: version v1's engine scores the v2 answer otherwise
    ref1 = step_dir(str(out), v1) if v1 > 0 else None
    if ref1 is None or os.path.isdir(ref1):
        old = fresh(ref1).outputs[0]
        assert old.token_ids == first and max(abs(a - b) for a, b in zip(old.logprobs, first_lp)) < 1e-4
        assert max(abs(a - b) for a, b in zip(old.logprobs, ref2.logprobs)) > 1e-3 or old.token_ids != second


def test_serve_config_errors():
    from rl_engine.config import ConfigError, load_config
    from rl_engine.train_config import RLConfig

    with pytest.raises(ConfigError, match=r"placement.serve_port=70000 must be in \[0, 65535\]"):
        load_config(RLConfig, None, ["placement.serve_port=70000"])
    with pytest.raises(ConfigError, match="needs train.tp=1"):
        load_config(RLConfig, None, ["placement.serve_port=0", "placement.mode=colocated", "train.tp=2"])
    with pytest.raises(ConfigError, match="up to 65536"):
        load_config(RLConfig, None, ["placement.serve_port=65535", "placement.mode=disaggregated",
                                     "placement.num_rollout_workers=2"])
    cfg = load_config(RLConfig, None, [])
    assert cfg.placement.serve_port is None and cfg.placement.serve_host == "127.0.0.1"  # off, loopback
