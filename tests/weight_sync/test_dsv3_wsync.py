"""Weight sync carries DeepSeek-V3's MLA, MoE (with e_score_correction_bias) and MTP weights: a
copied engine is byte-equal to the trainer after an update and drafts with the updated MTP layer;
plans from tp2 / pp2 / tp2 x ep2 training layouts cover every engine tensor, MTP included."""

from __future__ import annotations

import math

import pytest
import torch

from hf_models import write_dsv3_with_mtp
from rl_engine.inference import LLM, SamplingParams
from rl_engine.policy import from_pretrained
from rl_engine.weight_sync import EngineLayout, InProcessTransport, TrainLayout, WeightPublisher, WeightReceiver, \
    plan_sync
from wsync_helpers import assert_same_bytes

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [11, 12, 13, 14, 15, 16, 17]]
MTP = {"method": "mtp", "num_speculative_tokens": 2}


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dsv3_wsync"))
    write_dsv3_with_mtp(path, seed=4)
    return path


def test_copy_mode_update_moves_mtp_and_bias(path):
    trainer_model = from_pretrained(path)
    llm = LLM(from_pretrained(path), speculative_config=MTP)
    plan = plan_sync(trainer_model.config, src=TrainLayout(), dst=EngineLayout(), bucket_bytes=8192)
    keys = {p.key for layout in plan.dst_layouts.values() for t in layout.tensors.values() for p in t.pieces}
    assert {"model.layers.3.eh_proj.weight", "model.layers.3.self_attn.kv_b_proj.weight",
            "model.layers.3.mlp.gate.e_score_correction_bias", "model.layers.1.self_attn.q_a_proj.weight"} <= keys
    transport = InProcessTransport()
    receiver = WeightReceiver(llm, plan, transport=transport)
    publisher = WeightPublisher(trainer_model, plan, src_rank=0, transport=transport)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # an optimizer step and a bias update stand-in: everything moves
        for p in trainer_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for layer in [*trainer_model.layers[1:], *(m.block for m in trainer_model.mtp_layers)]:
            layer.mlp.expert_bias.add_(0.05 * torch.randn(layer.mlp.expert_bias.shape, generator=g))
    publisher.publish(1)
    receiver.apply(receiver.receive())
    assert_same_bytes(llm.model, trainer_model)
    for a, b in zip(llm.model.buffers(), trainer_model.buffers()):
        assert torch.equal(a, b)
    outs = llm.generate(PROMPTS, GREEDY)
    reference = LLM(trainer_model).generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in reference]
    assert llm.engine.stats()["speculative"]["draft_tokens"] > 0


@pytest.mark.parametrize("src", [TrainLayout(tp=2), TrainLayout(pp=2), TrainLayout(tp=2, dp=2, ep=2)],
                         ids=["tp2", "pp2", "tp2_ep2"])
def test_plans_from_parallel_layouts_cover_the_engine(path, src):
    config = from_pretrained(path).config
    plan = plan_sync(config, src=src, dst=EngineLayout())
    moved: dict[str, int] = {}
    for bucket in plan.buckets:
        for t in bucket.transfers:
            moved[t.key] = moved.get(t.key, 0) + math.prod(t.shape)
    needed = {p.key: math.prod(p.global_shape) for layout in plan.dst_layouts.values()
              for t in layout.tensors.values() for p in t.pieces}
    assert moved == needed  # every element of every engine tensor, once
    assert any(k.startswith("model.layers.3.") for k in moved)  # the MTP layer's
