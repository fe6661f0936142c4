"""Stage 5 of 5, export: the exact MLA checkpoint (youzhi extensions) or a stock DeepSeek-V3 checkpoint. The
config.json both write and the deployment warnings are the contract's (youzhi_ms/contract.py: `mla_config`,
`deployment_warnings`).

Stock DeepSeek-V3 (transformers, vLLM / vLLM-Ascend, MindFormers) always applies kv_a_layernorm to the latent and has
no q_proj / kv_a bias. The exact conversion has neither a latent norm nor (for bias-free sources) any bias, so the stock
export inserts the norm and refits kv_b_proj by weighted least squares so that kv_b'(norm(c)) reproduces the exact
per-head keys and values kv_b(c) on calibration tokens. Tokens are weighted by the attention they receive in the
source model, because the attention-sink token (first token / end-of-text) has a latent RMS several times smaller
than other tokens, so the norm distorts it most and every query attends to it.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def attention_token_weights(probs: np.ndarray, n_windows: int) -> np.ndarray:
    """Per-token weights [n_windows * S] for the refit: 1 plus the attention each key token receives (mean over heads
    and queries, normalised to mean 1) in the source attention `probs` [n, H, S, S] of the first n windows; the other
    windows get the same per-position profile (the sink at position 0 dominates it)."""
    recv = probs.sum(2).mean(1)  # [n, S]
    recv = recv / recv.mean()
    wts = np.ones((n_windows, probs.shape[-1]))
    wts[:len(recv)] += recv
    wts[len(recv):] += recv.mean(0)
    return wts.reshape(-1)


def refit_kv_b(c: np.ndarray, target_w: np.ndarray, weights: Optional[np.ndarray], eps: float,
               ridge: float = 1e-6):
    """c [T, r] latent (pre-norm); target_w [out, r] the exact kv_b; weights [T] token weights.

    Returns (norm_weight [r], kv_b' [out, r], relative weighted error before/after the refit). "Before" is the exact
    kv_b applied to the normed latent rescaled to the mean latent RMS (the norm's weight a plain conversion would set).

    The norm's weight is 1 and the latent scale lives in kv_b': the function is the same for any split, but Adam moves
    every weight by about the learning rate per step, so a split with a large norm weight (the mean latent RMS reaches
    ~23 in SmolLM2's last layers) and a correspondingly tiny kv_b (|w| ~ 0.004) lets recovery training change kv_b by
    a third of its size in 50 steps at lr 3e-4 (measured: wiki-eval ppl 52 -> 80 instead of down)."""
    c64 = c.astype(np.float64)
    rms = np.sqrt(np.mean(c64 * c64, -1, keepdims=True) + eps)
    g = float(np.sqrt(np.mean(c64 * c64)))
    norm_w = np.ones(c.shape[1])
    cn = c64 / rms
    Y = c64 @ target_w.T.astype(np.float64)
    w = np.ones(len(c)) if weights is None else weights.astype(np.float64)
    A = (cn * w[:, None]).T @ cn
    A += ridge * np.trace(A) / len(A) * np.eye(len(A))
    B = (cn * w[:, None]).T @ Y
    new_w = np.linalg.solve(A, B).T

    def err(W):
        d = cn @ W.T - Y
        return float(np.sqrt((w[:, None] * d * d).sum() / (w[:, None] * Y * Y).sum()))

    return norm_w.astype(np.float32), new_w.astype(np.float32), err(target_w * g), err(new_w)
