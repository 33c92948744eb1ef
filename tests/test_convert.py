"""`rl-engine convert`: a tp2 x pp2 checkpoint written by four training ranks -> Hugging Face ->
transformers gives the ranks' logits; HF -> sharded (any layout) -> HF is bit-exact and the offline
writer's files load into the real ranks; layouts reshard with the optimizer moments; MoE extras
survive; training checkpoints of single-process and actors runs export with their tokenizer; errors
name the tensor and the shapes."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from hf_models import hf_logits_per_sequence, packed, write_hf_checkpoint
from rl_engine import cli, run_checkpoint
from rl_engine.launch.gloo import spawn
from rl_engine.policy import CausalLM, ModelConfig, from_pretrained
from rl_engine.policy.dist_checkpoint import read_full_tensors
from rl_engine.policy.optimizer import STATE_KINDS, OptimizerConfig
from rl_engine.policy.parallel import ParallelGroups
from rl_engine.policy.parallel_trainer import ParallelTrainer
from rl_engine.policy.pipeline import MicroBatch

EPS32_UNIT = 2.0**-24  # fp32 unit roundoff
SEQUENCES = [[5, 17, 3, 88, 41, 9, 60], [12, 2], [33, 71, 4, 4, 19, 50, 7, 28, 90, 1, 64]]


def convert(*args: str) -> None:
    assert cli.main(["convert", *map(str, args)]) == 0


def _micro_batch(sequences) -> MicroBatch:
    ids, positions, cu = packed(sequences)
    return MicroBatch(input_ids=ids, positions=positions, cu_seqlens=cu, targets=torch.roll(ids, -1),
                      loss_inputs={"advantages": torch.linspace(-1, 1, len(ids))})


def _loss(logprobs, entropy, mb):
    return -(logprobs * mb.loss_inputs["advantages"]).sum() / len(logprobs)


def _ranks(rank, world, hf, offline, trained, out):
    """tp2 x pp2: (1) the offline-converted checkpoint loads (with its zero moments) into the ranks and
    gives the logits and first step of a trainer built from the HF directory; (2) one step, a saved
    checkpoint and the logits after it."""
    groups = ParallelGroups.build(tp=2, pp=2)
    optim = OptimizerConfig(lr=1e-2, weight_decay=0.0)
    direct = ParallelTrainer.from_pretrained(hf, groups=groups, optim=optim)
    loaded = ParallelTrainer(direct.config, groups=groups, optim=optim)
    meta = loaded.load_checkpoint(offline)
    mb = _micro_batch(SEQUENCES)
    before = [direct.forward_logits([mb]), loaded.forward_logits([mb])]
    steps = [t.train_step([mb], _loss) for t in (direct, loaded)]
    after = direct.forward_logits([mb])
    direct.save_checkpoint(trained, extra={"policy_version": 1})
    if groups.is_last_stage and groups.tp_rank == 0:
        torch.save({"before": [torch.cat(x) for x in before], "after": torch.cat(after), "meta_step": meta["step"],
                    "losses": [s["loss"] for s in steps], "grad_norms": [s["grad_norm"] for s in steps]},
                   os.path.join(out, "ranks.pt"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An HF qwen2 (tied embeddings) directory, its offline tp2 x pp2 conversion, and the checkpoint
    that four gloo ranks wrote after one step from it."""
    root = tmp_path_factory.mktemp("convert")
    hf = write_hf_checkpoint(str(root / "hf"), "qwen2", seed=3)
    convert(hf, root / "offline", "--tp", 2, "--pp", 2)
    spawn(_ranks, 4, hf, str(root / "offline"), str(root / "trained"), str(root))
    return root


