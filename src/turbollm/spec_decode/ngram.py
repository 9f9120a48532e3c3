"""Prompt lookup: propose what followed the latest earlier occurrence of the last n tokens.

Input-grounded answers (summaries, extractions, rewrites, code edits) copy spans of the prompt,
so the continuation of a matching n-gram is often exactly what the model is about to say.
"""
from __future__ import annotations

import numpy as np


def propose_ngram(token_ids: list[int] | np.ndarray, k: int, n_min: int = 1, n_max: int = 4
                  ) -> list[int]:
    """Up to k tokens following the most recent earlier match of the longest suffix n-gram
    (n from n_max down to n_min); [] when nothing matches."""
    tokens = np.asarray(token_ids, dtype=np.int64)
    L = len(tokens)
    if k <= 0 or L < 2:
        return []
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        suffix = tokens[L - n:]
        # Candidate starts s in [0, L - n - 1]: the match must end before the suffix does.
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:L - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # the most recent occurrence
            return tokens[start:start + k].tolist()
    return []
