"""Context parallelism: the tokens of each packed micro-batch split over the cp group, attention
between the shards by a ring of point-to-point K/V sends (or one all-gather of K/V per layer).

Split (Megatron's load balancing for causal attention): a sequence of L tokens is cut into 2*cp
chunks and cp rank r holds chunks r and 2*cp-1-r, so each rank gets about the same share of the
causal attention work. The chunk sizes differ by at most one token instead of padding the sequence
to a multiple of 2*cp: every rank knows every rank's layout (all of them hold the whole micro-batch's
`cu_seqlens`), so the ring sends buffers of known, unequal sizes, and no padded token exists to be
masked out of attention, of MoE routing or of the loss.
Dynamic CP (`min_tokens` > 0): a sequence shorter than `min_tokens` is not split; it goes whole to
the rank holding the fewest tokens so far (longest first) and attends locally, so only the long
sequences pay ring communication. Every split is exact, so the loss does not depend on the choice.

Ring attention (per layer, forward and backward in one autograd Function): step s, rank r holds the
ring tokens' K/V of rank (r - s) mod cp, attends its queries to them where the causal mask of each
packed sequence allows (whole chunks: visible, invisible, or the diagonal chunk with a causal mask),
and merges the partial outputs by their log-sum-exp. Backward replays the ring: each block's dq is
kept, its dk/dv travel with the K/V and arrive home after cp sends. Positions (RoPE) are the tokens'
global positions (indexed from the micro-batch). Log-probs and entropy are computed on the local
tokens and all-gathered ([T] fp32 each, differentiable) so the loss function sees the whole
micro-batch as in a single process: sequence-level losses (GSPO, sequence-mean aggregation) and the
global normalisers are unchanged, and each rank's backward keeps the gradient of its own tokens.

Block attention on CPU runs torch's fused flash kernel (it returns the log-sum-exp the merge needs,
and its backward takes the merged output and log-sum-exp); other devices take an unfused math path
(correct, O(block^2) memory; unverified on GPU, where TransformerEngine / flash-attn would go).
"""

from __future__ import annotations

import dataclasses
import heapq
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rl_engine.policy import comm

CP_COMMS = ("ring", "allgather")