def test_tp2_pp2_checkpoint_to_hf_gives_the_ranks_logits_in_transformers(trained):
    from transformers import AutoModelForCausalLM

    ranks = torch.load(trained / "ranks.pt")
    convert(trained / "trained", trained / "exported")
    # The exported tensors are the checkpoint's fp32 masters, bit for bit.
    exported = load_file(trained / "exported" / "model.safetensors")
    masters = read_full_tensors(str(trained / "trained"), "param")
    model = from_pretrained(str(trained / "exported"))
    for key, master in masters.items():
        if key in exported:
            assert torch.equal(exported[key], master), key
    assert "lm_head.weight" not in exported and model.config.tie_word_embeddings  # tied: written once
    hf = AutoModelForCausalLM.from_pretrained(trained / "exported", dtype=torch.float32).eval()
    reference = hf_logits_per_sequence(hf, SEQUENCES)
    ours = ranks["after"]
    assert ours.shape == reference.shape
    # Each logit ends a chain of D = 6 * layers + 1 fp32 reductions (qkv, scores, values, o_proj, gate/up,
    # down; lm_head) of length <= K; recursive summation errs by <= K u relatively per reduction (Higham's
    # gamma_K), in either implementation: |diff| <= 2 D K u max|logit|.
    cfg = model.config
    depth = 6 * cfg.num_layers + 1
    length = max(cfg.hidden_size, cfg.intermediate_size, max(map(len, SEQUENCES)))
    bound = 2 * depth * length * EPS32_UNIT * reference.abs().max().item()
    diff = (ours - reference).abs().max().item()
    print(f"tp2 x pp2 ranks vs transformers on the export: max |logit diff| {diff:.3g}, bound {bound:.3g}")
    assert diff <= bound, (diff, bound)
    assert not torch.equal(ranks["before"][0], ours)  # the step moved the weights the export carries


