"""Multi-token prediction layers (DeepSeek-V3's `num_nextn_predict_layers`), as transformers'
`MtpLayer` computes them.

MTP row i combines the embedding of token i+1 with the target's final (normed) hidden state at
position i: h = block(eh_proj([enorm(embed(t[i+1])) | hnorm(h_target[i])])) at rotary position i+1,
then post_norm (DeepSeek's `shared_head.norm`); the shared LM head turns it into logits for token
i+2. The block is a full decoder layer (MoE, as every MTP layer of DeepSeek-V3 is). DeepSeek ships
the weights under the layer index after the last decoder layer, `model.layers.{num_hidden_layers + k}`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from rl_engine.policy.config import ModelConfig
from rl_engine.policy.layers import ReplicatedLinear, RMSNorm
from rl_engine.policy.parallel import ParallelGroups


class MTPLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, depth: int, *, groups: ParallelGroups, dtype, device=None) -> None:
        super().__init__()
        from rl_engine.policy.model import DecoderLayer  # model.py builds these layers

        self.layer_idx = cfg.num_layers + depth  # its checkpoint index
        kw = dict(dtype=dtype, device=device)
        self.enorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.hnorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.eh_proj = ReplicatedLinear(2 * cfg.hidden_size, cfg.hidden_size, **kw)
        block_cfg = cfg.replace(moe_layers=[*cfg.moe_layers, self.layer_idx]) if cfg.is_moe else cfg
        self.block = DecoderLayer(block_cfg, self.layer_idx, groups=groups, **kw)
        self.post_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)

    def forward(self, embeds: torch.Tensor, prev_hidden: torch.Tensor, rotary, rope, cu_seqlens, attn_context,
                routing=None) -> torch.Tensor:
        """embeds [T, H] of tokens i+1, prev_hidden [T, H] of positions i, rope of positions i+1 -> [T, H]."""
        x = self.eh_proj(torch.cat((self.enorm(embeds), self.hnorm(prev_hidden)), dim=-1))
        return self.post_norm(self.block(x, rotary, rope, cu_seqlens, attn_context, routing))


def mtp_loss(model, hidden: torch.Tensor, input_ids: torch.Tensor, *, positions: torch.Tensor,
             cu_seqlens: torch.Tensor, depth: int = 0) -> torch.Tensor:
    """DeepSeek-V3 / Megatron's MTP loss (depth 1) over a packed batch: the mean cross-entropy of
    token i+2 from MTP row i = (token i+1, the model's final hidden state at i), for every i with a
    token i+2 in its sequence. `hidden` [T, H] is `model.hidden_states(...)` of the same batch (detach
    it to train the MTP layer alone). Vocab-parallel, like the policy's own log-probs."""
    bounds = cu_seqlens.tolist()
    rows = [torch.arange(s, e - 2, device=hidden.device) for s, e in zip(bounds[:-1], bounds[1:]) if e - s >= 3]
    if not rows:
        return hidden.new_zeros(())
    lengths = torch.tensor([0] + [len(r) for r in rows])
    idx = torch.cat(rows)
    y = model.mtp_hidden_states(input_ids[idx + 1], hidden[idx], positions=positions[idx] + 1, depth=depth,
                                cu_seqlens=torch.cumsum(lengths, 0).to(torch.int32))
    logprobs, _ = model.token_logprobs(y, input_ids[idx + 2])
    return -logprobs.mean()
