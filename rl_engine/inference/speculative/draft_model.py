"""The draft-model proposer: a smaller `CausalLM` sharing the target's tokenizer drafts k tokens per
sequence autoregressively, over its own paged KV pool.

Each target sequence gets a shadow `Sequence` in the draft pool that shares its `token_ids` list, so
drafts appended during proposal are the target's verify chunk, and the shadow's KV describes a prefix
of the same tokens. Round 0 catches every shadow up to its sequence (usually 1 or 2 tokens: the last
step's accepted drafts and the correction/bonus token; the whole prompt the first time) and samples
the first draft; rounds 1..k-1 feed one draft each through the draft runner's decode path.

Rollback needs no call from the engine: a shadow remembers where its last drafts started and which
they were; the next proposal keeps its KV up to the first position where the sequence's tokens now
differ (KV depends only on the token prefix) and truncates its blocks. Shadows of sequences that are
no longer running (finished, aborted, preempted) are freed after each step and before each proposal.

The draft pool holds as many blocks as the target pool plus k tokens per sequence; when it is full a
sequence simply gets no drafts that step. Draft tokens of a sampled request are drawn from the draft's
own sampling distribution q (same temperature and truncation as the request), and q is kept for the
rejection test; greedy requests draft the draft model's argmax.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from rl_engine.inference.block_manager import BlockManager
from rl_engine.inference.config import EngineConfig
from rl_engine.inference.model_runner import ModelRunner
from rl_engine.inference.sampler import Sampler, inverse_cdf, sampling_probs
from rl_engine.inference.sequence import SchedulerOutput, Sequence, SeqStatus
from rl_engine.inference.speculative.rejection import DRAFT, purpose_seed


def shares_weights(draft: torch.nn.Module, target: torch.nn.Module) -> bool:
    """Whether the draft holds any of the target's parameter tensors (a self-draft)."""
    target_ptrs = {p.data_ptr() for p in target.parameters()}
    return any(p.data_ptr() in target_ptrs for p in draft.parameters())


def load_draft_model(model, *, target) -> "torch.nn.Module":
    """The draft CausalLM: loaded from a directory with the target's dtype and device, or the given
    module checked against the target (same vocabulary, device and a single pipeline stage)."""
    device = next(target.parameters()).device
    if isinstance(model, (str, os.PathLike)):
        from rl_engine.policy import from_pretrained

        model = from_pretrained(str(model), dtype=target.dtype, device=device)
    if model.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"the draft model's vocabulary ({model.config.vocab_size} tokens) differs from the "
                         f"target's ({target.config.vocab_size}); a draft model must share the tokenizer")
    if next(model.parameters()).device != device:
        raise ValueError(f"the draft model is on {next(model.parameters()).device} but the target on {device}")
    return model


@dataclass
class _Shadow:
    seq: Sequence  # the draft pool's view: shares token_ids with `target`
    target: Sequence
    start: int = 0  # token position of the first draft of the last proposal
    drafts: list[int] = field(default_factory=list)  # the last proposal's drafts


