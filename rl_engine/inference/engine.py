"""The engine: requests in, one scheduled step at a time, outputs out; the RL controls.

`add_request` validates and queues; `step` schedules one flat batch, runs it, samples, applies stop
conditions and returns the outputs that are ready (finished requests, and every step's state of
streaming ones). The `n` samples of a prompt fork from the leader once its prompt KV exists, sharing
its full prompt blocks (the block holding the last prompt token is recomputed by each sample, so no
block is ever written by two sequences).

RL controls, all between steps: `abort`; `interrupt` ends every unfinished request and returns its
partial output (tokens, log-probs, per-token versions), which `add_request` accepts back as a prompt
to continue with the current weights, its KV recomputed; `update_weights` applies a weight update,
bumps `weights_version` (stamped on every token sampled afterwards) and resets the prefix cache;
`reset_prefix_cache`.

With `speculative_config`, each step first appends drafts to the running decodes, the target verifies
them as multi-token chunks of the same batch, and a sequence may emit several tokens in one step
(each one checked for stop conditions in order); see `speculative/`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from rl_engine.inference.block_manager import BlockManager
from rl_engine.inference.config import EngineConfig
from rl_engine.inference.model_runner import ModelRunner
from rl_engine.inference.sampler import Sampler, full_logits, same_setting, token_seed, token_uniform_base
from rl_engine.inference.sampling_params import SamplingParams
from rl_engine.inference.scheduler import Scheduler
from rl_engine.inference.sequence import (CompletionOutput, Request, RequestOutput, SchedulerOutput, SeqStatus,
                                          Sequence, without_rows)
from rl_engine.kernels.cpu import host_memory
from rl_engine.kernels.cpu.threads import StepThreads

if TYPE_CHECKING:
    from rl_engine.policy import CausalLM
    from rl_engine.policy.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class _Batch:
    """What sampling reads of a step's sampled sequences that does not change while they stay the same (in
    the same order, as from one decode step to the next): their params, whether those share one setting,
    whether any asks for log-probs or top log-probs, the seeded uniforms' per-row part, and whether any request
    streams. All of it is a function of the sequences. `stopped`: the rows whose sequence stopped in the last
    decode step that sampled this batch (`_emit_decode`), for `without_stopped`. `stop_rows`: what `_emit_decode`
    reads instead of each row's request (`LLMEngine._stop_rows`), None until it first does."""

    __slots__ = ("seqs", "params", "uniform", "logprobs", "top_rows", "seed_base", "streams", "stopped", "stop_rows")

    def __init__(self, seqs: list[Sequence]) -> None:
        self.seqs = seqs
        self.params = params = [s.request.params for s in seqs]
        self.uniform = same_setting(params)
        self.logprobs = any(p.logprobs is not None for p in params)
        self.top_rows = any(p.logprobs for p in params)
        self.seed_base = _seed_base(seqs)
        self.streams = any(s.request.stream for s in seqs)
        self.stopped: list[int] = []
        self.stop_rows: tuple[list[int], frozenset[int]] | None = None

    def without_stopped(self, seqs: list[Sequence]) -> _Batch | None:
        """The batch of `seqs` when they are this batch's sequences less its `stopped` rows, in the same order (a
        decode step after one in which samples stopped): the per-row parts compacted, and each "any" or "same"
        recomputed only where dropping rows can change it (`stop_rows`' token set is kept: a superset). Else None."""
        rows = self.stopped
        if not rows or len(seqs) != len(self.seqs) - len(rows):
            return None
        if without_rows(self.seqs, rows) != seqs:
            return None
        batch = _Batch.__new__(_Batch)
        batch.seqs, batch.stopped = seqs, []
        batch.params = params = without_rows(self.params, rows)
        batch.uniform = self.uniform or same_setting(params)
        batch.logprobs = self.logprobs and any(p.logprobs is not None for p in params)
        batch.top_rows = self.top_rows and any(p.logprobs for p in params)
        if self.seed_base is None:
            batch.seed_base = _seed_base(seqs)
        else:
            keep = np.ones(len(self.seqs), dtype=bool)
            keep[rows] = False
            batch.seed_base = self.seed_base[keep]
        batch.streams = self.streams and any(s.request.stream for s in seqs)
        batch.stop_rows = None if self.stop_rows is None else (without_rows(self.stop_rows[0], rows),
                                                               self.stop_rows[1])
        return batch


