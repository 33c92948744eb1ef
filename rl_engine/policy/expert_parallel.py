"""Expert-parallel token dispatch: dropless, over all_to_all with uneven splits.

The experts of a layer are split over the ep group (rank r holds experts [r*E_local, (r+1)*E_local)).
Each rank routes its own tokens, sorts the (token, expert) rows by expert id, and sends every row to
the rank owning its expert; no capacity factor, so no token is dropped and the split sizes differ per
rank and step. The counts travel first (a small all_to_all of [ep, E_local] integers), so each rank
knows how many rows it receives per source and local expert; the rows come back the same way after
the experts ran. Both all_to_alls are differentiable (backward is the reverse all_to_all).
"""

from __future__ import annotations

from typing import Callable

import torch

from rl_engine.policy import comm


def dispatch_compute_combine(
    rows: torch.Tensor,
    counts: torch.Tensor,
    run_local_experts: Callable[[torch.Tensor, list[int]], torch.Tensor],
    *,
    num_local_experts: int,
    group,
) -> torch.Tensor:
    """rows [N, H] sorted by global expert id with `counts` [E] rows per expert -> expert outputs
    [N, H] in the same order, computed by the ranks owning the experts."""
    ep = counts.shape[0] // num_local_experts
    send_counts = counts.view(ep, num_local_experts)  # [dest rank, its local expert]
    recv_counts = comm.all_to_all_counts(send_counts, group)  # [source rank, my local expert]
    in_splits = send_counts.sum(1).tolist()
    out_splits = recv_counts.sum(1).tolist()
    received = comm.all_to_all(rows, out_splits=out_splits, in_splits=in_splits, group=group)
    # Received rows are ordered (source, local expert): regroup them by local expert.
    local_ids = torch.arange(num_local_experts, device=rows.device).repeat(ep)
    row_expert = torch.repeat_interleave(local_ids, recv_counts.reshape(-1))
    by_expert = torch.argsort(row_expert, stable=True)
    out = run_local_experts(received[by_expert], recv_counts.sum(0).tolist())
    back = out[torch.argsort(by_expert)]
    return comm.all_to_all(back, out_splits=in_splits, in_splits=out_splits, group=group)
