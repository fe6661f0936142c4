"""Stage 1 of 5: GQA as MHA over a shared latent (exact).

The latent is the stacked GQA keys/values, c_K = W_K x + b_K and c_V = W_V x + b_V, each L = n_kv*d wide. Query head h
reads KV head g(h) = h // group (Hugging Face repeat_kv order) through the selectors W_UK[h] = W_UV[h] = E_g(h), the
d x L identity on block g(h). Nothing changes numerically; later stages rotate and compress this latent.
"""
from __future__ import annotations

import numpy as np


def kv_group(h: int, n_heads: int, n_kv: int) -> int:
    return h // (n_heads // n_kv)


def half_split_index(n_kv: int, d: int):
    """Latent indices of the x and y parts of (kv head i, frequency j): arrays [n_kv, d/2] each."""
    i = np.arange(n_kv)[:, None] * d
    j = np.arange(d // 2)[None, :]
    return i + j, i + j + d // 2