def _seed_base(seqs: list[Sequence]) -> np.ndarray | None:
    """The seeded uniforms' per-row part (`token_uniform_base`), None where a sequence has no seed."""
    seeds = [s.rng_seed for s in seqs]
    return None if None in seeds else token_uniform_base(seeds, [s.index for s in seqs])


class LLMEngine:
    def __init__(self, model: CausalLM, *, config: EngineConfig | None = None,
                 tokenizer: Tokenizer | None = None) -> None:
        config = config or EngineConfig()
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        mc = model.config
        self.max_model_len = config.max_model_len or mc.max_context_len
        if self.max_model_len > mc.max_context_len:
            raise ValueError(f"max_model_len ({self.max_model_len}) exceeds the model's context of "
                             f"{mc.max_context_len} tokens")
        if config.record_routing and not mc.is_moe:
            raise ValueError("record_routing=True needs an MoE model; this one is dense")
        prefix_caching = config.enable_prefix_caching
        if config.record_routing and prefix_caching:
            logger.warning("record_routing=True: prefix caching disabled (cached tokens would have no routing)")
            prefix_caching = False
        self.runner = ModelRunner(model, config=config, max_model_len=self.max_model_len)
        # CPU: each step's tensors from the step arena (EngineConfig.cpu_step_arena), its extension built here rather
        # than inside the first step
        self._step_arena = (host_memory.step_arena if self.runner.device.type == "cpu" and config.cpu_step_arena
                            and host_memory.step_arena_available() else contextlib.nullcontext)
        self.block_manager = BlockManager(num_blocks=self.runner.num_blocks, block_size=config.block_size,
                                          enable_prefix_caching=prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens)
        # compile_decode on CPU (never with batch_invariant: the runner refuses the pair): greedy steps' argmax
        # and log-prob in one compiled pass over the logits
        self.sampler = Sampler(device=self.runner.device, seed=config.seed, batch_invariant=model.batch_invariant,
                               compile_greedy=config.compile_decode and self.runner.device.type == "cpu")
        # CPU: a small model's small steps run on one thread or all of them, whichever a decode step of their size
        # measured faster (kernels/cpu/threads.py: StepThreads). Not under batch_invariant, whose engine and trainer
        # must round alike.
        self.step_threads = StepThreads()
        self._flops_per_token = self._model_bytes = None
        if self.runner.device.type == "cpu" and not model.batch_invariant:
            params = list(model.parameters())
            self._flops_per_token = 2 * sum(p.numel() for p in params)
            self._model_bytes = sum(p.numel() * p.element_size() for p in params)
        eos = tokenizer.eos_token_ids if tokenizer is not None and tokenizer.eos_token_ids else mc.eos_token_id
        self.eos_token_ids = frozenset(eos)
        # A sequence never grows past the context nor past the whole pool.
        self.max_seq_len = min(self.max_model_len, self.block_manager.num_usable_blocks * config.block_size)
        self.weights_version = 0
        self.requests: dict[str, Request] = {}
        self._ready: list[RequestOutput] = []  # finished outside a step (e.g. a fully finished resubmission)
        self._batch: _Batch | None = None  # the last step's sampled sequences and what sampling reads of them
        # (None once no request is left: `_forget_decoded`)
        # the seeded uniforms' function (the registry's `token_uniforms_at` for the engine's device: on CPU one C++
        # loop, elsewhere numpy), resolved at the first seeded draw (an engine that never samples seeded rows loads
        # no C++ extension for it)
        self._uniforms_at: Callable | None = None
        self.num_steps = 0
        self.num_generated_tokens = 0
        # A second user of this engine on another thread (an RL run's HTTP server, serve.host.EngineHost):
        # `admit()` at the start of every step adds its requests; `route(outputs)` takes its requests'
        # outputs out of what step() and interrupt() return. The owner and the guest share one lock.
        self.guest = None
        self.speculator = None
        if config.speculative_config is not None:
            from rl_engine.inference.speculative import Speculator

            self.speculator = Speculator(config.speculative_config, engine=self)
        # CPU decode steps hand the sampler their logits deferred (`DeferredLogits`): greedy steps without
        # log-probs pick from a screened product; the speculator reads every logit
        self.runner.defer_logits = self.speculator is None and self.runner.device.type == "cpu"

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int] | RequestOutput,
                    params: SamplingParams | None = None, *, stream: bool = False) -> None:
        """Queue a prompt (text or token ids), or a partial `RequestOutput` to continue it.
        Raises ValueError (and queues nothing) for a prompt that cannot be served."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in the engine")
        if isinstance(prompt, RequestOutput):
            request = self._resumed_request(request_id, prompt, params, stream)
        else:
            params = params or SamplingParams()
            text, ids = self._prompt_ids(prompt)
            self._check_request(ids, params)
            request = Request(request_id, prompt=text, prompt_token_ids=ids, params=params, stream=stream)
            for i in range(params.n):
                request.seqs.append(Sequence(request, i, list(ids), num_prompt_tokens=len(ids),
                                             rng_seed=params.seed))
            self.scheduler.add(request.seqs[0])
            request.pending_forks = request.seqs[1:]
        if request.finished:
            self._ready.append(self._output(request))
        else:
            self.requests[request_id] = request

    def _prompt_ids(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; this engine has none (pass token ids)")
            return prompt, self.tokenizer.encode(prompt)
        ids = list(prompt)
        vocab = self.model.config.vocab_size
        if not all(isinstance(t, int) for t in ids):
            raise ValueError("a prompt must be a string or a list of int token ids")
        if ids and (min(ids) < 0 or max(ids) >= vocab):
            raise ValueError(f"prompt token ids must lie in [0, {vocab}), got min {min(ids)}, max {max(ids)}")
        return None, ids

    def _check_request(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("the prompt is empty; it needs at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}: "
                             "no room to generate; shorten the prompt")
        if len(ids) >= self.max_seq_len:
            raise ValueError(f"the prompt has {len(ids)} tokens but the whole KV pool holds "
                             f"{self.max_seq_len} ({self.block_manager.num_usable_blocks} blocks of "
                             f"{self.config.block_size}); raise kv_cache_memory or shorten the prompt")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine has none (use stop_token_ids)")
        if params.logprobs and self.speculator is not None:
            raise ValueError("top log-probs (SamplingParams.logprobs > 0) are not available with speculative "
                             "decoding; ask for logprobs=0 (the sampled tokens' log-probs are always returned)")
        if (params.logprobs or 0) > self.model.config.vocab_size:
            raise ValueError(f"SamplingParams.logprobs = {params.logprobs} exceeds the vocabulary "
                             f"({self.model.config.vocab_size} tokens)")

    def _resumed_request(self, request_id: str, partial: RequestOutput, params: SamplingParams | None,
                         stream: bool) -> Request:
        params = params or partial.sampling_params or SamplingParams()
        ids = list(partial.prompt_token_ids)
        self._check_request(ids, params)
        request = Request(request_id, prompt=partial.prompt, prompt_token_ids=ids, params=params, stream=stream)
        for out in partial.outputs:
            seq = Sequence(request, out.index, ids + list(out.token_ids), num_prompt_tokens=len(ids),
                           rng_seed=params.seed)
            if out.logprobs is None and params.logprobs is not None and out.token_ids:
                raise ValueError(f"request {request_id!r}: the partial has no log-probs (it asked for none, "
                                 "logprobs=None); resume it with SamplingParams(logprobs=None) too")
            seq.logprobs, seq.policy_versions = list(out.logprobs or []), list(out.policy_versions)
            seq.kv_versions, seq.num_preemptions = list(out.kv_versions), out.num_preemptions
            seq.top_logprobs = list(out.top_logprobs or [])
            seq.spec_draft_tokens, seq.spec_accepted_tokens = out.spec_draft_tokens, out.spec_accepted_tokens
            seq.spec_verifies = out.spec_verifies
            request.seqs.append(seq)
            if out.finish_reason in ("stop", "length"):
                seq.status, seq.finish_reason, seq.stop_reason = SeqStatus.FINISHED, out.finish_reason, out.stop_reason
            elif self._length_reached(seq):
                seq.status = SeqStatus.FINISHED
            else:
                self.scheduler.add(seq)
        return request

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests or self._ready)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; returns its partial output (finish_reason "abort"), None if unknown."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.remove(seq)
                seq.status, seq.finish_reason = SeqStatus.FINISHED, "abort"
        if not self.requests:
            self._forget_decoded()
        return self._output(request)

    def interrupt(self) -> list[RequestOutput]:
        """Stop every unfinished request and return the partial outputs (to resubmit after a weight
        update: their tokens, log-probs and versions are kept, their KV recomputed)."""
        outputs = [self.abort(rid) for rid in list(self.requests)]
        return outputs if self.guest is None else self.guest.route(outputs)

    def _forget_decoded(self) -> None:
        """No request is left: drop the persistent decode batch's references to the last step's sequences (the
        scheduler's, the model runner's and the sampling batch), which the next step would otherwise drop, so a
        finished or aborted request's sequences are not kept while the engine waits. The next step builds them
        afresh (as the first step does)."""
        self._batch = None
        self.scheduler.forget_decoded()
        self.runner.forget_decoded()

    # ---- weights --------------------------------------------------------------------------------
    def update_weights(self, apply: Callable[[torch.nn.Module], None] | None = None, *, version: int | None = None,
                       recompute_kv: bool = False) -> int:
        """Between steps: run `apply(model)` (e.g. copy new parameters in; skip it when the trainer
        already updated the shared tensors), set the new weights version (default: current + 1; it must
        increase) and reset the prefix cache. With `recompute_kv` running sequences drop their KV and
        recompute it with the new weights, keeping their tokens. Returns the new version."""
        new = self.weights_version + 1 if version is None else version
        if new <= self.weights_version:
            raise ValueError(f"weights version must increase: current {self.weights_version}, got {version}")
        if apply is not None:
            with torch.no_grad():
                apply(self.model)
        self.weights_version = new
        self.runner.weights_updated()
        self.reset_prefix_cache()
        if self.speculator is not None:  # a draft sharing the weights drops what it computed with the old ones
            self.speculator.weights_updated()
        if recompute_kv:
            sched = self.scheduler
            for seq in list(sched.waiting):  # e.g. forked samples holding their leader's blocks
                self.block_manager.free(seq)
            for seq in reversed(sched.running):
                self.block_manager.free(seq)
                sched.add(seq, front=True)
            sched.running.clear()
        return new

    def reset_prefix_cache(self) -> None:
        self.block_manager.reset_prefix_cache()

    # ---- stepping -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batch. Returns finished requests and the current state of streaming ones that
        advanced."""
        if self.guest is not None:
            self.guest.admit()
        ready, self._ready = self._ready, []
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running)
        sched = self.scheduler.schedule()
        if not sched.seqs:
            if self.requests and not ready:
                raise RuntimeError("internal error: requests are unfinished but none could be scheduled")
            return ready if self.guest is None else self.guest.route(ready)
        emissions: list[tuple[list[int], list[float], int]] = []
        with self._step_threads(sched), torch.inference_mode(), self._step_arena():
            if sched.block_copies:  # forked samples admitted with a copy of their leader's partial block
                self.runner.copy_kv_blocks(sched.block_copies)
            logits, sample_seqs = self.runner.execute(sched, record_routing=self.config.record_routing)
            version = self.weights_version
            bm = self.block_manager
            # Plain decoding where every scheduled sequence computes one token and samples it (the steady state):
            # its KV bookkeeping is done per sequence in `_emit_decode`'s one pass, after sampling
            decode = self.speculator is None and len(sample_seqs) == len(sched.seqs) == sched.num_single
            if not decode:
                for seq, n in zip(sched.seqs, sched.num_new_tokens):
                    seq.num_computed_tokens += n
                    kv_version = seq.kv_version
                    if kv_version is None or version < kv_version:
                        seq.kv_version = version
            tops: dict[int, list] = {}
            if sample_seqs:
                batch = self._batch
                if batch is None or batch.seqs != sample_seqs:
                    batch = None if batch is None else batch.without_stopped(sample_seqs)
                    batch = self._batch = batch or _Batch(sample_seqs)
                if self.speculator is not None:  # also rolls back rejected drafts
                    emissions = self.speculator.verify(logits, sample_seqs, sampler=self.sampler,
                                                       block_manager=bm)
                else:
                    tokens, logprobs = self._sample(logits, batch)
                if batch.top_rows:
                    tops = self._top_logprobs(full_logits(logits), sample_seqs)
            if bm.enable_prefix_caching and not decode:
                bs = bm.block_size
                for seq in sched.seqs:
                    if seq.num_computed_tokens // bs > seq.num_hashed_blocks:  # a block filled up
                        bm.register_full_blocks(seq)
        self.num_steps += 1
        touched: dict[str, Request] = {}
        stopped: set[str] = set()  # requests with a sample that finished this step
        if decode:
            self._emit_decode(batch, tokens, logprobs, tops, version, touched, stopped)
        elif sample_seqs and self.speculator is None:
            self._emit_plain(sample_seqs, tokens, logprobs, tops, version, touched, stopped)
        for seq, (tokens, logprobs, in_place) in zip(sample_seqs, emissions):
            if in_place:  # accepted drafts: re-appended one at a time below, with stop checks
                del seq.token_ids[-in_place:]
            request = seq.request
            for token, logprob in zip(tokens, logprobs):
                seq.token_ids.append(token)
                seq.logprobs.append(logprob)
                seq.policy_versions.append(version)
                seq.kv_versions.append(seq.kv_version)
                self.num_generated_tokens += 1
                if request.pending_forks and seq.index == 0:
                    self._fork(request, seq)
                if self._stops(seq, token):
                    stopped.add(request.request_id)
                    break
            touched[request.request_id] = request
        if self.speculator is not None:
            self.speculator.end_step()
        outputs = ready
        # (a request finishes only in a step where one of its samples stops)
        for rid, request in touched.items():
            if rid in stopped and request.finished:
                del self.requests[rid]
                outputs.append(self._output(request))
                if not self.requests:
                    self._forget_decoded()
            elif request.stream:
                outputs.append(self._output(request))
        return outputs if self.guest is None else self.guest.route(outputs)

    def _step_threads(self, sched: SchedulerOutput) -> contextlib.AbstractContextManager:
        """The step's thread count: for a small model's small step one thread or all, whichever measured faster
        for a decode step of its size (`StepThreads`), else as set."""
        if self._flops_per_token is None:
            return contextlib.nullcontext()
        if self.runner.threads is not None:  # (cpu_threads="auto") settle its count first: that is restored
            self.runner.threads.poll()
        n = len(sched.seqs)
        return self.step_threads.run(self._flops_per_token * sum(sched.num_new_tokens), model_bytes=self._model_bytes,
                                     rows=n if sched.num_single == n and self.speculator is None else None)

    def _emit_plain(self, seqs: list[Sequence], tokens: list[int], logprobs: list[float] | None,
                    tops: dict[int, list], version: int, touched: dict[str, Request], stopped: set[str]) -> None:
        """Plain decoding: one token per sequence, appended with its log-prob and versions, then the
        stop checks (`_stops`)."""
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            request = seq.request
            token_ids = seq.token_ids
            token_ids.append(token)
            if logprobs is not None:  # (None: no row's request asked for any)
                seq.logprobs.append(logprobs[i])
            seq.policy_versions.append(version)
            seq.kv_versions.append(seq.kv_version)
            if tops and i in tops:  # (only the rows whose request asked)
                seq.top_logprobs.append(tops[i])
            if request.pending_forks and seq.index == 0:
                self._fork(request, seq)
            if self._stops(seq, token):
                stopped.add(request.request_id)
            touched[request.request_id] = request
        self.num_generated_tokens += len(seqs)

    def _emit_decode(self, batch: _Batch, tokens: list[int], logprobs: list[float] | None,
                     tops: dict[int, list], version: int, touched: dict[str, Request], stopped: set[str]) -> None:
        """`_emit_plain` of a step in which every scheduled sequence (`batch.seqs`) computed one token and sampled
        it, with the step's KV bookkeeping in the same pass over the sequences: the computed token, the oldest
        weights version of the KV, the prefix cache's newly full block (registered before a stop frees the
        sequence's blocks), then the fork and `_stops`, for the rows that `batch.stop_rows` does not rule out
        (a row's request is not read otherwise). `touched` is filled only when `step` reads it (a sample stopped,
        or a request streams), in the same order as the pass would."""
        seqs = batch.seqs
        bm = self.block_manager
        bs = bm.block_size if bm.enable_prefix_caching else 0
        stop_rule, finishes = self._stop_rule, self._finishes
        if batch.stop_rows is None:
            batch.stop_rows = self._stop_rows(seqs)
        limits, stop_tokens_any = batch.stop_rows
        stopped_rows: list[int] = []
        for i, (seq, token, logprob, limit) in enumerate(zip(seqs, tokens, logprobs or itertools.repeat(None),
                                                             limits)):
            computed = seq.num_computed_tokens = seq.num_computed_tokens + 1
            kv_version = seq.kv_version
            if kv_version is None or version < kv_version:
                seq.kv_version = kv_version = version
            if bs and computed // bs > seq.num_hashed_blocks:  # a block filled up
                bm.register_full_blocks(seq)
            token_ids = seq.token_ids
            token_ids.append(token)
            if logprobs is not None:  # (None: no row's request asked for any)
                seq.logprobs.append(logprob)
            seq.policy_versions.append(version)
            seq.kv_versions.append(kv_version)
            if tops and i in tops:  # (only the rows whose request asked)
                seq.top_logprobs.append(tops[i])
            if len(token_ids) >= limit or token in stop_tokens_any:  # (else neither a fork nor a stop)
                request = seq.request
                if request.pending_forks and seq.index == 0:
                    self._fork(request, seq)
                # `_stops`, inlined (a call per row costs more than the check that usually ends it)
                stop_tokens, checks_text, max_len = request.stop_rule or stop_rule(request)
                if (token in stop_tokens or checks_text or len(token_ids) >= max_len) and finishes(seq, token):
                    stopped.add(request.request_id)
                    stopped_rows.append(i)
        # (the next decode step's inputs: `ModelRunner._continue_decode`; its batch: `_Batch.without_stopped`; its
        # schedule: `Scheduler._schedule_decodes`)
        self.runner.decoded(tokens, stopped_rows)
        self.scheduler.decoded()
        batch.stopped = stopped_rows
        if stopped or batch.streams:
            for seq in seqs:
                touched[seq.request.request_id] = seq.request
        self.num_generated_tokens += len(seqs)

    def _stop_rows(self, seqs: list[Sequence]) -> tuple[list[int], frozenset[int]]:
        """What `_emit_decode` reads instead of each row's request, for as long as the batch of `seqs` lasts: per row
        the token count below which its request's stop rule (`_stop_rule`) cannot hold but through a stop token, 0
        where it checks stop strings or a fork is pending (a leader's request: it forks when it emits); and the
        union of the rows' stop tokens. A row whose length is below its count and whose token is not in the union
        neither forks nor stops. The counts do not change (the rule is a function of the request's params) and a
        running sequence's request gains no pending fork (only `add_request` sets them, before its first step)."""
        limits: list[int] = []
        stop_tokens_any: set[int] = set()
        for seq in seqs:
            request = seq.request
            stop_tokens, checks_text, max_len = request.stop_rule or self._stop_rule(request)
            stop_tokens_any |= stop_tokens
            limits.append(0 if checks_text or (request.pending_forks and seq.index == 0) else max_len)
        return limits, frozenset(stop_tokens_any)

    def _stops(self, seq: Sequence, token: int) -> bool:
        """After `token` was appended to `seq`: finish it if it stops there (stop token or string, length). The one
        place that decides it, for every emitted token (plain, decode and speculative steps). A token that can stop
        nothing (no stop token, no stop string, below the length cap) skips `_check_stop` / `_length_reached`."""
        request = seq.request
        stop_tokens, checks_text, max_len = request.stop_rule or self._stop_rule(request)
        return (token in stop_tokens or checks_text or len(seq.token_ids) >= max_len) and self._finishes(seq, token)

    def _finishes(self, seq: Sequence, token: int) -> bool:
        """`_stops` past its shortcut: finish `seq` if `_check_stop` or `_length_reached` holds."""
        if self._check_stop(seq, token) or self._length_reached(seq):
            self.scheduler.remove(seq)
            seq.status = SeqStatus.FINISHED
            return True
        return False

    def _stop_rule(self, request: Request) -> tuple[frozenset[int], bool, int]:
        """(tokens that may stop a sample, whether stop strings are checked, the token count at which
        `_length_reached` may hold): a superset of what `_check_stop` and `_length_reached` stop on,
        so a token outside it needs neither. Cached on the request (its params do not change)."""
        params = request.params
        stop_tokens = frozenset(params.stop_token_ids)
        if not params.ignore_eos:
            stop_tokens |= self.eos_token_ids
        max_len = self.max_seq_len
        if params.max_tokens is not None:
            max_len = min(max_len, len(request.prompt_token_ids) + params.max_tokens)
        request.stop_rule = (stop_tokens, bool(params.stop), max_len)
        return request.stop_rule

    def _sample(self, logits: torch.Tensor, batch: _Batch) -> tuple[list[int], list[float] | None]:
        """Plain decoding: one token and its log-prob per sequence (log-probs None when no sequence's request
        asks for any: `SamplingParams(logprobs=None)`). A seeded sequence's uniform comes from
        `token_uniforms(seed, sample index, position)`, computed for the whole batch at once (in a decode step, in
        the sampler's call that picks the tokens where it takes one: `seeded`)."""
        seqs = batch.seqs
        seeded = None  # (a decode step's seeded rows: the sampler draws and picks in one call)
        if batch.seed_base is None:
            def draw() -> list[float]:
                return self.sampler.uniforms([None if s.rng_seed is None else
                                              token_seed(s.rng_seed, s.index, s.num_tokens) for s in seqs])
        else:
            lengths = self.runner.sampled_lengths  # (a decode step's, as an array already)
            if lengths is not None:
                seeded = (batch.seed_base, lengths)

            def draw():
                if self._uniforms_at is None:
                    from rl_engine.kernels import registry

                    self._uniforms_at = registry.resolve("token_uniforms_at", self.runner.device)
                return self._uniforms_at(batch.seed_base, [len(s.token_ids) for s in seqs] if lengths is None
                                         else lengths)
        return self.sampler.sample(logits, batch.params, draw, logprobs=batch.logprobs, uniform=batch.uniform,
                                   seeded=seeded)

    def _top_logprobs(self, logits: torch.Tensor, seqs: list[Sequence]) -> dict[int, list[tuple[int, float]]]:
        """Row -> the params.logprobs most likely (token id, log-prob) pairs, for the rows that ask,
        under the log-prob contract: log_softmax(logits / T) (T = 1 when greedy), before truncation."""
        rows = [i for i, s in enumerate(seqs) if s.request.params.logprobs]
        temps = torch.tensor([seqs[i].request.params.temperature or 1.0 for i in rows], device=logits.device)
        logp = torch.log_softmax(logits[rows].float() / temps[:, None], dim=-1)
        values, ids = logp.topk(max(seqs[i].request.params.logprobs for i in rows), dim=-1)
        values, ids = values.tolist(), ids.tolist()
        return {i: list(zip(ids[r][:seqs[i].request.params.logprobs], values[r][:seqs[i].request.params.logprobs]))
                for r, i in enumerate(rows)}

    def _fork(self, request: Request, leader: Sequence) -> None:
        """The leader's prompt KV exists: the other samples take its full prompt blocks. Where the rest of the
        prompt but its last token lies in a partial block, each sample also keeps its leader (`fork_leader`): when
        the scheduler admits it, it takes a copy of that block if the leader still holds its KV, and computes only
        its last prompt token (for its own logits), a decode row, where it computed the partial block's tokens in
        a prefill (the grpo rollout's second step: ~1,000 tokens for 112 samples, 2x the prompts' own prefill).
        The copy's block is taken at admission, like the prefill's, so a waiting sample holds no more blocks than
        without it. Not with a draft model (its own KV cache) or a hidden-state sink (it sees computed tokens)."""
        shared, partial = divmod(leader.num_prompt_tokens - 1, self.config.block_size)
        copy = (partial > 0 and self.config.fork_copy_partial_block and self.speculator is None
                and self.runner.hidden_sink is None)
        for child in request.pending_forks:
            self.block_manager.share(child, leader, shared)
            if copy:
                child.fork_leader = leader
            if leader.routing is not None:
                child.routing = leader.routing_prefix(shared * self.config.block_size)
        for child in reversed(request.pending_forks):
            self.scheduler.add(child, front=True)
        request.pending_forks = []

    def _check_stop(self, seq: Sequence, token: int) -> bool:
        params = seq.request.params
        if seq.num_output_tokens < params.min_tokens:
            return False
        if token in self.eos_token_ids and not params.ignore_eos:
            seq.finish_reason = "stop"
            return True
        if token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
            return True
        if params.stop:
            return self._check_stop_strings(seq, params)
        return False

    def _check_stop_strings(self, seq: Sequence, params: SamplingParams) -> bool:
        text = self.tokenizer.decode(seq.output_token_ids)
        longest = max(len(s) for s in params.stop)
        start = max(0, seq.text_offset - longest + 1)
        seq.text_offset = len(text)
        hits = [(text.find(s, start), s) for s in params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        i, s = min(hits)
        seq.finish_reason, seq.stop_reason = "stop", s
        seq.text_offset = i + len(s) if params.include_stop_str_in_output else i
        return True

    def _length_reached(self, seq: Sequence) -> bool:
        max_tokens = seq.request.params.max_tokens
        if (max_tokens is not None and seq.num_output_tokens >= max_tokens) or seq.num_tokens >= self.max_seq_len:
            seq.finish_reason = "length"
            return True
        return False

    def _output(self, request: Request) -> RequestOutput:
        params = request.params
        decode = self.tokenizer is not None and params.detokenize
        outs = []
        for seq in request.seqs:
            text = None
            if decode:
                text = self.tokenizer.decode(seq.output_token_ids)
                if isinstance(seq.stop_reason, str):
                    text = text[:seq.text_offset]
            routed = None
            if seq.routing:
                routed = torch.cat([seq.routing[k] for k in sorted(seq.routing)]).tolist()
            outs.append(CompletionOutput(index=seq.index, token_ids=seq.output_token_ids, text=text,
                                         logprobs=None if params.logprobs is None else list(seq.logprobs),
                                         policy_versions=list(seq.policy_versions),
                                         kv_versions=list(seq.kv_versions), finish_reason=seq.finish_reason,
                                         stop_reason=seq.stop_reason, num_preemptions=seq.num_preemptions,
                                         routed_experts=routed,
                                         top_logprobs=list(seq.top_logprobs) if params.logprobs else None,
                                         spec_draft_tokens=seq.spec_draft_tokens,
                                         spec_accepted_tokens=seq.spec_accepted_tokens,
                                         spec_verifies=seq.spec_verifies))
        return RequestOutput(request_id=request.request_id, prompt=request.prompt,
                             prompt_token_ids=list(request.prompt_token_ids), outputs=outs,
                             finished=request.finished, sampling_params=params)

    def stats(self) -> dict:
        bm = self.block_manager
        stats = {"steps": self.num_steps, "generated_tokens": self.num_generated_tokens,
                 "preemptions": self.scheduler.num_preemptions, "num_kv_blocks": bm.num_blocks,
                 "free_kv_blocks": bm.num_free_blocks, "prefix_cache_queries": bm.num_queries,
                 "prefix_cache_hits": bm.num_hits, "graph_runners": self.runner.graphs.num_runners,
                 "weights_version": self.weights_version}
        if self.speculator is not None:  # acceptance rate, mean accepted length, drafts per step, ...
            stats["speculative"] = self.speculator.stats.as_dict(self.num_steps)
        if self.step_threads.choice:  # rows bucket -> the thread count its decode steps run at (StepThreads)
            stats["decode_step_threads"] = {rows: t for (rows, _), t in sorted(self.step_threads.choice.items())}
        if self.config.compile_decode:  # bucket -> seconds of its compiling steps, summed
            stats["decode_compile_s"] = self.runner.compile_seconds()
        return stats
