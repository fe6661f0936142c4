"""Stage 5 of 5, export: the exact MLA checkpoint (youzhi extensions) or a stock DeepSeek-V3 checkpoint, plus the deployment checks.

Stock DeepSeek-V3 (transformers, vLLM / vLLM-Ascend, MindFormers) always applies kv_a_layernorm to the latent and has
no q_proj / kv_a bias. The exact conversion has neither a latent norm nor (for bias-free sources) any bias, so the stock
export inserts the norm and refits kv_b_proj by weighted least squares so that kv_b'(norm(c)) reproduces the exact
per-head keys and values kv_b(c) on calibration tokens. Tokens are weighted by the attention they receive in the
source model, because the attention-sink token (first token / end-of-text) has a latent RMS several times smaller
than other tokens, so the norm distorts it most and every query attends to it.
"""
from __future__ import annotations

from typing import Dict, List, Optional

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


def deployment_warnings(n_heads: int, n_kv_src: int, rank: int, rope: int) -> List[str]:
    out = []
    if n_heads not in (32, 64, 128):
        out.append(f"vLLM-Ascend MLA graph mode needs num_attention_heads per latent head in {{32, 64, 128}}; this model "
                   f"has {n_heads} (eager mode still works)")
    if rank % 16:
        out.append(f"kv_lora_rank {rank} is not a multiple of 16 (vLLM-Ascend reshapes the latent by 16)")
    if rank + rope != 576:
        out.append(f"kv_lora_rank + qk_rope_head_dim = {rank + rope} != 576: vLLM's CUDA MLA kernels (FlashMLA) only "
                   "accept 512+64; other sizes need another attention backend")
    return out


def mla_config(src_cfg: dict, n_heads: int, d: int, rope: int, rank: int, export: str, has_q_bias: bool,
               has_kv_bias: bool, youzhi: Dict) -> dict:
    keep = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range"]
    cfg = {k: src_cfg[k] for k in keep if k in src_cfg}
    exact = export == "exact"
    cfg.update({
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "num_key_value_heads": n_heads, "q_lora_rank": None, "kv_lora_rank": rank,
        "qk_nope_head_dim": d, "qk_rope_head_dim": rope, "v_head_dim": d, "head_dim": rope,
        "rope_interleave": True, "hidden_act": "silu", "n_routed_experts": None, "n_shared_experts": None,
        "first_k_dense_replace": src_cfg["num_hidden_layers"], "moe_intermediate_size": src_cfg["intermediate_size"],
        "num_experts_per_tok": None, "attention_bias": bool(exact and has_kv_bias), "attention_dropout": 0.0,
        "torch_dtype": "float32", "use_cache": True,
    })
    yz = dict(youzhi)
    yz["export"] = export
    if exact:
        yz["no_kv_layernorm"] = True
        yz["q_proj_bias"] = bool(has_q_bias)
    cfg["youzhi"] = yz
    return cfg