@dataclass(frozen=True)
class Block:
    """Queries rows [q0, q1) of this rank attend to key rows [k0, k1) of one source buffer."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool  # the diagonal chunk (q and k the same tokens): causal; otherwise fully visible


class CPPlan:
    """How one micro-batch's tokens are split over the cp ranks (pure: every rank computes the same
    plan from `cu_seqlens`). `rows[r]` [T_r] are the micro-batch's token indices rank r holds, its
    ring tokens first (`ring_rows[r]` of them) then its whole sequences."""

    def __init__(self, cu_seqlens: torch.Tensor | list[int], *, cp: int, min_tokens: int = 0) -> None:
        if cp < 1:
            raise ValueError(f"cp must be >= 1, got {cp}")
        if min_tokens < 0:
            raise ValueError(f"cp_min_tokens must be >= 0, got {min_tokens}")
        bounds = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
        self.cp, self.num_tokens = cp, bounds[-1]
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        ring = [i for i, n in enumerate(lengths) if n > 0 and (min_tokens == 0 or n >= min_tokens)]
        whole = [i for i, n in enumerate(lengths) if n > 0 and i not in set(ring)]
        n_chunks = 2 * cp
        # chunk c of ring sequence i covers tokens [chunks[i][c], chunks[i][c + 1]) of the sequence
        self.chunks: dict[int, list[int]] = {}
        turn = 0  # the remainder tokens go round the ranks across sequences (front chunks first)
        for i in ring:
            base, extra = divmod(lengths[i], n_chunks)
            sizes = [base] * n_chunks
            for e in range(extra):
                r = (turn + e) % cp
                sizes[r if e < cp else n_chunks - 1 - r] += 1
            turn += extra
            edges = [0]
            for n in sizes:
                edges.append(edges[-1] + n)
            self.chunks[i] = edges
        self.ring_seqs = ring
        per_rank: list[list[int]] = [[] for _ in range(cp)]
        # ring_offsets[r][j]: row of rank r where ring sequence j's front chunk starts
        self.ring_offsets: list[list[int]] = [[] for _ in range(cp)]
        for r in range(cp):
            for i in ring:
                self.ring_offsets[r].append(len(per_rank[r]))
                e = self.chunks[i]
                for c in (r, n_chunks - 1 - r):
                    per_rank[r].extend(range(bounds[i] + e[c], bounds[i] + e[c + 1]))
        self.ring_rows = [len(p) for p in per_rank]
        # Dynamic CP: whole sequences to the least loaded rank, longest first (ties: lower rank, then
        # the earlier sequence), like the data-parallel packing.
        self.whole: list[list[tuple[int, int]]] = [[] for _ in range(cp)]  # (first row, length)
        heap = [(self.ring_rows[r], r) for r in range(cp)]
        heapq.heapify(heap)
        for i in sorted(whole, key=lambda i: (-lengths[i], i)):
            load, r = heapq.heappop(heap)
            self.whole[r].append((len(per_rank[r]), lengths[i]))
            per_rank[r].extend(range(bounds[i], bounds[i + 1]))
            heapq.heappush(heap, (load + lengths[i], r))
        self.rows = [torch.tensor(p, dtype=torch.int64) for p in per_rank]
        self.counts = [len(p) for p in per_rank]

    def front_back(self, r: int, j: int) -> tuple[int, int, int]:
        """Rows of ring sequence j on rank r: (start, end of its chunk r, end of its chunk 2cp-1-r)."""
        e = self.chunks[self.ring_seqs[j]]
        start = self.ring_offsets[r][j]
        mid = start + e[r + 1] - e[r]
        return start, mid, mid + e[2 * self.cp - r] - e[2 * self.cp - 1 - r]

    def blocks(self, r: int, src: int) -> list[Block]:
        """What rank r's queries attend to in rank src's K/V (its ring rows; at src == r all local rows)."""
        out = []
        for j in range(len(self.ring_seqs)):
            qa, qm, qb = self.front_back(r, j)
            ka, km, kb = self.front_back(src, j)
            if src == r:  # chunk r: causal on itself; chunk 2cp-1-r: sees chunk r, causal on itself
                cand = [Block(qa, qm, ka, km, True), Block(qm, qb, ka, km, False), Block(qm, qb, km, kb, True)]
            elif src < r:  # chunk src precedes both of ours; chunk 2cp-1-src follows both
                cand = [Block(qa, qb, ka, km, False)]
            else:  # chunks src and 2cp-1-src both lie between our chunk r and chunk 2cp-1-r
                cand = [Block(qm, qb, ka, kb, False)]
            out += [b for b in cand if b.q1 > b.q0 and b.k1 > b.k0]
        if src == r:
            out += [Block(a, a + n, a, a + n, True) for a, n in self.whole[r]]
        return out


# ---- block attention: (out, lse) and its backward -----------------------------------------------
def _block_forward(q, k, v, *, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Lq, H, D], k/v [Lk, H, D] -> out [Lq, H, D] (q's dtype), lse [Lq, H] fp32."""
    q4, k4, v4 = (x.transpose(0, 1)[None] for x in (q, k, v))
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q4, k4, v4, 0.0, causal,
                                                                              scale=scale)[:2]
    else:  # unfused math path (see the module docstring)
        s = (q4.float() @ k4.float().transpose(-1, -2)) * scale
        if causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        out = (torch.exp(s - lse[..., None]) @ v4.float()).to(q.dtype)
    return out[0].transpose(0, 1), lse[0].transpose(0, 1).float()


