"""Shared-prefix packing: the samples of a GRPO group that share their prompt become one unit.

A sample's model input is prompt + response[:-1] (L = P + R - 1 tokens); row t predicts token t + 1.
A unit of k samples with the same prompt holds the prompt's first P - 1 tokens once (the shared
segment: its rows predict prompt tokens, masked out of the loss) and, per sample, the segment
input[P - 1:] (R tokens: the prompt's last token, whose row predicts that sample's first response
token, then the response) at positions P - 1 onward, attending to the shared segment in full and to
itself causally (`rl_engine.policy.shared_prefix.SharedPrefixAttention`). A unit has
(P - 1) + sum(R_i) tokens where the unshared samples have sum(P + R_i - 1): token budgets count the
prompt once.

Units are what micro-batches and data-parallel ranks are packed from (`plan_micro_batches` over
unit lengths), so a group stays whole in one micro-batch when it fits the budget. A group too long
for one micro-batch is split into several units, each holding the prompt again; so is a group when
there are fewer units than data-parallel ranks (every rank gets work, as with unshared samples).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rl_engine.policy.shared_prefix import SharedPrefixAttention
from rl_engine.rollout.packing import TokenList, concat_values, plan_micro_batches


@dataclass(frozen=True)
class PrefixUnit:
    """Samples packed together: `prefix_len` > 0 shares their first `prefix_len` input tokens."""

    samples: tuple[int, ...]
    prefix_len: int
    length: int  # tokens the unit takes in a micro-batch


def find_units(token_ids: Sequence[TokenList], prompt_lens: Sequence[int], group_ids: Sequence[int], *,
               min_group: int, budget: int, dp_size: int = 1) -> list[PrefixUnit]:
    """Units over the samples (in order of first sample). Samples share when they have the same group,
    prompt length and prompt tokens, at least `min_group` of them do (1: even a lone sample gets the
    shared layout) and the prompt has at least 2 tokens (a shared segment of >= 1 token)."""
    lengths = [len(t) for t in token_ids]
    buckets: dict[tuple, list[int]] = {}
    for i, (tokens, p, g) in enumerate(zip(token_ids, prompt_lens, group_ids)):
        if not 1 <= p <= lengths[i]:
            raise ValueError(f"sample {i}: prompt_len {p} must be in [1, {lengths[i]}] (its input tokens)")
        if lengths[i] > budget:  # as plan_micro_batches says it, naming the sample rather than its unit
            raise ValueError(f"sample {i} has {lengths[i]} tokens, more than max_tokens_per_micro_batch ({budget}); "
                             f"raise the budget to at least {lengths[i]} or cap the prompt + response length")
        prefix = tuple(tokens[:p - 1]) if isinstance(tokens, list) else tuple(int(x) for x in tokens[:p - 1])
        buckets.setdefault((int(g), p, prefix), []).append(i)
    units: list[PrefixUnit] = []
    for (_, p, _), members in buckets.items():
        if p < 2 or len(members) < min_group:
            units += [PrefixUnit(samples=(i,), prefix_len=0, length=lengths[i]) for i in members]
            continue
        units += _split_to_budget(members, p - 1, lengths, budget)
    while len(units) < dp_size:  # halve the largest shared unit so that every dp rank gets work
        splittable = [u for u in units if len(u.samples) > 1]
        if not splittable:
            break
        big = max(splittable, key=lambda u: u.length)
        half = len(big.samples) // 2
        index = units.index(big)
        units[index:index + 1] = [_unit(big.samples[:half], big.prefix_len, lengths),
                                  _unit(big.samples[half:], big.prefix_len, lengths)]
    units.sort(key=lambda u: u.samples[0])
    return units


def _unit(samples: Sequence[int], prefix_len: int, lengths: Sequence[int]) -> PrefixUnit:
    return PrefixUnit(samples=tuple(samples), prefix_len=prefix_len,
                      length=prefix_len + sum(lengths[i] - prefix_len for i in samples))


def _split_to_budget(members: list[int], prefix_len: int, lengths: Sequence[int], budget: int) -> list[PrefixUnit]:
    """Consecutive runs of `members` whose shared length fits `budget` (each sample fits it alone)."""
    out: list[list[int]] = [[]]
    load = prefix_len
    for i in members:
        extra = lengths[i] - prefix_len
        if out[-1] and load + extra > budget:
            out.append([])
            load = prefix_len
        out[-1].append(i)
        load += extra
    return [_unit(run, prefix_len, lengths) for run in out]


def plan_units(units: Sequence[PrefixUnit], *, max_tokens_per_micro_batch: int, dp_size: int) -> list[list[list[int]]]:
    """[rank][micro-batch] -> indices into `units` (the packing plan of the units' lengths)."""
    plan = plan_micro_batches([u.length for u in units], max_tokens_per_micro_batch=max_tokens_per_micro_batch,
                              dp_size=dp_size)
    return plan.micro_batches


@dataclass(kw_only=True)
class SharedPrefixBatch:
    """One micro-batch in the shared-prefix layout: flat [T] tensors, segment bounds, the attention
    context, and `segments[s] = (sample, start, end)`: segment s holds that sample's input rows
    [start, end) (a shared segment names its unit's first sample)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    segments: list[tuple[int, int, int]]
    attention: SharedPrefixAttention
    values: dict[str, torch.Tensor]


def build_shared_prefix_batch(units: Sequence[PrefixUnit], *, token_ids: Sequence[TokenList],
                              per_token: dict[str, Sequence[TokenList]], per_sample: dict[str, torch.Tensor],
                              dtypes: Mapping[str, torch.dtype] | None = None) -> SharedPrefixBatch:
    """Flatten `units`: first every prefix-free segment (shared prompts, unshared samples), then the
    completions of the shared units. per_token[name][i] is aligned with token_ids[i]; per_sample[name][i]
    is broadcast to the sample's rows (a shared segment takes its unit's first sample's values).
    `dtypes[name]`: per_token[name]'s values in that dtype (`concat_values`)."""
    self_segments: list[tuple[int, int, int]] = []
    completions: list[tuple[int, int, int, int]] = []  # (sample, start, end, index of its prefix segment)
    for u in units:
        if u.prefix_len == 0:
            (i,) = u.samples
            self_segments.append((i, 0, len(token_ids[i])))
            continue
        prefix_segment = len(self_segments)
        self_segments.append((u.samples[0], 0, u.prefix_len))
        completions += [(i, u.prefix_len, len(token_ids[i]), prefix_segment) for i in u.samples]
    segments = self_segments + [(i, a, b) for i, a, b, _ in completions]
    prefix_of = torch.tensor([-1] * len(self_segments) + [p for *_, p in completions], dtype=torch.int64)
    lengths = torch.tensor([b - a for _, a, b in segments], dtype=torch.int64)
    cu_seqlens = torch.zeros(len(segments) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(lengths, 0)

    def gather(lists: Sequence[TokenList], dtype: torch.dtype | None) -> torch.Tensor:
        return concat_values([lists[i][a:b] if isinstance(lists[i], list)
                              else torch.as_tensor(lists[i]).reshape(-1)[a:b] for i, a, b in segments], dtype=dtype)

    samples = list(dict.fromkeys(i for i, _, _ in segments))  # (a unit's first sample has two segments)
    for name, lists in per_token.items():
        for i in samples:
            if len(lists[i]) != len(token_ids[i]):
                raise ValueError(f"per_token[{name!r}] of sample {i} has {len(lists[i])} values but the sample "
                                 f"has {len(token_ids[i])} tokens")
    values = {name: gather(lists, (dtypes or {}).get(name)) for name, lists in per_token.items()}
    # Broadcasts to rows in numpy: torch.repeat_interleave starts its thread pool for these few-kB outputs.
    owner = np.array([i for i, _, _ in segments], dtype=np.int64)
    repeats = lengths.numpy()
    for name, sample_values in per_sample.items():
        values[name] = torch.from_numpy(np.repeat(torch.as_tensor(sample_values).detach().numpy()[owner], repeats))
    starts = np.array([a for _, a, _ in segments], dtype=np.int64)  # each segment's first position
    row_starts = cu_seqlens[:-1].numpy().astype(np.int64)
    positions = torch.from_numpy(np.arange(int(cu_seqlens[-1]), dtype=np.int64) + np.repeat(starts - row_starts, repeats))
    return SharedPrefixBatch(input_ids=gather(token_ids, torch.int64), positions=positions, cu_seqlens=cu_seqlens,
                             segments=segments, attention=SharedPrefixAttention(cu_seqlens, prefix_of), values=values)
