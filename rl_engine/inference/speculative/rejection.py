"""Exact rejection sampling of draft tokens against the target distribution.

For drafts x_1..x_d drawn from q and the target's distributions p_1..p_{d+1} (the distribution the
plain sampler would draw from: temperature, then top-k / top-p / min-p), draft x_j is accepted with
probability min(1, p_j(x_j) / q_j(x_j)); at the first rejection the token is drawn from
normalise(max(0, p_j - q_j)) and the rest is dropped; when all d are accepted a bonus token is drawn
from p_{d+1}. Every emitted token is then distributed exactly as under plain decoding.

Two cases share this module:
- point-mass drafts (n-gram lookup, and greedy rows of any method): accept x_j with probability
  p_j(x_j), else draw from p_j with x_j removed. Drawing y_j from p_j with the *plain* decoding uniform
  of that position and accepting iff y_j == x_j realises exactly this, and emits y at every position,
  so the output is the one plain decoding produces with the same seed (greedy: the argmax).
- drafts sampled from a draft model's q: the textbook test above, with its own uniforms.

Randomness and what "same seed -> same output" means here: every uniform comes from (request seed,
sample index, token position, purpose) through `token_seed`; unseeded requests draw from the engine's
seeded generator instead (reproducible for the same engine seed and request stream).
- n-gram and greedy: the output is plain decoding's, token for token, whatever the batch, budget,
  preemption or k.
- draft model, sampled: a position's outcome is a function of the seed, the position and the drafts
  verified there, and drafts depend only on the sequence's own tokens; so the same seed gives the same
  output whatever the other requests, unless a binding token budget, a full KV pool or a preemption
  trims this sequence's drafts in some step: that changes which sample is drawn, never its
  distribution. It is not plain decoding's sample for the same seed (the distribution is the same).
"""

from __future__ import annotations

import torch

from rl_engine.inference.sampler import inverse_cdf, token_seed

# Purposes of a uniform at one position, besides the plain sampler's own (the token_seed itself).
DRAFT, ACCEPT, RESIDUAL = 1, 2, 3


def purpose_seed(seed: int | None, index: int, position: int, purpose: int) -> int | None:
    """A token seed for `purpose` at (sample index, position), independent of the plain one."""
    if seed is None:
        return None
    return token_seed(token_seed(seed, index, position), purpose, 0)


def accept_point_mass(drafts: list[int], samples: list[int]) -> int:
    """Number of leading drafts equal to the target's samples at their positions."""
    a = 0
    while a < len(drafts) and drafts[a] == samples[a]:
        a += 1
    return a


def accept_mask(target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: torch.Tensor,
                uniforms: list[float]) -> list[bool]:
    """Per draft row: accepted with probability min(1, p(x) / q(x)), i.e. u * q(x) < p(x).
    target_probs, draft_probs [D, V]; draft_tokens [D] long."""
    x = draft_tokens[:, None]
    p_x = target_probs.gather(1, x).squeeze(1)
    q_x = draft_probs.gather(1, x).squeeze(1)
    u = torch.tensor(uniforms, dtype=p_x.dtype, device=p_x.device)
    return (u * q_x < p_x).tolist()


def residual_sample(target_probs: torch.Tensor, draft_probs: torch.Tensor, uniforms: list[float]) -> list[int]:
    """One token per row from normalise(max(0, p - q)) ([m, V] each). A row whose residual has no
    mass (p == q up to rounding, where rejection has probability 0) falls back to p."""
    residual = (target_probs - draft_probs).clamp_(min=0.0)
    empty = residual.sum(dim=-1) <= 0
    if bool(empty.any()):
        residual[empty] = target_probs[empty]
    return inverse_cdf(residual, uniforms).tolist()
