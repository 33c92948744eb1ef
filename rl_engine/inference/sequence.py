"""Requests, their sequences, and the outputs handed back to users.

A `Request` holds the `n` samples (`Sequence`s) of one prompt. A sequence is one token list, prompt
then output, plus how many of its tokens have KV in the cache (`num_computed_tokens`). The scheduler
only ever asks "how many tokens are not computed yet": a fresh prompt, a chunk of a long prompt, a
decode step, the recompute after preemption and the resumption of an interrupted partial rollout are
the same thing to it. Per generated token a sequence keeps the behavior log-prob, the policy (weights)
version that sampled it, and the oldest weights version among the KV it attended to.

Speculative decoding appends draft tokens to `token_ids` for the span of one step (`num_draft_tokens`
of them at the end, not yet verified), so the scheduler and model runner see a verify chunk as plain
uncomputed tokens; outside `LLMEngine.step` no sequence holds drafts.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from rl_engine.inference.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclass
class CompletionOutput:
    """One sample of a request. Lists are per generated token."""

    index: int
    token_ids: list[int]
    text: str | None
    logprobs: list[float] | None  # behavior log-probs under the log-prob contract; None if asked for none
    policy_versions: list[int]  # weights version that sampled each token
    kv_versions: list[int]  # oldest weights version of the KV each token's sampling attended to
    finish_reason: str | None  # "stop", "length", "abort", or None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_preemptions: int = 0
    routed_experts: list | None = None  # MoE routing replay: per processed token [num_moe_layers][k]
    # SamplingParams.logprobs > 0: per generated token, the most likely (token id, log-prob) pairs
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # Speculative decoding, this sample's share: drafts the target verified, how many it accepted, and
    # verify steps (a resumed partial rollout continues the counts it was handed)
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_verifies: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The result of one request: `n` completions. A partial one (from `interrupt()`, finish_reason
    "abort") can be passed back as a prompt to continue it, with the engine's current weights."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    sampling_params: SamplingParams | None = None
    error: str | None = None  # set when the request was refused (e.g. a prompt too long)


class Sequence:
    """One sample: prompt + generated tokens and its place in the paged KV cache."""

    _ids = itertools.count()

    # (in this order, the six slots a decode step writes for every row, `LLMEngine._emit_decode`, share the object's
    # first cache line with its reference count: CPython places these objects on 64-byte boundaries; the next eight
    # are the rest a decode step may read)
    __slots__ = ("token_ids", "num_computed_tokens", "kv_version", "num_hashed_blocks", "policy_versions",
                 "kv_versions", "logprobs", "block_table", "request", "index", "top_logprobs", "num_prompt_tokens",
                 "status", "num_draft_tokens", "seq_id", "block_hashes", "kv_epoch", "finish_reason", "stop_reason",
                 "rng_seed", "num_preemptions", "routing", "text_offset", "draft_probs", "spec_draft_tokens",
                 "spec_accepted_tokens", "spec_verifies", "fork_leader")

    def __init__(self, request: "Request", index: int, token_ids: list[int], *, num_prompt_tokens: int,
                 rng_seed: int) -> None:
        self.seq_id = next(Sequence._ids)
        self.request = request
        self.index = index
        self.token_ids = token_ids
        self.num_prompt_tokens = num_prompt_tokens
        self.num_computed_tokens = 0
        self.block_table: list[int] = []  # changed in place only by appending; any other change is a new list
        self.block_hashes: list[bytes] = []  # chained content hash of each full block (prefix cache)
        self.num_hashed_blocks = 0  # blocks of block_table registered in the prefix cache
        self.kv_epoch = -1  # prefix-cache epoch in which this sequence's KV started being computed
        self.kv_version: int | None = None  # oldest weights version in this sequence's cached KV
        self.status = SeqStatus.WAITING
        self.logprobs: list[float] = []
        self.policy_versions: list[int] = []
        self.kv_versions: list[int] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.rng_seed = rng_seed
        self.num_preemptions = 0
        self.routing: dict[int, object] | None = None  # start position -> routing tensor [n, L, k]
        self.text_offset = 0  # characters of output text already checked for stop strings
        self.num_draft_tokens = 0  # unverified draft tokens at the end of token_ids (within a step)
        self.draft_probs = None  # [num_draft_tokens, vocab] draft-model distribution q, None: point mass
        self.top_logprobs: list[list[tuple[int, float]]] = []  # per generated token, if params.logprobs
        # speculative decoding: drafts verified, drafts accepted, verify steps (CompletionOutput's)
        self.spec_draft_tokens = self.spec_accepted_tokens = self.spec_verifies = 0
        # a forked sample waiting for its first admission: the leader whose partial prompt block it may copy then
        # (EngineConfig.fork_copy_partial_block, `Scheduler._fork_copy_source`); None otherwise
        self.fork_leader: Sequence | None = None

    def routing_prefix(self, limit: int) -> dict[int, object]:
        """This sequence's recorded MoE routing for its first `limit` tokens (a forked sample's share of its
        leader's: the tokens whose KV it takes from the leader)."""
        return {s: t[:limit - s] for s, t in self.routing.items() if s < limit}

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def truncate_drafts(self, keep: int) -> None:
        """Drop all but the first `keep` draft tokens (they were not scheduled)."""
        drop = self.num_draft_tokens - keep
        if drop > 0:
            del self.token_ids[-drop:]
            self.num_draft_tokens = keep
            if self.draft_probs is not None:
                self.draft_probs = self.draft_probs[:keep] if keep else None


class Request:
    """A prompt and its `n` samples. Sample 0 (the leader) prefills the prompt; the others are
    forked from it once its prompt KV exists, sharing its full prompt blocks (`pending_forks`)."""

    __slots__ = ("request_id", "prompt", "prompt_token_ids", "params", "seqs", "pending_forks", "stream", "stop_rule")

    def __init__(self, request_id: str, *, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, stream: bool) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.seqs: list[Sequence] = []
        self.pending_forks: list[Sequence] = []
        self.stream = stream
        self.stop_rule: tuple | None = None  # the engine's stop-check shortcut (LLMEngine._stop_rule)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


def is_remainder(items: list, last: list | None, removed: list) -> bool:
    """Whether `items` is exactly `last` less the items `removed` (each in `last`), in the same order: the running list
    after a decode step less the sequences removed since (`Scheduler._schedule_decodes`), a step's scheduled sequences
    after the last step's less those that stopped (`ModelRunner._continue_decode`)."""
    if last is None or len(items) != len(last) - len(removed):
        return False
    if removed:
        last = last.copy()
        for item in removed:
            if item not in last:
                return False
            last.remove(item)
    return last == items


def without_rows(items: list, rows: list[int]) -> list:
    """A copy of `items` less those at `rows` (ascending indices): a decode batch's sequences (or their params)
    after the rows that stopped in the last step (`ModelRunner._continue_decode`, `engine._Batch.without_stopped`)."""
    kept = items.copy()
    for i in reversed(rows):
        del kept[i]
    return kept


@dataclass
class SchedulerOutput:
    """One step: the sequences to run and how many new tokens each computes. Sequences computing
    exactly one token (decodes, and one-token prefill chunks) come first, then longer chunks."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_single: int = 0  # the first `num_single` entries compute one token each
    preempted: list[Sequence] = field(default_factory=list)
    # (src, dst) KV blocks to copy before the step runs: forked samples admitted with a copy of their leader's
    # partial prompt block (dst, the sample's own) that they compute past
    block_copies: list[tuple[int, int]] = field(default_factory=list)
