"""The MTP proposer: DeepSeek-V3's multi-token-prediction layer drafts with the target's own hidden
states and embedding (`speculative_config={"method": "mtp", "num_speculative_tokens": k}`).

MTP row i takes token i+1 and the target's final hidden state at position i and predicts token i+2
(`policy/mtp.py`). The target's runner hands every step's hidden states to `observe` (its
`hidden_sink`), which keeps them per sequence until the MTP consumed them. At a proposal, a sequence
of N tokens (N-1 computed by the target) first catches its MTP rows up to row N-2, all from real
target states; the last row's logits give draft 1. Drafts 2..k chain: the row of draft j-1 takes the
MTP's own output of the row before in place of the target's hidden state (the target has not seen
those tokens yet), with the same first MTP layer (as vLLM reuses DeepSeek-V3's single layer). Only
rows built from real target states are kept; chained rows are overwritten at the next proposal.

Each sequence's MTP rows live in a dense latent cache of its own ([rows, kv_lora_rank +
qk_rope_head_dim], one MTP layer; grown by doubling), attended in the absorbed form. A sequence whose
needed target states are missing (its prefix came from the prefix cache, or it was preempted and its
states dropped) recomputes them once with a full forward of the target.

Drafts of sampled requests are drawn from the MTP's own sampling distribution q (kept for the exact
rejection test of `rejection.py`); greedy requests draft the argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rl_engine.inference.latent_attention import absorbed_attention
from rl_engine.inference.sampler import Sampler, inverse_cdf, sampling_probs
from rl_engine.inference.sequence import Sequence, SeqStatus
from rl_engine.inference.speculative.rejection import DRAFT, purpose_seed


@dataclass
class _State:
    target: Sequence
    cache: torch.Tensor  # [capacity, kv_lora_rank + qk_rope_head_dim] MTP latent rows
    rows: int = 0  # rows [0, rows) hold entries built from real target states
    pending_start: int = 0  # target hidden states kept for positions [pending_start, ...)
    pending: torch.Tensor | None = None

    @property
    def pending_end(self) -> int:
        return self.pending_start + (0 if self.pending is None else self.pending.shape[0])

    def ensure(self, rows: int) -> None:
        if rows > self.cache.shape[0]:
            grown = self.cache.new_zeros(max(rows, 2 * self.cache.shape[0]), self.cache.shape[1])
            grown[:self.cache.shape[0]] = self.cache
            self.cache = grown


class _DenseLatentContext:
    """The MTP block's attention context: segments (rows start, end, state, first cache row)."""

    def __init__(self) -> None:
        self.segments: list[tuple[int, int, _State, int]] = []

    def attend_latent(self, layer_idx: int, attn, q_nope, q_pe, latent, k_pe) -> torch.Tensor:
        out = q_nope.new_empty(q_nope.shape[0], attn.num_heads, attn.v_dim)
        for start, end, state, offset in self.segments:
            ctx = offset + end - start
            state.ensure(ctx)
            state.cache[offset:ctx] = torch.cat((latent[start:end], k_pe[start:end]), dim=-1)
            out[start:end] = absorbed_attention(attn, q_nope[start:end], q_pe[start:end], state.cache[:ctx])
        return out


