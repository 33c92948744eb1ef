"""`rollout.speculative` in training runs: the engine's speculative decoding turned on by the run's
config in every placement, acceptance per step in metrics.jsonl (`rollout/spec_*`), behavior log-probs
exact under the log-prob contract, and drafts never made from stale weights.

What a fair comparison is: n-gram drafts are point masses decided by the same per-position uniforms as
plain decoding (`speculative/speculator.py`), so a seeded run with n-gram speculation samples the very
tokens of the run without it (logits of a verify chunk differ from a one-token decode only in the last
float bits); a draft model or MTP draws its drafts from its own distribution q and the rejection test
keeps the target's distribution, not its realisations, so those runs are compared on the contract
(importance ratio 1, k3 mismatch ~0 with identical weights), not token for token."""

from __future__ import annotations

import io
import json

import pytest
import torch

from rl_actor_helpers import child_pythonpath, rows, toy_config
from rl_engine.config import ConfigError, load_config
from rl_engine.train_config import RLConfig
from rl_engine.trainer import GRPOTrainer

# Near-greedy sampling (a tiny random model then repeats itself, so prompt lookup finds drafts the
# target accepts); still sampled and seeded, and trained at this temperature.
TEMPERATURE = 0.2
NGRAM = [f"rollout.temperature={TEMPERATURE}", "rollout.max_new_tokens=12",
         "rollout.speculative={method: ngram, num_speculative_tokens: 3, prompt_lookup_min: 1, prompt_lookup_max: 3}"]
SPEC_KEYS = ("rollout/spec_acceptance_rate", "rollout/spec_mean_accepted_length", "rollout/spec_draft_tokens",
             "rollout/spec_accepted_tokens", "rollout/spec_draft_fixed")


def train(out, *overrides) -> tuple[list[dict], list[dict]]:
    """A single-process run: its step metrics and its samples.jsonl rows. Each step's row also gets
    `engine_spec_counts`: (drafts, accepted, verify steps) summed over every completion the engine
    returned during that step (kept or dropped groups alike), the counts its spec metrics must be."""
    trainer = GRPOTrainer(toy_config(out, "train.dump_samples=true", *overrides))
    counts: list[int] = []
    generate = trainer.llm.generate

    def counting_generate(*args, **kwargs):
        outs = generate(*args, **kwargs)
        for c in (c for o in outs for c in o.outputs):
            counts[:] = [counts[0] + c.spec_draft_tokens, counts[1] + c.spec_accepted_tokens,
                         counts[2] + c.spec_verifies]
        return outs

    trainer.llm.generate = counting_generate
    metrics = []
    try:
        for _ in range(trainer.config.train.steps):
            counts[:] = [0, 0, 0]
            metrics.append({**trainer.step(), "engine_spec_counts": tuple(counts)})
    finally:
        trainer.close()
    with open(out / "samples.jsonl") as f:
        return metrics, [json.loads(line) for line in f]


def assert_spec_metrics(row: dict, *, fixed: bool) -> None:
    """A step's acceptance metrics, consistent with each other; with `engine_spec_counts` (single
    process), they are that step's own counts (not the run's so far)."""
    for key in SPEC_KEYS:
        assert key in row, (key, row)
    drafts, accepted = row["rollout/spec_draft_tokens"], row["rollout/spec_accepted_tokens"]
    assert 0 <= accepted <= drafts
    assert row["rollout/spec_acceptance_rate"] == (accepted / drafts if drafts else 0.0)
    k = 3
    assert 1.0 <= row["rollout/spec_mean_accepted_length"] <= 1 + k
    assert row["rollout/spec_draft_fixed"] == float(fixed)
    if "engine_spec_counts" in row:
        engine_drafts, engine_accepted, verifies = row["engine_spec_counts"]
        assert (drafts, accepted) == (engine_drafts, engine_accepted), row
        assert row["rollout/spec_mean_accepted_length"] == pytest.approx(1 + accepted / verifies, rel=1e-12)


def assert_contract(row: dict) -> None:
    """Identical weights in engine and trainer (sync, one update a step): fp32 log-probs agree to the
    contract's bound, so the importance ratios are 1 (the bounds of the actor tests)."""
    assert row["train/mismatch_k3"] <= 1e-6 and abs(row["train/is_ratio_max"] - 1) <= 1e-5, row


