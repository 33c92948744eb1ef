"""The engine's speculative-decoding step: propose drafts before scheduling, verify them after the
target's forward, roll back the KV of rejected positions, count what happened.

Drafts ride in the sequences' own token lists (see `Sequence`), so a sequence verifying d drafts is a
(d + 1)-token chunk in the same flat batch as prefills and plain decodes, and the model runner returns
d + 1 logits rows for it. `verify` turns those rows into the tokens to emit: every row is first
sampled exactly as plain decoding would (same per-position uniforms), which decides point-mass drafts
(n-gram, greedy) and gives the bonus token; draft-model drafts of sampled requests take the rejection
test of `rejection.py`. Log-probs of emitted tokens are the target's `log_softmax(logits / T)[token]`
(T = 1 when greedy), the same quantity plain decoding returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rl_engine.inference.block_manager import BlockManager
from rl_engine.inference.sampler import Sampler, SampleRow, sampling_probs, token_seed
from rl_engine.inference.sequence import Sequence
from rl_engine.inference.speculative.config import SpeculativeConfig
from rl_engine.inference.speculative.rejection import (ACCEPT, RESIDUAL, accept_mask, accept_point_mass,
                                                       purpose_seed, residual_sample)

# What one sequence emits in a step: tokens, their log-probs, and how many of the tokens (its accepted
# drafts) are still at the end of its token list, for the engine to re-append one by one with stop checks.
Emission = tuple[list[int], list[float], int]


@dataclass
class SpecStats:
    num_speculative_tokens: int
    num_steps: int = 0  # engine steps that verified at least one draft
    num_verifies: int = 0  # (sequence, step) pairs that verified at least one draft
    num_proposed_tokens: int = 0  # drafts proposed (some are dropped unverified: budget, pool, preemption)
    num_draft_tokens: int = 0  # drafts verified by the target
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [k]: verifies accepting draft j

    def __post_init__(self) -> None:
        self.accepted_per_position = [0] * self.num_speculative_tokens

    def as_dict(self, engine_steps: int) -> dict:
        drafts, verifies = self.num_draft_tokens, self.num_verifies
        return {
            "num_speculative_tokens": self.num_speculative_tokens,
            "proposed_tokens": self.num_proposed_tokens, "draft_tokens": drafts,
            "accepted_tokens": self.num_accepted_tokens, "verifies": verifies,
            "acceptance_rate": self.num_accepted_tokens / drafts if drafts else 0.0,
            # tokens emitted per verify: accepted drafts + the correction / bonus token (vLLM's definition)
            "mean_accepted_length": 1.0 + self.num_accepted_tokens / verifies if verifies else 0.0,
            "draft_tokens_per_step": drafts / engine_steps if engine_steps else 0.0,
            "drafting_seqs_per_step": verifies / engine_steps if engine_steps else 0.0,
            "acceptance_per_position": [a / verifies if verifies else 0.0 for a in self.accepted_per_position],
        }


class Speculator:
    def __init__(self, config: SpeculativeConfig, *, engine) -> None:
        self.config = config
        self.k = config.num_speculative_tokens
        self.max_seq_len = engine.max_seq_len
        self.stats = SpecStats(num_speculative_tokens=self.k)
        if config.method == "ngram":
            from rl_engine.inference.speculative.ngram import NgramProposer

            self.proposer = NgramProposer(prompt_lookup_min=config.prompt_lookup_min,
                                          prompt_lookup_max=config.prompt_lookup_max)
        elif config.method == "mtp":
            from rl_engine.inference.speculative.mtp import MTPProposer

            self.proposer = MTPProposer(engine.model, runner=engine.runner, sampler=engine.sampler,
                                        max_model_len=engine.max_model_len)
        else:
            from rl_engine.inference.speculative.draft_model import (DraftModelProposer, load_draft_model,
                                                                     shares_weights)

            draft = load_draft_model(config.model, target=engine.model)
            self.proposer = DraftModelProposer(
                draft, target_config=engine.config,
                num_target_blocks=engine.block_manager.num_blocks, max_model_len=engine.max_model_len,
                num_speculative_tokens=self.k, sampler=engine.sampler)
            self.proposer.shares_target_weights = shares_weights(draft, engine.model)

    # ---- before scheduling ----------------------------------------------------------------------
    def propose(self, running: list[Sequence]) -> None:
        """Append drafts to running sequences whose next step is a decode (all but their last token
        computed), at most k and never past max_tokens or the longest sequence the engine holds."""
        limit = self.config.disable_by_batch_size
        if limit is not None and len(running) >= limit:
            return
        seqs, ks = [], []
        for seq in running:
            if seq.num_computed_tokens != seq.num_tokens - 1:
                continue  # still prefilling
            k = min(self.k, self.max_seq_len - seq.num_tokens - 1)
            max_tokens = seq.request.params.max_tokens
            if max_tokens is not None:
                k = min(k, max_tokens - seq.num_output_tokens - 1)
            if k >= 1:
                seqs.append(seq)
                ks.append(k)
        if seqs:
            self.proposer.propose(seqs, ks)
            self.stats.num_proposed_tokens += sum(s.num_draft_tokens for s in seqs)

    def end_step(self) -> None:
        """After the engine's step: drafter state of sequences that finished is released."""
        release = getattr(self.proposer, "release_stale", None)
        if release is not None:
            release()

    def weights_updated(self) -> None:
        """The target's weights changed (`LLMEngine.update_weights`). A proposer that shares them (MTP,
        a draft model holding the target's tensors) forgets what it computed with the old ones, so no
        draft is ever made from stale weights; a separate draft model stays as it is (its weights are
        fixed). The n-gram proposer keeps nothing."""
        forget = getattr(self.proposer, "weights_updated", None)
        if forget is not None:
            forget()

    # ---- after the target's forward -------------------------------------------------------------
    def verify(self, logits: torch.Tensor, seqs: list[Sequence], *, sampler: Sampler,
               block_manager: BlockManager) -> list[Emission]:
        """logits [sum(1 + d_i), V]: the rows of `seqs` in order. Decides each sequence's tokens,
        rolls its tokens, computed count and KV blocks back to the accepted drafts."""
        rows: list[SampleRow] = []
        starts: list[int] = []
        for seq in seqs:
            first = seq.num_tokens - seq.num_draft_tokens  # position of the first token to sample
            starts.append(len(rows))
            for pos in range(first, seq.num_tokens + 1):
                rows.append(SampleRow(seq.request.params,
                                      None if seq.rng_seed is None else token_seed(seq.rng_seed, seq.index, pos)))
        assert len(rows) == logits.shape[0], (len(rows), logits.shape)
        samples, sample_logprobs = sampler(logits, rows)  # what plain decoding would emit at every row
        emissions: list[Emission | None] = []
        rejection: list[int] = []
        for i, (seq, r0) in enumerate(zip(seqs, starts)):
            d = seq.num_draft_tokens
            if d and seq.draft_probs is not None and not seq.request.params.greedy:
                emissions.append(None)
                rejection.append(i)
                continue
            a = accept_point_mass(seq.token_ids[seq.num_tokens - d:], samples[r0:r0 + d]) if d else 0
            emissions.append((samples[r0:r0 + a + 1], sample_logprobs[r0:r0 + a + 1], a))
        if rejection:
            self._rejection(logits, seqs, starts, rejection, emissions, samples, sample_logprobs, sampler)
        self._rollback(seqs, emissions, block_manager)
        return emissions

    def _rejection(self, logits, seqs, starts, indices, emissions, samples, sample_logprobs, sampler) -> None:
        """Draft-model drafts of sampled requests: accept w.p. min(1, p/q), else draw the residual."""
        draft_rows, tokens, params, seeds = [], [], [], []
        for i in indices:
            seq = seqs[i]
            first = seq.num_tokens - seq.num_draft_tokens
            for j in range(seq.num_draft_tokens):
                draft_rows.append(starts[i] + j)
                tokens.append(seq.token_ids[first + j])
                params.append(seq.request.params)
                seeds.append(purpose_seed(seq.rng_seed, seq.index, first + j, ACCEPT))
        device = logits.device
        z = logits[torch.tensor(draft_rows, device=device)].float()
        p = sampling_probs(z, params)  # [D, V]
        q = torch.cat([seqs[i].draft_probs for i in indices]).to(p.dtype)
        x = torch.tensor(tokens, device=device)
        accepted = accept_mask(p, q, x, sampler.uniforms(seeds))
        temps = torch.tensor([sp.temperature for sp in params], device=device)[:, None]
        logp = torch.log_softmax(z / temps, dim=-1)  # the log-prob contract, full vocabulary
        draft_logprobs = logp.gather(1, x[:, None]).view(-1).tolist()
        offset, residual_rows, residual_seeds, residual_of = 0, [], [], {}
        results = {}
        for i in indices:
            seq = seqs[i]
            d, first = seq.num_draft_tokens, seq.num_tokens - seq.num_draft_tokens
            a = next((j for j in range(d) if not accepted[offset + j]), d)
            toks, lps = tokens[offset:offset + a], draft_logprobs[offset:offset + a]
            if a == d:  # all accepted: the bonus token is plain decoding's sample of the last row
                r = starts[i] + d
                results[i] = (toks + [samples[r]], lps + [sample_logprobs[r]], a)
            else:
                residual_of[i] = len(residual_rows)
                residual_rows.append(offset + a)
                residual_seeds.append(purpose_seed(seq.rng_seed, seq.index, first + a, RESIDUAL))
                results[i] = (toks, lps, a)
            offset += d
        if residual_rows:
            idx = torch.tensor(residual_rows, device=device)
            drawn = residual_sample(p[idx], q[idx], sampler.uniforms(residual_seeds))
            drawn_logprobs = logp[idx].gather(1, torch.tensor(drawn, device=device)[:, None]).view(-1).tolist()
            for i, j in residual_of.items():
                toks, lps, a = results[i]
                results[i] = (toks + [drawn[j]], lps + [drawn_logprobs[j]], a)
        for i, emission in results.items():
            emissions[i] = emission

    def _rollback(self, seqs: list[Sequence], emissions: list[Emission], bm: BlockManager) -> None:
        """Keep the accepted drafts (their KV is the target's), drop the rest: tokens, computed count,
        and the blocks past the next token's slot."""
        verified = False
        stats = self.stats
        for seq, (_, _, a) in zip(seqs, emissions):
            d = seq.num_draft_tokens
            if not d:
                continue
            first = seq.num_tokens - d
            assert seq.num_computed_tokens == first + d, "a verify chunk computes every draft"
            del seq.token_ids[first + a:]
            seq.num_draft_tokens, seq.draft_probs = 0, None
            seq.num_computed_tokens = first + a
            bm.truncate(seq, first + a + 1)
            verified = True
            seq.spec_draft_tokens += d
            seq.spec_accepted_tokens += a
            seq.spec_verifies += 1
            stats.num_verifies += 1
            stats.num_draft_tokens += d
            stats.num_accepted_tokens += a
            for j in range(a):
                stats.accepted_per_position[j] += 1
        stats.num_steps += verified