def test_offline_sharded_checkpoint_loads_into_the_ranks(trained, capsys):
    ranks = torch.load(trained / "ranks.pt")
    direct, loaded = ranks["before"]
    assert torch.equal(direct, loaded)  # same layout, same weights: same bits
    assert ranks["meta_step"] == 0 and ranks["losses"][0] == ranks["losses"][1]
    assert ranks["grad_norms"][0] == ranks["grad_norms"][1]
    # HF -> tp2 x pp2 -> HF is bit-exact, tokenizer-free as the source (no tokenizer in this directory).
    convert(trained / "offline", trained / "roundtrip", "--dtype", "float32")
    assert not (trained / "roundtrip" / "tokenizer_config.json").exists()  # none known: a note says so
    assert "has no tokenizer" in capsys.readouterr().err
    a, b = load_file(trained / "hf" / "model.safetensors"), load_file(trained / "roundtrip" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reshard_keeps_params_moments_step_and_rng(trained):
    convert(trained / "trained", trained / "tp1_pp2_dp2", "--to", "sharded", "--pp", 2, "--dp", 2)
    convert(trained / "tp1_pp2_dp2", trained / "tp2_dp2", "--to", "sharded", "--tp", 2, "--dp", 2)
    for kind in STATE_KINDS:
        source = read_full_tensors(str(trained / "trained"), kind)
        for target in ("tp1_pp2_dp2", "tp2_dp2"):
            got = read_full_tensors(str(trained / target), kind)
            assert got.keys() == source.keys()
            assert all(torch.equal(got[k], source[k]) for k in source), (target, kind)
    assert read_full_tensors(str(trained / "trained"), "exp_avg")["model.norm.weight"].abs().sum() > 0
    meta = json.loads((trained / "tp1_pp2_dp2" / "metadata.json").read_text())
    assert meta["step"] == 1 and meta["extra"] == {"policy_version": 1} and meta["world_size"] == 4
    assert meta["layout"] == {"tp": 1, "cp": 1, "pp": 2, "dp": 2, "ep": 1, "virtual_stages": 1,
                              "sequence_parallel": False}
    for rank in range(4):  # the same world size: each rank's RNG stream is carried over
        a = load_file(trained / "trained" / f"rank{rank:05d}.safetensors")["rng/torch_cpu"]
        b = load_file(trained / "tp1_pp2_dp2" / f"rank{rank:05d}.safetensors")["rng/torch_cpu"]
        assert torch.equal(a, b)


MOE = ModelConfig(model_type="qwen2_moe", vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True, max_position_embeddings=256,
                  max_context_len=256, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                  shared_expert_intermediate_size=32, moe_layers=[0, 1], norm_topk_prob=False,
                  router_aux_loss_coef=0.01, router_z_loss_coef=0.001, router_bias_update_rate=0.01)


def test_moe_extras_survive_hf_to_tp2_ep2_to_hf(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = CausalLM(MOE)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
        for layer in model.layers:
            layer.mlp.expert_bias.normal_(0, 0.1)
    model.save_pretrained(str(tmp_path / "hf"))
    convert(tmp_path / "hf", tmp_path / "sharded", "--tp", 2, "--dp", 2, "--ep", 2)
    meta = json.loads((tmp_path / "sharded" / "metadata.json").read_text())
    assert meta["rl_engine_config"] == {"router_bias_update_rate": 0.01, "router_z_loss_coef": 0.001}
    convert(tmp_path / "sharded", tmp_path / "back")
    for name in ("model.safetensors", "rl_engine_extras.safetensors"):
        a, b = load_file(tmp_path / "hf" / name), load_file(tmp_path / "back" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    reloaded = from_pretrained(str(tmp_path / "back"))
    assert reloaded.config.router_bias_update_rate == 0.01
    assert torch.equal(reloaded.layers[1].mlp.expert_bias, model.layers[1].mlp.expert_bias)
    AutoModelForCausalLM.from_pretrained(tmp_path / "back")  # transformers loads it (the side file ignored)


def test_single_process_run_exports_its_checkpoint_with_the_tokenizer(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", "train.steps=2", "warmup.steps=3", "data.num_eval=2", "rollout.prompts_per_step=2",
                     "rollout.n=2", "metrics.tensorboard=false", "metrics.plot=false", f"train.output_dir={out}"]) == 0
    convert(out, tmp_path / "hf")  # the run directory: its newest checkpoint (step 2, the end)
    a, b = load_file(out / "final_model" / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "hf"))
    # To a sharded layout: the AdamW moments come along (torch.optim.AdamW's, by parameter).
    step_dir = run_checkpoint.latest(str(out))
    convert(step_dir, tmp_path / "tp2", "--to", "sharded", "--tp", 2)
    meta = json.loads((tmp_path / "tp2" / "metadata.json").read_text())
    assert meta["step"] >= 1  # AdamW's step count
    moments = read_full_tensors(str(tmp_path / "tp2"), "exp_avg")
    state = torch.load(os.path.join(step_dir, "optimizer.pt"))["state"]
    norm_index = [n for n, _ in CausalLM(ModelConfig.from_pretrained(str(out / "init_model"))).named_parameters()
                  ].index("norm.weight")
    assert torch.equal(moments["model.norm.weight"], state[norm_index]["exp_avg"])


def test_bf16_single_process_checkpoint_converts_with_its_fp32_masters(tmp_path):
    """A bf16 run keeps fp32 master weights in optimizer.pt (`MasterWeightsAdamW`): a sharded layout
    takes them as its parameters, not the bf16 weights of model.pt."""
    out = tmp_path / "run"
    assert cli.main(["train", "train.steps=1", "warmup.steps=0", "data.num_eval=2", "rollout.prompts_per_step=2",
                     "rollout.n=2", "model.dtype=bfloat16", "optim.weight_decay=0.1",  # moves every master
                     "metrics.tensorboard=false", "metrics.plot=false", f"train.output_dir={out}"]) == 0
    step_dir = run_checkpoint.latest(str(out))
    convert(step_dir, tmp_path / "tp1", "--to", "sharded")
    names = [n for n, _ in CausalLM(ModelConfig.from_pretrained(str(out / "init_model"))).named_parameters()]
    masters = torch.load(os.path.join(step_dir, "optimizer.pt"))["master_weights"]
    weights = torch.load(os.path.join(step_dir, "model.pt"))
    params = read_full_tensors(str(tmp_path / "tp1"), "param")
    name = "layers.0.input_layernorm.weight"  # the same name in our model and the HF layout
    master = masters[names.index(name)]
    assert master.dtype == torch.float32 and torch.equal(weights[name], master.to(torch.bfloat16))
    assert not torch.equal(master, weights[name].float())  # the masters hold more than bf16 does
    assert torch.equal(params["model." + name], master)


def test_actors_run_checkpoint_exports_with_the_run_models_tokenizer(trained, tmp_path, capsys):
    """An actors run's step_<k> holds the trainer's sharded checkpoint in trainer/; the run's
    actors/config.yaml names the model directory whose tokenizer goes along."""
    out = tmp_path / "run"
    shutil.copytree(trained / "trained", run_checkpoint.step_dir(str(out), 1) + "/trainer")
    model_dir = tmp_path / "model"
    shutil.copytree(trained / "hf", model_dir)
    (model_dir / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    (out / "actors").mkdir()
    (out / "actors" / "config.yaml").write_text(f"model:\n  path: {model_dir}\n")
    run_checkpoint.commit(str(out), 1, keep=2)
    convert(out / "checkpoints", tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer_config.json").read_text() == (model_dir / "tokenizer_config.json").read_text()
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    masters = read_full_tensors(str(trained / "trained"), "param")
    assert exported and all(torch.equal(exported[k], masters[k]) for k in exported)
    # A damaged training checkpoint is refused by its manifest before anything reads it.
    victim = out / "checkpoints" / "step_000001" / "trainer" / "rank00000.safetensors"
    data = victim.read_bytes()
    victim.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    assert cli.main(["convert", str(out), str(tmp_path / "hf_damaged")]) == 2
    assert "rank00000.safetensors does not match its sha256" in capsys.readouterr().err


def test_errors_name_the_tensor_and_the_shapes(trained, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(trained / "trained", bad)
    meta = json.loads((bad / "metadata.json").read_text())
    meta["model_config"]["intermediate_size"] = 128
    (bad / "metadata.json").write_text(json.dumps(meta))
    assert cli.main(["convert", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "'model.layers.0.mlp.gate_proj.weight/param'" in err and "(96, 64)" in err and "(128, 64)" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    assert cli.main(["convert", str(trained / "hf"), str(tmp_path / "tp3"), "--tp", "3"]) == 2
    assert "num_attention_heads (4) must be divisible by tp (3)" in capsys.readouterr().err
    assert cli.main(["convert", str(trained / "hf"), str(trained / "hf")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["convert", str(tmp_path), str(tmp_path / "x")]) == 2
    assert "is none of: a Hugging Face directory" in capsys.readouterr().err
    assert cli.main(["convert", str(trained / "trained"), str(tmp_path / "y"), "--tp", "2"]) == 2
    assert "describe a sharded destination" in capsys.readouterr().err


def test_interleaved_layout_and_tokenizer_flag(tmp_path):
    """--virtual-stages (interleaved pipeline chunks) and --tokenizer (the files an export copies)."""
    hf = write_hf_checkpoint(str(tmp_path / "hf"), "qwen3", seed=1, num_hidden_layers=4)
    convert(hf, tmp_path / "pp2_v2", "--pp", 2, "--virtual-stages", 2)
    meta = json.loads((tmp_path / "pp2_v2" / "metadata.json").read_text())
    assert meta["layout"]["pp"] == 2 and meta["layout"]["virtual_stages"] == 2
    rank0 = json.loads((tmp_path / "pp2_v2" / "rank00000.json").read_text())
    # Rank 0 (stage 0) holds chunks 0 and 2 of the four: layers 0 and 2, not 1 and 3.
    held = {int(k.split(".")[2]) for k in rank0 if k.startswith("model.layers.")}
    assert held == {0, 2}
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text("{}")
    (tok / "model.safetensors").write_bytes(b"not copied")  # weights are never copied from it
    convert(tmp_path / "pp2_v2", tmp_path / "back", "--tokenizer", tok)
    assert (tmp_path / "back" / "tokenizer_config.json").read_text() == "{}"
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