# ---- config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("rollout.speculative.metod=ngram", r"unknown config key 'rollout.speculative.metod'; did you mean "
                                        r"'rollout.speculative.method'"),
    ("rollout.speculative.method=ngram", r"missing required config key 'rollout.speculative.num_speculative_tokens'"),
    ("rollout.speculative={method: ngrm, num_speculative_tokens: 2}", r"rollout.speculative: .*method 'ngrm' is "
                                                                     r"not one of ngram, draft_model, mtp \(did you mean 'ngram'"),
    ("rollout.speculative={method: ngram, num_speculative_tokens: 0}", r"num_speculative_tokens must be an integer >= 1, got 0"),
    ("rollout.speculative={method: draft_model, num_speculative_tokens: 2}", r"'draft_model' needs 'model'"),
    ("rollout.speculative={method: draft_model, num_speculative_tokens: 2, model: 3}", r"model must be a model directory"),
    ("rollout.speculative={method: mtp, num_speculative_tokens: 2, prompt_lookup_max: 3}", r"not for method 'mtp'"),
    ("rollout.speculative={method: ngram, num_speculative_tokens: 2, prompt_lookup_min: 4, prompt_lookup_max: 2}",
     r"prompt_lookup_min \(4\) must be <= prompt_lookup_max \(2\)"),
])
def test_bad_speculative_configs_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RLConfig, None, [override])


def test_speculative_configs_checked_against_the_run(tmp_path):
    from rl_engine.policy.presets import write_preset_checkpoint
    from rl_engine.train_cli import check_inputs

    with pytest.raises(ConfigError, match=r"rollout.speculative with rollout.routing_replay=true is not supported"):
        load_config(RLConfig, None, ["rollout.routing_replay=true",
                                     "rollout.speculative={method: ngram, num_speculative_tokens: 2}"])
    cfg = load_config(RLConfig, None, [f"train.output_dir={tmp_path / 'a'}", "warmup.steps=0", "data.num_eval=4",
                                       "rollout.speculative={method: mtp, num_speculative_tokens: 2}"])
    with pytest.raises(ConfigError, match=r"rollout.speculative.method=mtp needs a deepseek_v3 policy with MTP layers"):
        check_inputs(cfg)  # builtin:tiny is a Qwen2
    missing = tmp_path / "no_such_draft"
    cfg = load_config(RLConfig, None, [f"train.output_dir={tmp_path / 'b'}", "warmup.steps=0", "data.num_eval=4",
                                       f"rollout.speculative={{method: draft_model, num_speculative_tokens: 2, "
                                       f"model: {missing}}}"])
    with pytest.raises(ValueError, match=str(missing)):
        check_inputs(cfg)
    other = write_preset_checkpoint("tiny", str(tmp_path / "draft"))
    with open(f"{other}/tokenizer.json") as f:
        tok = json.load(f)
    tok["model"]["vocab"] = {k: (v + 1) % len(tok["model"]["vocab"]) for k, v in tok["model"]["vocab"].items()}
    with open(f"{other}/tokenizer.json", "w") as f:
        json.dump(tok, f)
    cfg = load_config(RLConfig, None, [f"train.output_dir={tmp_path / 'c'}", "warmup.steps=0", "data.num_eval=4",
                                       f"rollout.speculative={{method: draft_model, num_speculative_tokens: 2, "
                                       f"model: {other}}}"])
    with pytest.raises(ConfigError, match=r"rollout.speculative.model=.* has a different tokenizer"):
        check_inputs(cfg)


# ---- single process ------------------------------------------------------------------------------
def test_ngram_run_samples_what_the_plain_run_samples(tmp_path):
    plain, plain_samples = train(tmp_path / "plain", *NGRAM[:2], "train.steps=2")
    spec, spec_samples = train(tmp_path / "spec", *NGRAM, "train.steps=2")
    for a, b in zip(spec, plain):
        assert_spec_metrics(a, fixed=False)
        assert a["rollout/spec_accepted_tokens"] > 0  # drafts were accepted in every step, not only proposed
        assert_contract(a)
        assert (a["reward/mean"], a["tokens/total"]) == (b["reward/mean"], b["tokens/total"])
        assert abs(a["train/loss"] - b["train/loss"]) <= 1e-6
        assert not any(k.startswith("rollout/spec_") for k in b)
    assert [s["token_ids"] for s in spec_samples] == [s["token_ids"] for s in plain_samples]
    # Behavior log-probs of the two engine paths (verify chunk, one-token decode) with the same weights:
    # step 1 only. They differ in the last float bits (9.5e-7 seen), which the loss's importance weights
    # carry into the gradient; AdamW's first update is lr * g / (|g| + eps), which turns a tiny relative
    # difference in a gradient element of about eps (1e-8) into a visible one (after step 1, 14% of the
    # weights differed, by up to 3.1e-5 at lr 2e-3), so step 2 samples from two slightly different
    # policies (5.1e-5 seen). Every step of both runs is within the contract against its own trainer
    # (`assert_contract` above).
    # Bound: the contract's fp32 1e-5 at T = 1, scaled by 1 / T (float differences in the logits are
    # divided by the temperature).
    first = [(s, p) for s, p in zip(spec_samples, plain_samples) if s["step"] == 1]
    assert first
    for s, p in first:
        assert max(abs(x - y) for x, y in zip(s["behavior_logprobs"], p["behavior_logprobs"])) <= 1e-5 / TEMPERATURE