def _block_backward(dout, q, k, v, out, lse, *, causal: bool, scale: float):
    """Gradients (dq, dk, dv) of one block given the MERGED out and lse of the query rows (then the
    block's softmax probabilities are exp(s - lse), its share of the full softmax)."""
    q4, k4, v4, o4, d4 = (x.transpose(0, 1)[None] for x in (q, k, v, out, dout))
    lse4 = lse.transpose(0, 1)[None].contiguous()
    if q.device.type == "cpu":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            d4.contiguous(), q4.contiguous(), k4.contiguous(), v4.contiguous(), o4.contiguous(),
            lse4, 0.0, causal, scale=scale)  # lse stays fp32, as the forward kernel returns it
    else:
        qf, kf, vf, of, df = (x.float() for x in (q4, k4, v4, o4, d4))
        s = (qf @ kf.transpose(-1, -2)) * scale
        if causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        p = torch.exp(s - lse4[..., None])
        dv = p.transpose(-1, -2) @ df
        dp = df @ vf.transpose(-1, -2)
        ds = p * (dp - (df * of).sum(-1, keepdim=True))
        dq, dk = (ds @ kf) * scale, (ds.transpose(-1, -2) @ qf) * scale
    return tuple(x[0].transpose(0, 1) for x in (dq, dk, dv))


def _expand(x: torch.Tensor, group: int) -> torch.Tensor:
    """[L, Hkv, D] -> [L, Hkv * group, D]: query head h reads KV head h // group (GQA)."""
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _fold(dx: torch.Tensor, group: int) -> torch.Tensor:
    """Inverse of `_expand` for gradients: sum the query heads sharing a KV head."""
    return dx if group == 1 else dx.view(dx.shape[0], -1, group, dx.shape[-1]).sum(2)


def _merge(out, lse, rows: slice, o_blk, lse_blk) -> None:
    """Online-softmax merge of a block's (o, lse) into the accumulators (in place, fp32)."""
    old = lse[rows]
    new = torch.logaddexp(old, lse_blk)
    out[rows] = out[rows] * torch.exp(old - new)[..., None] + o_blk.float() * torch.exp(lse_blk - new)[..., None]
    lse[rows] = new


class _Exchange:
    """Point-to-point ring shifts over the cp group: send to rank r+1, receive from rank r-1 (plain
    isend / irecv: gloo has no batched p2p launch). Sizes are known from the plan on both sides, and an
    empty buffer is not sent."""

    def __init__(self, group, ranks: tuple[int, ...], rank: int) -> None:
        self.group, self.cp = group, len(ranks)
        self.next, self.prev = ranks[(rank + 1) % self.cp], ranks[(rank - 1) % self.cp]

    def start(self, x: torch.Tensor, recv_rows: int, *, tag: int):
        works = []
        if x.shape[0]:
            works.append(comm.isend(x.contiguous(), self.next, tag=tag, group=self.group, kind="cp_ring"))
        buf = x.new_empty((recv_rows, *x.shape[1:]))
        if recv_rows:
            works.append(comm.irecv(buf, self.prev, tag=tag, group=self.group))
        return buf, works

    @staticmethod
    def finish(works) -> None:
        for w in works:
            w.wait()


