"""Shared-prefix attention for the training forward (Prefix Grouper, arXiv 2506.05433).

The `n` completions of a GRPO group share their prompt. A shared-prefix micro-batch holds the
prompt once, as its own segment, and each completion as a segment that attends to the prompt's
keys and values in full and to its own tokens causally. Every layer then computes the prompt's
hidden states, K and V once per group instead of once per completion; autograd sums the prompt
K/V gradients of the n completions, which is the unshared gradient. Forward outputs and
gradients equal the unshared computation up to rounding (tests/policy/test_shared_prefix*.py).

`SharedPrefixAttention` is the model's attention context (`AttentionContext` in model.py): it is
handed to `CausalLM.hidden_states(attn_context=...)` in place of `cu_seqlens`, gets each layer's
post-rotary q, k, v of the flat batch and returns the attention output. Layout contract (made by
`rl_engine.rollout.shared_prefix`): the segments without a prefix (shared prompts, unshared
samples) come first, then the completions; a completion's positions continue from its prompt.

Attention: on CPU in fp32 and bf16, where the C++ kernels build, the registry's `shared_prefix_attention` (the C++
packed attention, kernels/cpu/varlen_attention.py) takes the whole layout in one call, forward and backward,
the packed rows in place (grpo_step's training pass, tiny preset, 16 x 8 x 64, in-process A/B at 2 threads:
0.159 -> 0.116 s). Elsewhere (other dtypes, other devices, no compiler) the torch path below: the self
segments go through the registry's `varlen_causal_attention` (the unshared
path's kernel); each completion's queries attend to [its prompt's keys | its own keys] under a mask
(prompt: all, own: causal), all completions in one padded SDPA call while that stays small and
dense, else one call per completion. That costs n * C * (P + C) score entries against the unshared
n * (P + C)^2 / 2. In the padded call a GQA group's query heads lie along the query axis
([B, Hkv, G * Lc, D] against [B, Hkv, Lp + Lc, D]), so K/V heads are not repeated (nor their gradients
summed back): one such SDPA call alone, 128 completions of 64 tokens after 13-token prompts, 4 query / 2
KV heads of 16 dims, 2 threads, forward + backward 22.2 -> 19.2 ms (outputs bit-equal). When every
completion of the micro-batch has the same length (fixed-length rollouts), padding them is a view. With
both, grpo_step.py's fixed-length training pass (tiny preset, 16 x 8 samples) went 0.142 -> 0.138 s (median
of 13, old and new interleaved in one process, through the team's measuring lock); EOS-varied unchanged. The torch path runs on every device; no fused CUDA kernel with per-segment key
ranges is wired (not run on a GPU here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rl_engine import kernels


# The padded path's [B, Lc, Lp + Lc] score entries at most (its boolean mask is materialised), and at
# most this multiple of the entries the completions really need: past either, one SDPA call per completion.
_PADDED_MAX_ENTRIES = 1 << 24
_PADDED_MAX_WASTE = 2


class SharedPrefixAttention:
    """Attention over packed segments where segment s attends fully to segment `prefix_of[s]`
    (-1: none) and causally to itself.

    cu_seqlens: [S + 1] int32 segment bounds over the T tokens; prefix_of: [S] int64. Segments with
    a prefix must all come after the segments without one, and a prefix must itself have none.
    `padded`: force the completions' path (None: chosen by size, see `attend`)."""

    def __init__(self, cu_seqlens: torch.Tensor, prefix_of: torch.Tensor, *, padded: bool | None = None) -> None:
        bounds = [int(b) for b in cu_seqlens.tolist()]
        prefix = [int(p) for p in prefix_of.tolist()]
        S = len(bounds) - 1
        if cu_seqlens.dim() != 1 or S < 1 or bounds[0] != 0 or any(b > e for b, e in zip(bounds, bounds[1:])):
            raise ValueError(f"cu_seqlens must be 1-D, non-decreasing and start at 0; got {bounds}")
        if len(prefix) != S:
            raise ValueError(f"prefix_of has {len(prefix)} entries for {S} segments")
        num_self = next((s for s, p in enumerate(prefix) if p >= 0), S)
        for s, p in enumerate(prefix):
            if s < num_self:
                continue
            if p < 0:
                raise ValueError(f"segment {s} has no prefix but comes after a completion segment; the segments "
                                 "without a prefix must come first")
            if p >= num_self:
                raise ValueError(f"segment {s} names segment {p} as its prefix, which is not a prefix-free segment")
            if bounds[s + 1] == bounds[s]:
                raise ValueError(f"completion segment {s} is empty")
        self.num_tokens = bounds[-1]
        self._cu_seqlens, self._prefix_of = cu_seqlens, prefix_of  # the layout as the fused kernel takes it
        self.self_tokens = bounds[num_self]  # tokens [0, self_tokens): prefix-free segments
        self._self_bounds = torch.tensor(bounds[:num_self + 1], dtype=torch.int32)
        self._self_lengths = [e - b for b, e in zip(bounds[:num_self], bounds[1:num_self + 1])]
        comp = list(range(num_self, S))
        self.num_completions = len(comp)
        self._comp_lengths = [bounds[s + 1] - bounds[s] for s in comp]
        self._comp_prefix = [prefix[s] for s in comp]  # index of each completion's prefix segment
        self._index: dict[str, torch.Tensor] = {}  # the padded path's, built at its first call (`_padded_index`)
        self._group_masks: dict[int, torch.Tensor] = {}  # GQA group size -> mask [B, 1, G * Lc, Lp + Lc]
        if not comp:
            self.padded = False
            return
        pre_lens = [self._self_lengths[p] for p in self._comp_prefix]
        B, Lc, Lp = len(comp), max(self._comp_lengths), max(pre_lens)
        entries = B * Lc * (Lp + Lc)
        needed = sum(c * (p + c) for c, p in zip(self._comp_lengths, pre_lens))
        self.padded = entries <= min(_PADDED_MAX_ENTRIES, _PADDED_MAX_WASTE * needed) if padded is None else padded
        self._shape = (B, Lc)
        # Completions of one length fill [B, Lc] exactly, in order: padding them is a view.
        self._equal = all(n == Lc for n in self._comp_lengths)

    def _padded_index(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The padded path's indices and mask, built at its first call (the fused C++ kernel, the CPU
        default, takes the layout as it is and needs none of them)."""
        if not self._index or self._index["mask"].device != device:
            self._group_masks = {}
            self._index = {name: x.to(device) for name, x in self._build_padded_index().items()}
        return self._index

    def _build_padded_index(self) -> dict[str, torch.Tensor]:
        (B, Lc), starts = self._shape, self._self_bounds.tolist()
        comp_lens = torch.tensor(self._comp_lengths)
        pre_starts = torch.tensor([starts[p] for p in self._comp_prefix])
        pre_lens = torch.tensor([self._self_lengths[p] for p in self._comp_prefix])
        Lp = int(pre_lens.max())
        # Scatter index of the completion tokens into [B, Lc]: (row, position within the completion).
        row = torch.repeat_interleave(torch.arange(B), comp_lens)
        col = torch.arange(int(comp_lens.sum())) - (torch.cumsum(comp_lens, 0) - comp_lens)[row]
        # Gather index of each completion's prompt keys, [B, Lp] (past a prompt's end: its first token, masked).
        ar_p, ar_c = torch.arange(Lp), torch.arange(Lc)
        prefix_index = pre_starts[:, None] + torch.where(ar_p[None] < pre_lens[:, None], ar_p[None], 0)
        see_prefix = (ar_p[None, None, :] < pre_lens[:, None, None]).expand(B, Lc, Lp)
        see_self = (ar_c[None, :] <= ar_c[:, None])[None].expand(B, Lc, Lc)
        mask = torch.cat((see_prefix, see_self), dim=-1)[:, None]  # [B, 1, Lc, Lp + Lc]
        return {"row": row, "col": col, "prefix": prefix_index, "mask": mask}

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float) -> torch.Tensor:
        """q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, Dv] (post-rotary) -> [T, Hq, Dv]."""
        if q.shape[0] != self.num_tokens:
            raise ValueError(f"the shared-prefix layout covers {self.num_tokens} tokens, the forward has {q.shape[0]}")
        fused = kernels.default_registry().resolution("shared_prefix_attention", q.device)
        if fused.backend == "cpu" and q.dtype in (torch.float32, torch.bfloat16):  # the C++ kernel: one call
            return fused.fn(q, k, v, self._cu_seqlens, self._prefix_of, scale)
        varlen = kernels.resolve("varlen_causal_attention", q.device)
        if self.num_completions == 0:
            return varlen(q, k, v, self._self_bounds, scale)
        group = q.shape[1] // k.shape[1]
        if group > 1 and not self.padded:  # as the varlen reference: expanded KV heads keep SDPA on its fused kernel
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        n_self = self.self_tokens
        q_self, q_comp = q.split([n_self, q.shape[0] - n_self])
        k_self, k_comp = k.split([n_self, k.shape[0] - n_self])
        v_self, v_comp = v.split([n_self, v.shape[0] - n_self])
        out_self = varlen(q_self, k_self, v_self, self._self_bounds, scale)  # (GQA-aware: its contract)
        attend_completions = self._padded if self.padded else self._per_completion
        return torch.cat((out_self, attend_completions(q_comp, k_self, k_comp, v_self, v_comp, scale)))

    def _padded(self, q_comp, k_self, k_comp, v_self, v_comp, scale: float) -> torch.Tensor:
        """Every completion in one SDPA call: padded queries against [its prompt's keys (gathered, [B, Lp]) |
        its own keys (padded, [B, Lc])] under the mask (prompt: all, own: causal). With G query heads per KV
        head, query head h * G + g of completion position t is row g * Lc + t of KV head h's query axis."""
        index = self._padded_index(q_comp.device)
        row, col, B, Lc = index["row"], index["col"], *self._shape
        Hq, Hkv = q_comp.shape[1], k_comp.shape[1]
        G = Hq // Hkv
        mask = self._group_masks.get(G)
        if mask is None:
            mask = self._group_masks[G] = index["mask"].repeat(1, 1, G, 1)

        def pad(x: torch.Tensor) -> torch.Tensor:  # [Tc, H, D] -> [B, Lc, H, D]
            if self._equal:
                return x.view(B, Lc, *x.shape[1:])
            return x.new_zeros(B, Lc, *x.shape[1:]).index_put((row, col), x)

        def with_prefix(x_self: torch.Tensor, x_comp: torch.Tensor) -> torch.Tensor:  # [B, Hkv, Lp + Lc, D]
            return torch.cat((x_self[index["prefix"]].transpose(1, 2), pad(x_comp).transpose(1, 2)), dim=2)

        q_rows = pad(q_comp).unflatten(2, (Hkv, G)).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * Lc, -1)
        o = F.scaled_dot_product_attention(q_rows, with_prefix(k_self, k_comp), with_prefix(v_self, v_comp),
                                           attn_mask=mask, scale=scale)
        o = o.unflatten(2, (G, Lc)).permute(0, 3, 1, 2, 4).reshape(B, Lc, Hq, -1)  # [B, Lc, Hq, Dv]
        return o.reshape(B * Lc, Hq, -1) if self._equal else o[row, col]  # [Tc, Hq, Dv]

    def _per_completion(self, q_comp, k_self, k_comp, v_self, v_comp, scale: float) -> torch.Tensor:
        """One SDPA call per completion (long or very uneven ones): its C queries against [its prompt's
        P keys | its own C keys] under a [C, P + C] mask, no padding. `split` (not slicing) so that
        backward concatenates the pieces' gradients once; a prompt's pieces serve all its completions."""
        k_pre, v_pre = k_self.split(self._self_lengths), v_self.split(self._self_lengths)
        outs = []
        for qc, kc, vc, p in zip(q_comp.split(self._comp_lengths), k_comp.split(self._comp_lengths),
                                 v_comp.split(self._comp_lengths), self._comp_prefix):
            C, P = qc.shape[0], k_pre[p].shape[0]
            ar = torch.arange(C, device=qc.device)
            mask = torch.cat((torch.ones(C, P, dtype=torch.bool, device=qc.device), ar[None] <= ar[:, None]), dim=1)
            o = F.scaled_dot_product_attention(qc.transpose(0, 1)[None], torch.cat((k_pre[p], kc)).transpose(0, 1)[None],
                                               torch.cat((v_pre[p], vc)).transpose(0, 1)[None], attn_mask=mask,
                                               scale=scale)
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs)

    def attend_latent(self, layer_idx: int, attn, q_nope, q_pe, latent, k_pe) -> torch.Tensor:
        """Multi-head latent attention (mla.py): its expanded q, k, v through `attend`."""
        q, k, v = attn.expand(q_nope, q_pe, latent, k_pe)
        return self.attend(layer_idx, q, k, v, scale=attn.scale)