def test_batch_invariant_ngram_run_is_bitwise_on_policy(tmp_path):
    """With model.batch_invariant every op reduces in an order independent of the batch, so a verify
    chunk's logits are a one-token decode's bits: the speculative run's samples and behavior log-probs
    are the plain run's exactly, and importance ratios are exactly 1 (the strict form of the contract)."""
    invariant = ["model.batch_invariant=true", "train.steps=2"]
    plain, plain_samples = train(tmp_path / "plain", *NGRAM[:2], *invariant)
    spec, spec_samples = train(tmp_path / "spec", *NGRAM, *invariant)
    for a, b in zip(spec, plain):
        assert_spec_metrics(a, fixed=False)
        assert a["rollout/spec_accepted_tokens"] > 0
        assert a["train/is_ratio_max"] == 1.0 and a["train/mismatch_k3"] == 0.0, a
        assert a["train/loss"] == b["train/loss"]
    assert [(s["token_ids"], s["behavior_logprobs"]) for s in spec_samples] == \
        [(s["token_ids"], s["behavior_logprobs"]) for s in plain_samples]


def test_fixed_draft_model_is_reported_fixed_and_its_acceptance_falls(tmp_path):
    """The draft is the policy's initial weights in a directory of its own: identical to the target at
    step 1 (p = q up to float noise: every draft accepted but where a uniform lands within ~1e-6 of
    p/q), then fixed while a large lr moves the policy away from it."""
    from rl_engine.policy.presets import write_preset_checkpoint

    draft = write_preset_checkpoint("tiny", str(tmp_path / "draft"), seed=0)  # model.seed=0: the policy's init
    metrics, _ = train(tmp_path / "run", "rollout.max_new_tokens=12", "train.steps=4", "optim.lr=0.03",
                       f"rollout.speculative={{method: draft_model, num_speculative_tokens: 3, model: {draft}}}")
    for row in metrics:
        assert_spec_metrics(row, fixed=True)
        assert row["rollout/spec_draft_tokens"] > 0
    assert_contract(metrics[0])
    assert metrics[0]["rollout/spec_acceptance_rate"] >= 0.97, metrics[0]
    assert metrics[-1]["rollout/spec_acceptance_rate"] < metrics[0]["rollout/spec_acceptance_rate"] - 0.05, \
        [m["rollout/spec_acceptance_rate"] for m in metrics]


def test_mtp_self_draft_in_a_training_run(tmp_path):
    """A DeepSeek-V3 policy drafting with its own MTP layer (tensors shared with the trainer: every
    update reaches the draft, `spec_draft_fixed` 0) trains with behavior log-probs within the contract."""
    from hf_models import write_dsv3_with_mtp
    from rl_engine.policy.presets import char_vocab, write_char_tokenizer

    vocab = char_vocab()
    path = str(tmp_path / "dsv3_mtp")
    write_dsv3_with_mtp(path, seed=4, vocab_size=len(vocab), eos_token_id=vocab["<|eos|>"],
                        bos_token_id=vocab["<|bos|>"], pad_token_id=vocab["<|pad|>"], routed_scaling_factor=1.0)
    write_char_tokenizer(path)
    metrics, _ = train(tmp_path / "run", f"model.path={path}", "train.steps=2",
                       "rollout.speculative={method: mtp, num_speculative_tokens: 2}")
    for row in metrics:
        assert_spec_metrics(row, fixed=False)
        assert row["rollout/spec_draft_tokens"] > 0
        assert_contract(row)


# ---- actors --------------------------------------------------------------------------------------
def test_colocated_ngram_run_matches_the_single_process_one(tmp_path, monkeypatch):
    """Colocated engines read the trainer's tensors; their drafts, acceptance and samples are the
    single-process run's, step by step."""
    from rl_actor_helpers import actor_rows, assert_same_run

    reference, _ = train(tmp_path / "single", *NGRAM, "train.steps=2")
    for row in reference:
        assert_spec_metrics(row, fixed=False)
    got = actor_rows(tmp_path / "colocated", monkeypatch, *NGRAM, "train.steps=2", "placement.mode=colocated")
    assert_same_run(got, reference)
    for a, b in zip(got, reference):
        assert_contract(a)
        assert {k: a[k] for k in SPEC_KEYS} == {k: b[k] for k in SPEC_KEYS}


