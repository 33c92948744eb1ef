"""N-gram prompt lookup: draft the tokens that followed the latest earlier occurrence of the sequence's
longest recent suffix (between `prompt_lookup_min` and `prompt_lookup_max` tokens) in prompt + output.

No model and no state: the drafts are a point mass (q = 1 on the drafted token), so verification
accepts a draft exactly when the target's own sample at that position equals it. The search is
vectorised with numpy: the candidate match ends are the earlier positions holding the last token,
narrowed one token to the left at a time while they still match, O(len * max_n) worst case.
"""

from __future__ import annotations

import numpy as np

from rl_engine.inference.sequence import Sequence


def ngram_lookup(tokens: np.ndarray, *, min_n: int, max_n: int, num_drafts: int) -> list[int]:
    """Up to `num_drafts` tokens following the most recent earlier match of the longest suffix of
    `tokens` of length in [min_n, max_n]; [] when no suffix of at least min_n tokens recurs."""
    length = tokens.shape[0]
    if length < min_n + 1:
        return []
    ends = np.flatnonzero(tokens[:-1] == tokens[-1])  # earlier positions j matching the last token
    if ends.size == 0:
        return []
    n = 1
    for m in range(1, min(max_n, length - 1)):  # extend the matched suffix one token to the left
        longer = ends[ends >= m]
        longer = longer[tokens[longer - m] == tokens[length - 1 - m]]
        if longer.size == 0:
            break
        ends, n = longer, m + 1
    if n < min_n:
        return []
    j = int(ends[-1])  # the most recent among the longest matches
    return tokens[j + 1:j + 1 + num_drafts].tolist()


class NgramProposer:
    def __init__(self, *, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max

    def propose(self, seqs: list[Sequence], max_drafts: list[int]) -> None:
        """Append up to max_drafts[i] drafts to seqs[i].token_ids (point masses: no draft_probs)."""
        for seq, k in zip(seqs, max_drafts):
            drafts = ngram_lookup(np.asarray(seq.token_ids, dtype=np.int64), min_n=self.min_n, max_n=self.max_n,
                                  num_drafts=k)
            if drafts:
                seq.token_ids.extend(drafts)
                seq.num_draft_tokens = len(drafts)
