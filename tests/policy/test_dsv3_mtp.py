"""DeepSeek-V3 multi-token prediction: the MTP layer DeepSeek ships under the layer index after the
last decoder layer loads, and computes what transformers' MtpModel computes; export keeps it."""

import torch

from hf_models import make_hf_model, write_dsv3_with_mtp
from rl_engine.policy import ModelConfig, from_pretrained
from rl_engine.policy.checkpoint import checkpoint_tensor_names


def _mtp_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Our MTP logits of one sequence: rows i = (token i+1, hidden i) at positions i+1."""
    T = ids.shape[0]
    with torch.no_grad():
        h = model.hidden_states(ids, positions=torch.arange(T))
        y = model.mtp_hidden_states(ids[1:], h[:-1], positions=torch.arange(1, T))
        return model.compute_logits(y)


def test_mtp_layer_matches_transformers_mtp_model(tmp_path):
    hf, mtp = write_dsv3_with_mtp(str(tmp_path / "ckpt"), seed=2, n_group=2, topk_group=1)
    model = from_pretrained(str(tmp_path / "ckpt"))
    assert model.config.num_mtp_layers == 1 and len(model.mtp_layers) == 1
    ids = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h = hf(ids[None], output_hidden_states=True).hidden_states[-1]
        y = mtp.forward_layer(0, h[:, :-1], torch.arange(1, 40)[None], None, input_ids=ids[None, 1:])
        ref = mtp._project_to_logits(y)[0]
    ours = _mtp_logits(model, ids)
    assert (ours - ref).abs().max().item() <= 1e-4

    # Export writes DeepSeek's layout (with the embedding/head copies); it reloads to the same MTP.
    model.save_pretrained(str(tmp_path / "ours"))
    names = set(checkpoint_tensor_names(str(tmp_path / "ours")))
    assert {"model.layers.3.eh_proj.weight", "model.layers.3.shared_head.norm.weight",
            "model.layers.3.embed_tokens.weight", "model.layers.3.shared_head.head.weight",
            "model.layers.3.mlp.gate.e_score_correction_bias"} <= names
    again = from_pretrained(str(tmp_path / "ours"))
    assert torch.equal(_mtp_logits(again, ids), ours)


def test_mtp_count_follows_the_weights(tmp_path):
    """transformers writes num_nextn_predict_layers=1 for every deepseek_v3 it saves: without MTP
    tensors in the checkpoint the model has no MTP layer."""
    hf = make_hf_model("deepseek_v3", num_nextn_predict_layers=1)
    hf.save_pretrained(tmp_path)
    assert ModelConfig.from_pretrained(str(tmp_path)).num_mtp_layers == 0
    assert len(from_pretrained(str(tmp_path)).mtp_layers) == 0