@pytest.mark.parametrize("placement, server", [("disaggregated", "rollout-0"), ("colocated", "trainer-0")])
def test_async_ngram_run_with_a_server(tmp_path, monkeypatch, placement, server):
    """Rollout workers and colocated trainer ranks build their engines from the run's config: async
    mode with partial rollouts (interrupted requests continue with their counts) and the OpenAI server
    on the same engine; every step reports acceptance over its own samples."""
    from rl_engine.actors.run import run_actors

    child_pythonpath(monkeypatch)
    out = tmp_path / "run"
    summary = run_actors(toy_config(out, *NGRAM, "train.steps=2", f"placement.mode={placement}",
                                    "rollout.mode=async", "placement.serve_port=0"), echo_stream=io.BytesIO())
    got = rows(out)
    assert len(got) == 2 and summary["steps"] == 2
    for row in got:
        assert_spec_metrics(row, fixed=False)
        assert row["rollout/spec_draft_tokens"] > 0
    assert (out / "serve" / f"{server}.json").exists()


# ---- the draft after a weight update -------------------------------------------------------------
GREEDY_PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [11, 12, 13, 14, 15, 16, 17], [20, 21]]


def perturb(model: torch.nn.Module) -> None:
    """An optimizer step's stand-in: every weight moves."""
    g = torch.Generator().manual_seed(3)
    for p in model.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=g))


def generate_across_update(llm) -> tuple[list, int, int]:
    """Greedy requests started with the old weights, updated in place mid-generation (their KV
    recomputed), run to the end: (outputs, drafts verified after the update, drafts accepted after it)."""
    from rl_engine.inference import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    for i, prompt in enumerate(GREEDY_PROMPTS):
        engine.add_request(str(i), prompt, params)
    for _ in range(6):
        engine.step()
    seqs = [s for r in engine.requests.values() for s in r.seqs]
    drafted, accepted = sum(s.spec_draft_tokens for s in seqs), sum(s.spec_accepted_tokens for s in seqs)
    assert drafted > 0
    engine.update_weights(perturb, recompute_kv=True)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    outs.sort(key=lambda o: o.request_id)
    return (outs, sum(c.spec_draft_tokens for o in outs for c in o.outputs) - drafted,
            sum(c.spec_accepted_tokens for o in outs for c in o.outputs) - accepted)


def test_self_draft_sharing_the_policys_tensors_follows_a_weight_update(tmp_path):
    """A draft model holding the target's own tensors (the policy drafting for itself) is a shared-
    weight draft: after an in-place update it drops the KV it computed with the old weights, so with
    greedy decoding it keeps proposing the target's own argmax. A draft that kept its stale KV (the
    control below) proposes other tokens."""
    from hf_models import write_hf_checkpoint
    from rl_engine.inference import LLM
    from rl_engine.policy import from_pretrained

    path = write_hf_checkpoint(str(tmp_path / "qwen2"), "qwen2", tie_word_embeddings=False)
    rates = {}
    for shared in (True, False):
        model = from_pretrained(path)
        llm = LLM(model, speculative_config={"method": "draft_model", "model": model, "num_speculative_tokens": 3})
        proposer = llm.engine.speculator.proposer
        assert proposer.shares_target_weights
        proposer.shares_target_weights = shared  # False: the control, a draft that misses the update
        _, drafted, accepted = generate_across_update(llm)
        assert drafted > 0
        rates[shared] = accepted / drafted
    # Draft and target compute the same argmax from the same weights; a flip needs two logits within
    # float rounding (~1e-6) of each other, which a few hundred draws of spread-out logits do not meet.
    assert rates[True] >= 0.98, rates
    assert rates[False] < rates[True] - 0.1, rates