class DraftModelProposer:
    def __init__(self, model, *, target_config: EngineConfig, num_target_blocks: int, max_model_len: int,
                 num_speculative_tokens: int, sampler: Sampler) -> None:
        self.model = model
        self.max_len = min(max_model_len, model.config.max_context_len)
        bs = target_config.block_size
        per_seq = -(-num_speculative_tokens // bs) + 1
        num_blocks = num_target_blocks + per_seq * min(target_config.max_num_seqs, num_target_blocks)
        config = EngineConfig(block_size=bs, num_kv_blocks=num_blocks, max_num_seqs=target_config.max_num_seqs,
                              max_num_batched_tokens=target_config.max_num_batched_tokens,
                              max_model_len=self.max_len, enable_prefix_caching=False,
                              graph_batch_sizes=target_config.graph_batch_sizes,
                              enforce_eager=target_config.enforce_eager,
                              # the target's CPU settings: an engine that keeps prepacked linears off (the RL
                              # log-prob contract) or its thread count fixed (sharing a trainer's process)
                              # must not get them back through its draft's runner
                              cpu_threads=target_config.cpu_threads,
                              cpu_prepack_weights=target_config.cpu_prepack_weights,
                              cpu_huge_pages=target_config.cpu_huge_pages,
                              cpu_decode_kernel=target_config.cpu_decode_kernel)
        self.runner = ModelRunner(model, config=config, max_model_len=self.max_len)
        self.block_manager = BlockManager(num_blocks=num_blocks, block_size=bs, enable_prefix_caching=False)
        self.max_num_batched_tokens = target_config.max_num_batched_tokens
        self.sampler = sampler
        self.shadows: dict[int, _Shadow] = {}
        # A draft holding any of the target's tensors (a self-draft) changes with every weight update;
        # a separate draft model is fixed.
        self.shares_target_weights = False

    def weights_updated(self) -> None:
        """The target's weights changed: a draft sharing them drops its KV (every shadow recomputes from
        its sequence's tokens at the next proposal); a fixed draft's KV stays valid."""
        if self.shares_target_weights:
            self.runner.weights_updated()  # its packed copies of them (a write through .data bumps no version)
            for shadow in self.shadows.values():
                self.block_manager.free(shadow.seq)
            self.shadows.clear()

    def propose(self, seqs: list[Sequence], max_drafts: list[int]) -> None:
        """Append up to max_drafts[i] drafts to seqs[i].token_ids; sampled requests get draft_probs."""
        self.release_stale()
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        active: list[tuple[_Shadow, int, int]] = []  # (shadow, catch-up tokens, drafts wanted)
        for seq, k in zip(seqs, max_drafts):
            k = min(k, self.max_len - seq.num_tokens + 1)  # fed positions stay inside the draft's context
            if k < 1 or budget == 0:
                continue
            shadow = self._shadow(seq)
            n = min(seq.num_tokens - shadow.seq.num_computed_tokens, budget)
            caught_up = shadow.seq.num_computed_tokens + n == seq.num_tokens
            need = bm.blocks_needed(shadow.seq, shadow.seq.num_computed_tokens + n + (k - 1 if caught_up else 0))
            if need > bm.num_free_blocks:
                continue  # the draft pool is full: no drafts for this sequence this step
            bm.allocate(shadow.seq, need)
            budget -= n
            shadow.start, shadow.drafts = seq.num_tokens, []
            active.append((shadow, n, k if caught_up else 0))
        if not active:
            return
        # Round 0: catch up (one-token chunks first, as the runner expects), sample the first drafts.
        active.sort(key=lambda item: item[1] != 1)
        sched = SchedulerOutput(seqs=[s.seq for s, _, _ in active], num_new_tokens=[n for _, n, _ in active],
                                num_single=sum(n == 1 for _, n, _ in active))
        wanted = {s.seq.seq_id: k for s, _, k in active}
        by_id = {s.seq.seq_id: s for s, _, _ in active}
        drafting = self._forward(sched, by_id)
        for shadow, n, _ in active:
            shadow.seq.num_computed_tokens += n
        # Rounds 1..k-1: feed the newest draft of every shadow that wants more.
        while True:
            drafting = [s for s in drafting if len(s.drafts) < wanted[s.seq.seq_id]]
            if not drafting:
                break
            sched = SchedulerOutput(seqs=[s.seq for s in drafting], num_new_tokens=[1] * len(drafting),
                                    num_single=len(drafting))
            drafting = self._forward(sched, by_id)
            for shadow in drafting:
                shadow.seq.num_computed_tokens += 1
        for shadow, _, _ in active:
            target = shadow.target
            if target.draft_probs is not None:
                target.draft_probs = torch.stack(target.draft_probs)  # [d, vocab]

    def _forward(self, sched: SchedulerOutput, by_id: dict[int, _Shadow]) -> list[_Shadow]:
        """Run the draft model on `sched`, sample one draft per shadow that produced logits, append it
        to the target; returns those shadows."""
        with torch.inference_mode():
            logits, seqs = self.runner.execute(sched)
        if not seqs:
            return []
        shadows = [by_id[s.seq_id] for s in seqs]
        sampled = [i for i, s in enumerate(shadows) if not s.target.request.params.greedy]
        tokens = logits.argmax(dim=-1).tolist()
        probs = None
        if sampled:
            rows = torch.tensor(sampled, device=logits.device)
            probs = sampling_probs(logits[rows], [shadows[i].target.request.params for i in sampled])
            seeds = [purpose_seed(s.target.rng_seed, s.target.index, s.target.num_tokens, DRAFT)
                     for s in (shadows[i] for i in sampled)]
            for i, token in zip(sampled, inverse_cdf(probs, self.sampler.uniforms(seeds)).tolist()):
                tokens[i] = token
        row_of = {i: r for r, i in enumerate(sampled)}
        for i, (shadow, token) in enumerate(zip(shadows, tokens)):
            target = shadow.target
            target.token_ids.append(token)  # the shared list: also the shadow's next input
            target.num_draft_tokens += 1
            shadow.drafts.append(token)
            if i in row_of:
                if target.draft_probs is None:
                    target.draft_probs = []
                target.draft_probs.append(probs[row_of[i]])
        return shadows

    def _shadow(self, seq: Sequence) -> _Shadow:
        """The sequence's shadow, its KV rolled back to the prefix that still matches seq's tokens,
        keeping at least the last token to recompute (its logits give the first draft)."""
        shadow = self.shadows.get(seq.seq_id)
        if shadow is None:
            shadow = self.shadows[seq.seq_id] = _Shadow(
                Sequence(seq.request, seq.index, seq.token_ids, num_prompt_tokens=seq.num_prompt_tokens,
                         rng_seed=seq.rng_seed), seq)
            shadow.seq.status = SeqStatus.RUNNING
        assert shadow.seq.token_ids is seq.token_ids
        valid = seq.num_tokens - 1
        if shadow.drafts:
            now = seq.token_ids[shadow.start:shadow.start + len(shadow.drafts)]
            same = next((j for j, (a, b) in enumerate(zip(shadow.drafts, now)) if a != b), len(now))
            valid = min(valid, shadow.start + same)
            shadow.drafts = []
        if shadow.seq.num_computed_tokens > valid:
            self.block_manager.truncate(shadow.seq, valid)
        return shadow

    def release_stale(self) -> None:
        """Free the shadows of sequences that are no longer running (finished, aborted, preempted)."""
        for seq_id in [i for i, s in self.shadows.items() if s.target.status is not SeqStatus.RUNNING]:
            self.block_manager.free(self.shadows.pop(seq_id).seq)