_TAG_KV, _TAG_DKV = 11, 12


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: CPPlan, rank: int, exchange: _Exchange | None, scale: float, gathered: bool):
        T, H, D = q.shape
        group = H // k.shape[1]
        cp = plan.cp
        out = torch.zeros(T, H, v.shape[-1], dtype=torch.float32, device=q.device)
        lse = torch.full((T, H), float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.cat([k, v], dim=1)  # [T, 2 Hkv, D]: one message per step
        sources = _gather_ring_kv(kv, plan, rank, exchange) if gathered else None
        ring = bool(plan.ring_seqs) and cp > 1
        cur = kv
        for step in range(cp):
            src = (rank - step) % cp
            shift = not gathered and ring and step + 1 < cp
            if shift:  # start the next K/V on its way, then compute with the current one
                nxt, works = exchange.start(cur[:plan.ring_rows[src]], plan.ring_rows[(src - 1) % cp], tag=_TAG_KV)
            buf = cur if not gathered or step == 0 else sources[src]
            for b in plan.blocks(rank, src):
                kb, vb = buf[b.k0:b.k1].split(k.shape[1], dim=1)
                o_blk, lse_blk = _block_forward(q[b.q0:b.q1], _expand(kb, group), _expand(vb, group),
                                                causal=b.causal, scale=scale)
                _merge(out, lse, slice(b.q0, b.q1), o_blk, lse_blk)
            if shift:
                _Exchange.finish(works)
                cur = nxt
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.rank, ctx.exchange, ctx.scale, ctx.gathered = plan, rank, exchange, scale, gathered
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        plan, rank, exchange, scale, gathered = ctx.plan, ctx.rank, ctx.exchange, ctx.scale, ctx.gathered
        cp, hkv = plan.cp, k.shape[1]
        group = q.shape[1] // hkv
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.cat([k, v], dim=1)
        local_dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
        ring = bool(plan.ring_seqs) and cp > 1
        if gathered:
            sources = _gather_ring_kv(kv, plan, rank, exchange)
            width = max(plan.ring_rows)
            all_dkv = torch.zeros((cp, width, *kv.shape[1:]), dtype=torch.float32, device=q.device)
        cur, dcur = kv, local_dkv
        for step in range(cp):
            src = (rank - step) % cp
            works = []
            if not gathered and ring and step + 1 < cp:  # K/V of the next step on its way
                nxt, works = exchange.start(cur[:plan.ring_rows[src]], plan.ring_rows[(src - 1) % cp], tag=_TAG_KV)
            buf = cur if not gathered or step == 0 else sources[src]
            dbuf = dcur if not gathered or step == 0 else all_dkv[src]
            for b in plan.blocks(rank, src):
                kb, vb = buf[b.k0:b.k1].split(hkv, dim=1)
                rows = slice(b.q0, b.q1)
                dq_b, dk_b, dv_b = _block_backward(dout[rows], q[rows], _expand(kb, group), _expand(vb, group),
                                                   out[rows], lse[rows], causal=b.causal, scale=scale)
                dq[rows] += dq_b.float()
                dbuf[b.k0:b.k1, :hkv] += _fold(dk_b.float(), group)
                dbuf[b.k0:b.k1, hkv:] += _fold(dv_b.float(), group)
            if not gathered and ring:
                _Exchange.finish(works)
                # the dk/dv of src's tokens move on with them; after cp shifts they are home
                dnext, dworks = exchange.start(dcur[:plan.ring_rows[src]], plan.ring_rows[(src - 1) % cp],
                                               tag=_TAG_DKV)
                _Exchange.finish(dworks)
                if step + 1 < cp:
                    cur = nxt
                    dcur = dnext
                else:
                    local_dkv[:plan.ring_rows[rank]] = dnext
        if gathered and ring:
            all_dkv[rank, :plan.ring_rows[rank]] += local_dkv[:plan.ring_rows[rank]]
            mine = torch.empty((width, *kv.shape[1:]), dtype=torch.float32, device=q.device)
            comm.reduce_scatter_into(mine.view(-1), all_dkv.view(-1), exchange.group, kind="cp_reduce_scatter")
            local_dkv[:plan.ring_rows[rank]] = mine[:plan.ring_rows[rank]]
        dk, dv = local_dkv.split(hkv, dim=1)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def _gather_ring_kv(kv: torch.Tensor, plan: CPPlan, rank: int, exchange: _Exchange) -> list[torch.Tensor]:
    """All-gather variant: every rank's ring K/V rows (padded to the longest for the collective)."""
    width = max(plan.ring_rows)
    if plan.cp == 1 or not plan.ring_seqs or width == 0:
        return [kv[:0]] * plan.cp
    mine = kv.new_zeros((width, *kv.shape[1:]))
    mine[:plan.ring_rows[rank]] = kv[:plan.ring_rows[rank]]
    out = kv.new_empty((plan.cp * width, *kv.shape[1:]))
    comm.all_gather_into(out.view(-1), mine.view(-1), exchange.group, kind="cp_all_gather")
    return [out[r * width:r * width + plan.ring_rows[r]] for r in range(plan.cp)]


class CPAttention:
    """The model's `attn_context` for one micro-batch on one cp rank (training): causal attention of
    this rank's tokens over the whole micro-batch, through the ring or an all-gather of K/V."""

    def __init__(self, plan: CPPlan, *, rank: int, group, ranks: tuple[int, ...], comm_mode: str = "ring") -> None:
        if comm_mode not in CP_COMMS:
            raise ValueError(f"cp_comm must be one of {CP_COMMS}, got {comm_mode!r}")
        self.plan, self.rank, self.comm_mode = plan, rank, comm_mode
        self.exchange = _Exchange(group, ranks, rank) if plan.cp > 1 else None

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float) -> torch.Tensor:
        return _RingAttention.apply(q, k, v, self.plan, self.rank, self.exchange, scale, self.comm_mode == "allgather")

    def attend_latent(self, *args, **kwargs):
        raise ValueError("context parallelism does not support multi-head latent attention (MLA) yet; use cp=1")