def test_mtp_draft_after_a_weight_update_equals_a_fresh_engine_on_the_new_weights(tmp_path):
    """DeepSeek-V3's MTP layers draft from the target's hidden states and share its embedding and
    head: after an in-place update (what weight sync does to an engine's tensors) the MTP proposer
    recomputes what it kept, so the requests in flight draft and accept exactly what a fresh engine
    loaded with the new weights does when it continues them."""
    from hf_models import write_dsv3_with_mtp
    from rl_engine.inference import LLM, SamplingParams
    from rl_engine.policy import from_pretrained

    path = str(tmp_path / "dsv3")
    write_dsv3_with_mtp(path, seed=4)
    mtp = {"method": "mtp", "num_speculative_tokens": 2}
    in_place = generate_across_update(LLM(from_pretrained(path), speculative_config=mtp))

    # The reference: interrupt at the same point, continue the partial rollouts in a new engine.
    llm = LLM(from_pretrained(path), speculative_config=mtp)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    for i, prompt in enumerate(GREEDY_PROMPTS):
        llm.engine.add_request(str(i), prompt, params)
    for _ in range(6):
        llm.engine.step()
    partials = llm.engine.interrupt()
    drafted = sum(c.spec_draft_tokens for p in partials for c in p.outputs)
    accepted = sum(c.spec_accepted_tokens for p in partials for c in p.outputs)
    new_model = from_pretrained(path)
    with torch.no_grad():
        perturb(new_model)
    fresh = LLM(new_model, speculative_config=mtp).engine
    for p in partials:
        fresh.add_request(p.request_id, p)
    outs = []
    while fresh.has_unfinished_requests():
        outs += [o for o in fresh.step() if o.finished]
    outs.sort(key=lambda o: o.request_id)
    for a, b in zip(in_place[0], outs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        # the resumed outputs carry the counts of their first part and add to them
        assert (a.outputs[0].spec_draft_tokens, a.outputs[0].spec_accepted_tokens) == \
            (b.outputs[0].spec_draft_tokens, b.outputs[0].spec_accepted_tokens)
    assert in_place[1:] == (sum(c.spec_draft_tokens for o in outs for c in o.outputs) - drafted,
                            sum(c.spec_accepted_tokens for o in outs for c in o.outputs) - accepted)
    assert in_place[2] > 0

    # An update that keeps the requests' KV (a served request in flight): the proposer's kept states go too.
    llm = LLM(from_pretrained(path), speculative_config=mtp)
    llm.engine.add_request("s", GREEDY_PROMPTS[0], params)
    for _ in range(4):
        llm.engine.step()
    proposer = llm.engine.speculator.proposer
    assert proposer.states
    llm.engine.update_weights(perturb)
    assert not proposer.states


def test_partial_rollout_counts_travel_on_the_wire(tmp_path):
    """An interrupted request's counts go out in its GenerateResult, come back in the resume request
    and are continued by the engine that finishes it; a peer's impossible counts are refused."""
    from rl_engine import protocol as P
    from rl_engine.actors.wire import add_to_engine, generate_result, samples_of, wire_sampling
    from rl_engine.inference import LLM, SamplingParams
    from rl_engine.policy import from_pretrained
    from rl_engine.policy.presets import write_preset_checkpoint

    path = write_preset_checkpoint("tiny", str(tmp_path / "tiny"))
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    engine = LLM(from_pretrained(path), speculative_config=spec).engine
    request = P.GenerateRequest(request_id="r", sample_ids=["a", "b"], prompt_token_ids=[5, 6, 5, 6, 5, 6],
                                sampling=wire_sampling(SamplingParams(temperature=0.2, max_tokens=40, seed=1,
                                                                      ignore_eos=True)), policy_version=0)
    add_to_engine(engine, request)
    while sum(s.spec_verifies for r in engine.requests.values() for s in r.seqs) < 4:
        engine.step()
    sent = P.decode(P.encode(generate_result(request, engine.interrupt()[0], interrupted=True)))
    before = [(s.spec_draft_tokens, s.spec_accepted_tokens, s.spec_verifies) for s in sent.samples]
    assert sum(b[0] for b in before) > 0
    resume = P.GenerateRequest(request_id="r2", sample_ids=request.sample_ids, prompt_token_ids=request.prompt_token_ids,
                               sampling=request.sampling, policy_version=0, resume=sent.samples)
    add_to_engine(engine, P.decode(P.encode(resume)))
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    done = P.decode(P.encode(generate_result(resume, outs[0])))
    samples = samples_of(done, prompt_ids=request.prompt_token_ids, rewards=[0.0, 1.0], group=0, uid="u")
    for b, s, wire in zip(before, samples, done.samples):
        assert s.spec_counts == (wire.spec_draft_tokens, wire.spec_accepted_tokens, wire.spec_verifies)
        assert all(x >= y for x, y in zip(s.spec_counts, b)) and s.spec_counts[2] > b[2]
    with pytest.raises(ValueError, match=r"accepted \(3\) <= drafts \(2\)"):
        P.SampleResult(sample_id="x", token_ids=torch.zeros(1, dtype=torch.int64), behavior_logprobs=torch.zeros(1),
                       policy_versions=torch.zeros(1, dtype=torch.int64), kv_versions=torch.zeros(1, dtype=torch.int64),
                       finish_reason="stop", spec_draft_tokens=2, spec_accepted_tokens=3)