class MTPProposer:
    def __init__(self, model, *, runner, sampler: Sampler, max_model_len: int) -> None:
        if not len(getattr(model, "mtp_layers", ())):
            raise ValueError("speculative_config method 'mtp' needs a model with multi-token-prediction layers "
                             "(a deepseek_v3 checkpoint with num_nextn_predict_layers > 0 and its MTP weights)")
        if not model.config.is_mla:
            raise ValueError(f"speculative method 'mtp' supports deepseek_v3 (MLA) models, not {model.config.model_type!r}")
        self.model = model
        self.sampler = sampler
        self.max_len = max_model_len
        self.width = model.config.kv_lora_rank + model.config.head_dim
        self.device = next(model.parameters()).device
        self.states: dict[int, _State] = {}
        runner.hidden_sink = self.observe

    # ---- the target's hidden states -------------------------------------------------------------
    def observe(self, layout: list[tuple[Sequence, int, int]], hidden: torch.Tensor) -> None:
        row = 0
        for seq, start, n in layout:
            state = self._state(seq)
            rows = hidden[row:row + n].detach().clone()
            row += n
            if state.pending is not None and state.pending_start <= start <= state.pending_end:
                rows = torch.cat((state.pending[:start - state.pending_start], rows))
            else:
                state.pending_start = start
            state.pending = rows

    def _state(self, seq: Sequence) -> _State:
        state = self.states.get(seq.seq_id)
        if state is None:
            state = self.states[seq.seq_id] = _State(seq, torch.zeros(64, self.width, dtype=self.model.dtype,
                                                                         device=self.device))
        return state

    def _target_hidden(self, state: _State, first: int, end: int) -> torch.Tensor:
        """The target's hidden states at positions [first, end): kept ones, or a recomputation."""
        if state.pending is None or state.pending_start > first or state.pending_end < end:
            ids = torch.tensor(state.target.token_ids[:end], device=self.device)
            state.pending = self.model.hidden_states(ids, positions=torch.arange(end, device=self.device))
            state.pending_start = 0
        return state.pending[first - state.pending_start:end - state.pending_start]

    # ---- drafting --------------------------------------------------------------------------------
    def propose(self, seqs: list[Sequence], max_drafts: list[int]) -> None:
        self.release_stale()
        with torch.inference_mode():
            self._propose(seqs, max_drafts)

    def _propose(self, seqs: list[Sequence], max_drafts: list[int]) -> None:
        ctx = _DenseLatentContext()
        ids, prev, positions, wanted, states = [], [], [], [], []
        row = 0
        for seq, k in zip(seqs, max_drafts):
            N = seq.num_tokens
            if N < 2 or k < 1:
                continue  # an MTP row needs a token after a computed position
            state = self._state(seq)
            first = min(state.rows, N - 2)  # recompute the last row when the sequence did not advance
            ids.append(torch.tensor(seq.token_ids[first + 1:N], device=self.device))
            prev.append(self._target_hidden(state, first, N - 1))
            positions.append(torch.arange(first + 1, N, device=self.device))
            ctx.segments.append((row, row + N - 1 - first, state, first))
            row += N - 1 - first
            wanted.append(k)
            states.append(state)
            state.rows = N - 1
            # keep h_{N-2} too: a sequence that does not advance redoes its last row
            keep = max(N - 2 - state.pending_start, 0)
            state.pending, state.pending_start = state.pending[keep:], state.pending_start + keep
        if not states:
            return
        hidden = self.model.mtp_hidden_states(torch.cat(ids), torch.cat(prev), positions=torch.cat(positions),
                                              attn_context=ctx)
        last = hidden[torch.tensor([end - 1 for _, end, _, _ in ctx.segments], device=self.device)]
        self._draft(states, last)
        for j in range(1, max(wanted)):  # chained drafts: one row per sequence that wants more
            active = [i for i, k in enumerate(wanted) if k > j]
            ctx = _DenseLatentContext()
            for r, i in enumerate(active):
                seq = states[i].target
                ctx.segments.append((r, r + 1, states[i], seq.num_tokens - 2))
            toks = torch.tensor([states[i].target.token_ids[-1] for i in active], device=self.device)
            pos = torch.tensor([states[i].target.num_tokens - 1 for i in active], device=self.device)
            prev_hidden = last[torch.tensor(active, device=self.device)]
            last_active = self.model.mtp_hidden_states(toks, prev_hidden, positions=pos, attn_context=ctx)
            self._draft([states[i] for i in active], last_active)
            last = last.clone()
            last[torch.tensor(active, device=self.device)] = last_active
        for state in states:
            target = state.target
            if target.draft_probs is not None:
                target.draft_probs = torch.stack(target.draft_probs)  # [d, vocab]

    def _draft(self, states: list[_State], hidden: torch.Tensor) -> None:
        """One draft per state's sequence from the MTP hidden states [n, H], appended to its tokens."""
        logits = self.model.compute_logits(hidden)
        targets = [s.target for s in states]
        tokens = logits.argmax(dim=-1).tolist()
        sampled = [i for i, t in enumerate(targets) if not t.request.params.greedy]
        probs = None
        if sampled:
            rows = torch.tensor(sampled, device=logits.device)
            probs = sampling_probs(logits[rows], [targets[i].request.params for i in sampled])
            seeds = [purpose_seed(targets[i].rng_seed, targets[i].index, targets[i].num_tokens, DRAFT)
                     for i in sampled]
            for i, token in zip(sampled, inverse_cdf(probs, self.sampler.uniforms(seeds)).tolist()):
                tokens[i] = token
        row_of = {i: r for r, i in enumerate(sampled)}
        for i, (target, token) in enumerate(zip(targets, tokens)):
            target.token_ids.append(token)
            target.num_draft_tokens += 1
            if i in row_of:
                if target.draft_probs is None:
                    target.draft_probs = []
                target.draft_probs.append(probs[row_of[i]])

    def weights_updated(self) -> None:
        """The MTP layers, embedding and head are the target's own tensors, updated in place; the kept
        target hidden states and MTP latent rows were computed with the old weights: drop them (each
        sequence recomputes them once, as after a prefix-cache hit)."""
        self.states.clear()

    def release_stale(self) -> None:
        """Drop the state of sequences that are no longer running (finished, aborted, preempted)."""
        for seq_id in [i for i, s in self.states.items() if s.target.status is not SeqStatus.RUNNING]:
            del self.states[seq_id]