class _GatherTokens(torch.autograd.Function):
    """x [T_local, ...] on each cp rank -> [T, ...] in the micro-batch's token order; backward keeps
    this rank's rows of the (identical on every rank) gradient."""

    @staticmethod
    def forward(ctx, x, plan: CPPlan, rank: int, group):
        ctx.plan, ctx.rank = plan, rank
        width = max(plan.counts)
        mine = x.new_zeros((width, *x.shape[1:]))
        mine[:x.shape[0]] = x
        gathered = x.new_empty((plan.cp * width, *x.shape[1:]))
        comm.all_gather_into(gathered.view(-1), mine.view(-1), group)
        full = x.new_empty((plan.num_tokens, *x.shape[1:]))
        for r in range(plan.cp):
            full[plan.rows[r]] = gathered[r * width:r * width + plan.counts[r]]
        return full

    @staticmethod
    def backward(ctx, g):
        return g[ctx.plan.rows[ctx.rank]], None, None, None


def gather_tokens(x: torch.Tensor, plan: CPPlan, *, rank: int, group) -> torch.Tensor:
    return x if plan.cp == 1 else _GatherTokens.apply(x.contiguous(), plan, rank, group)


def check_cp_options(config, *, cp: int, cp_comm: str, cp_min_tokens: int) -> None:
    """Validate the context-parallel settings against a `ModelConfig`; errors name the values."""
    if cp_comm not in CP_COMMS:
        raise ValueError(f"cp_comm must be one of {CP_COMMS}, got {cp_comm!r}")
    if not isinstance(cp_min_tokens, int) or cp_min_tokens < 0:
        raise ValueError(f"cp_min_tokens must be an integer >= 0 (0: every sequence through the ring), "
                         f"got {cp_min_tokens!r}")
    if cp > 1 and config.is_mla:
        raise ValueError(f"cp ({cp}) > 1 does not support multi-head latent attention ({config.model_type!r}) "
                         "yet; use cp=1")


class CPShard:
    """One cp rank's part of a packed micro-batch: its tokens' ids, global positions and targets,
    the attention context joining it to the other ranks, and the gather back to the whole batch."""

    def __init__(self, input_ids: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor,
                 targets: torch.Tensor | None, groups, *, comm_mode: str = "ring", min_tokens: int = 0) -> None:
        g = groups
        self.plan = CPPlan(cu_seqlens, cp=g.cp_size, min_tokens=min_tokens)
        self.rank, self.group = g.cp_rank, g.cp_group
        rows = self.plan.rows[g.cp_rank]
        self.rows = rows
        self.input_ids, self.positions = input_ids[rows], positions[rows]
        self.targets = None if targets is None else targets[rows]
        self.attention = CPAttention(self.plan, rank=g.cp_rank, group=g.cp_group, ranks=g.cp_ranks,
                                     comm_mode=comm_mode)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows [T_local, ...] -> the micro-batch's [T, ...] (differentiable)."""
        return gather_tokens(x, self.plan, rank=self.rank, group=self.group)

    def local_micro_batch(self, mb):
        """`mb` restricted to this rank's tokens (for per-token functions of the last stage)."""
        T = mb.num_tokens
        rows = self.rows
        return dataclasses.replace(
            mb, input_ids=self.input_ids, positions=self.positions, targets=self.targets,
            cu_seqlens=torch.tensor([0, rows.numel()], dtype=torch.int32),
            loss_inputs={k: v[rows] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == T else v
                         for k, v in mb.loss_inputs.items()})
