"""Stage 4 of 5: the joint K/V latent compression to kv_lora_rank, and assembly of one MLA layer's weights.

After RoRoPE the key latent splits into rope dims (kept exactly, they become k_pe) and NoPE dims. The NoPE keys are
scaled by 1/alpha so keys and values carry equal per-dimension norms (alpha = mean per-dim L2 norm of K_nope / that of
V, un-squared, as TransMLA's code does), then [K_nope/alpha, V] is compressed by an uncentered PCA in float64 with
damping, in one of two metrics:
  * 'attn' (youzhi_ms, default): the PCA is taken in the metric of the attention itself, M = diag(beta*M_k, M_v)
    (`attention_metric`: how a key error moves the logits under the calibration queries, how a value error moves the
    layer output through o_proj), with separate down (V_r^T M^1/2) and up (M^-1/2 V_r) maps. The key/value balance
    beta is a per-layer decision, taken from BALANCES by the same budget-aware error as the FreqFold bands
    (`adaptive.choose`).
  * 'bkv': TransMLA's balanced K/V activation PCA (down = up^T = the top eigenvectors).
The up projection carries alpha back into the key rows, so the function is unchanged at full rank.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from youzhi_ms.convert.latent import kv_group
from youzhi_ms.convert.rorope import pca
from youzhi_ms.errors import YouzhiError

BALANCES = (0.25, 0.5, 1.0, 2.0, 4.0)  # key/value balance multipliers tried per layer with metric "attn"


def input_moments(X: np.ndarray) -> np.ndarray:
    """[X 1]^T [X 1] in float64 ((D+1)^2): every second moment of a linear map of the layer input (keys, values,
    queries, with biases) follows from it, so candidates are scored without touching the tokens again."""
    Xa = np.concatenate([X.astype(np.float64), np.ones((len(X), 1))], 1)
    SX = Xa.T @ Xa
    if not np.all(np.isfinite(SX)):
        raise YouzhiError("non-finite calibration statistics (inf/nan in the layer inputs); the source weights "
                          "overflow in this dtype or are corrupt: re-run in fp32 and check the checkpoint")
    return SX


def _aug(w, b):
    return np.concatenate([w.astype(np.float64), b.astype(np.float64)[:, None]], 1)


def _sqrt_psd(M: np.ndarray, damping: float):
    w, U = np.linalg.eigh(M + damping * np.mean(np.diag(M)) * np.eye(len(M)))
    w = np.maximum(w, 1e-12 * w.max())
    return (U * np.sqrt(w)) @ U.T, (U / np.sqrt(w)) @ U.T


def query_moments(src, SX, n_heads, d):
    """E[q_h q_h^T] per head [H, d, d] (pre-RoPE queries, bias included)."""
    T = SX[-1, -1]
    Wq = _aug(src["wq"], src.get("bq", np.zeros(src["wq"].shape[0]))).reshape(n_heads, d, -1)
    return np.matmul(Wq @ SX, Wq.transpose(0, 2, 1)) / T


def attention_metric(src, U_rot, Sq, n_heads, n_kv, d, rope):
    """Block metrics for the latent [K_nope; V]: how a latent error reaches the attention.

    Keys: a NoPE-key error dk changes head h's logit by q_h^T W_UK_nope[h] dk / sqrt(d), so
        M_k = sum_h W_UK_nope[h]^T E[q_h q_h^T] W_UK_nope[h] / d          (queries from the calibration tokens)
    Values: a value error dv moves the layer output by W_o,h W_UV[h] dv (before attention averaging), so
        M_v = sum_h W_UV[h]^T W_o,h^T W_o,h W_UV[h].
    Returns (M_k [(L-rope)^2], M_v [L^2])."""
    L, H = n_kv * d, n_heads
    Mk = np.zeros((L - rope, L - rope))
    Mv = np.zeros((L, L))
    wo = src["wo"].astype(np.float64)
    for h in range(H):
        g = kv_group(h, H, n_kv)
        uk = U_rot[g * d:(g + 1) * d, rope:]  # W_UK_nope[h], d x (L-rope)
        Mk += uk.T @ Sq[h] @ uk / d
        Wo_h = wo[:, h * d:(h + 1) * d]
        Mv[g * d:(g + 1) * d, g * d:(g + 1) * d] += Wo_h.T @ Wo_h
    return Mk, Mv


def build_layer(src: Dict[str, np.ndarray], U_rot: np.ndarray, SX: np.ndarray, n_heads: int, n_kv: int, d: int,
                rope: int, rank: int, damping: float = 0.01, R_override: Optional[np.ndarray] = None,
                metric: str = "bkv", beta: float = 1.0, Sq: Optional[np.ndarray] = None):
    """One exact-export MLA layer (HF DeepSeek-V3 tensor names, biases kept when the source has them).

    src: wq [H*d, D], wk/wv [L, D], wo, optional bq/bk/bv/bo. U_rot: the RoRoPE rotation [L, L]. SX:
    `input_moments` of the calibration inputs (input-layernormed) for the joint PCA. metric 'bkv' is TransMLA's balanced activation PCA;
    'attn' is the attention-aware variant: PCA of M^1/2 Sigma M^1/2 with M = diag(beta*M_k, M_v) from
    `attention_metric`, down projection V_r^T M^1/2 and up projection M^-1/2 V_r (optimal for E||M^1/2 (x - x_hat)||^2;
    MLA allows different down and up maps). Returns (tensors, info)."""
    L = n_kv * d
    H, D = n_heads, src["wq"].shape[1]
    zeros_L = np.zeros(L)
    bk, bv = src.get("bk", zeros_L), src.get("bv", zeros_L)
    Wk = U_rot.T @ src["wk"].astype(np.float64)  # rotated keys [L, D]
    bk_r = U_rot.T @ bk
    Wk_rope, Wk_nope, bk_rope, bk_nope = Wk[:rope], Wk[rope:], bk_r[:rope], bk_r[rope:]

    Akn, Av = _aug(Wk_nope, bk_nope), _aug(src["wv"], bv)
    Skk = ((Akn @ SX) * Akn).sum(1)  # per-dim sum of squares over tokens
    Svv = ((Av @ SX) * Av).sum(1)
    alpha = float(np.sqrt(np.maximum(Skk, 0)).mean() / np.sqrt(np.maximum(Svv, 0)).mean()) if len(Skk) else 1.0
    if not np.isfinite(alpha) or alpha <= 0:
        raise YouzhiError("non-finite or zero key/value norms in calibration statistics; check the checkpoint and "
                          "the calibration text")
    A_aug = np.concatenate([Akn / alpha, Av], 0)  # latent = A_aug [x; 1]
    Sxx = A_aug @ SX @ A_aug.T
    if R_override is not None:
        R = R_override
        eig = None
        down, up = R[:, :rank].T, R[:, :rank]
    elif metric == "attn":
        Mk, Mv = attention_metric(src, U_rot, Sq if Sq is not None else query_moments(src, SX, H, d), H, n_kv, d, rope)
        Mk = Mk * alpha * alpha  # the latent holds K_nope / alpha
        nk = L - rope
        # beta = 1 balances the two terms' total error energy: tr(M_k S_kk) = tr(M_v S_vv)
        bal = np.trace(Mv @ Sxx[nk:, nk:]) / max(np.trace(Mk @ Sxx[:nk, :nk]), 1e-30) if nk else 1.0
        M = np.zeros((2 * L - rope, 2 * L - rope))
        M[:nk, :nk] = beta * bal * Mk
        M[nk:, nk:] = Mv
        Mh, Mih = _sqrt_psd(M, 1e-6)
        eig, Vr = pca(Mh @ Sxx @ Mh, damping)
        down, up = Vr[:, :rank].T @ Mh, Mih @ Vr[:, :rank]
    else:
        eig, R = pca(Sxx, damping)
        down, up = R[:, :rank].T, R[:, :rank]  # [r, 2L-rope], [2L-rope, r]
    W_dkv, b_dkv = (down @ A_aug)[:, :D], (down @ A_aug)[:, D]
    out = _layer_tensors(src, U_rot, Wk_rope, bk_rope, W_dkv, b_dkv, up, alpha, n_heads, n_kv, d, rope, rank)
    info = {"alpha": alpha}
    if eig is not None:
        info["pca_energy_kept"] = float(eig[:rank].sum() / eig.sum())
    return out, info


def _layer_tensors(src, U_rot, Wk_rope, bk_rope, W_dkv, b_dkv, up, alpha, n_heads, n_kv, d, rope, rank):
    """The MLA layer's tensors (float32) from the rotation, the rope rows of the rotated keys and the latent's down
    (W_dkv, b_dkv) and up maps."""
    L = n_kv * d
    H, D = n_heads, src["wq"].shape[1]
    s = np.sqrt((d + rope) / d)  # MLA scores use (d+rope)^-1/2; the source used d^-1/2
    bq = src.get("bq", np.zeros(H * d))
    has_bias = "bk" in src or "bv" in src
    Rk, Rv = up[:L - rope], up[L - rope:]
    kv_b = np.zeros((H, 2 * d, rank))
    q_rows = np.zeros((H, d + rope, D))
    q_bias = np.zeros((H, d + rope))
    Wq = src["wq"].astype(np.float64).reshape(H, d, D)
    bqh = bq.reshape(H, d)
    for h in range(H):
        g = kv_group(h, H, n_kv)
        blk = U_rot[g * d:(g + 1) * d]  # W_UK[h] U_rot: d x L
        uk_rope, uk_nope = blk[:, :rope], blk[:, rope:]
        kv_b[h, :d] = (uk_nope * alpha) @ Rk
        kv_b[h, d:] = Rv[g * d:(g + 1) * d]
        q_rows[h, :d] = Wq[h] * s
        q_rows[h, d:] = (uk_rope.T @ Wq[h]) * s
        q_bias[h, :d] = bqh[h] * s
        q_bias[h, d:] = (uk_rope.T @ bqh[h]) * s
    out = {
        "q_proj.weight": q_rows.reshape(H * (d + rope), D),
        "kv_a_proj_with_mqa.weight": np.concatenate([W_dkv, Wk_rope], 0),
        "kv_b_proj.weight": kv_b.reshape(H * 2 * d, rank),
        "o_proj.weight": src["wo"].astype(np.float64),
    }
    if "bq" in src:
        out["q_proj.bias"] = q_bias.reshape(-1)
    if has_bias:
        out["kv_a_proj_with_mqa.bias"] = np.concatenate([b_dkv, bk_rope], 0)
    if "bo" in src:
        out["o_proj.bias"] = src["bo"].astype(np.float64)
    return {k: v.astype(np.float32) for k, v in out.items()}


class LatentPCA:
    """`build_layer` for one layer and many RoRoPE rotations (the FreqFold search), from products taken once per layer.

    Everything of `build_layer` that does not depend on the rotation is computed here once: the second moments of the
    unrotated keys and values (so a candidate's latent covariance is an L x L congruence instead of a pass over the
    (D+1)^2 input moments), the value metric M_v and its eigendecomposition, and the query moments summed per KV group
    (so M_k is n_kv products, not one per head). `build(U_rot, rank, beta)` then equals `build_layer(src, U_rot, SX,
    ..., beta=beta)` to float tolerance (tested), in a different order of operations: the exported layer is always
    rebuilt by `build_layer`, these tensors only score candidates."""

    def __init__(self, src: Dict[str, np.ndarray], SX: np.ndarray, n_heads: int, n_kv: int, d: int, rope: int,
                 damping: float = 0.01, metric: str = "bkv", Sq: Optional[np.ndarray] = None):
        L = n_kv * d
        self.src, self.H, self.n_kv, self.d, self.rope, self.damping, self.metric = src, n_heads, n_kv, d, rope, \
            damping, metric
        zeros_L = np.zeros(L)
        self.Ak, self.Av = _aug(src["wk"], src.get("bk", zeros_L)), _aug(src["wv"], src.get("bv", zeros_L))
        A = np.concatenate([self.Ak, self.Av], 0)
        S = (A @ SX) @ A.T  # second moments of [K; V] with biases, [2L, 2L]
        self.SK, self.SKV, self.SVV = S[:L, :L], S[:L, L:], S[L:, L:]
        self.wk64 = src["wk"].astype(np.float64)
        self.bk = src.get("bk", zeros_L).astype(np.float64)
        # the candidate-independent tensors, once: the NoPE query rows, o_proj, and the source queries per head that
        # the rope rows rotate (the large part of a 7B layer's tensors)
        sc = np.sqrt((d + rope) / d)
        self.Wq = src["wq"].astype(np.float64).reshape(n_heads, d, -1)
        self.bq = src.get("bq", np.zeros(n_heads * d)).astype(np.float64).reshape(n_heads, d)
        self.q_nope32 = (self.Wq * sc).astype(np.float32)
        self.bq_nope32 = (self.bq * sc).astype(np.float32)
        self.fixed = {"o_proj.weight": src["wo"].astype(np.float32)}
        if "bo" in src:
            self.fixed["o_proj.bias"] = src["bo"].astype(np.float32)
        self.group = np.array([kv_group(h, n_heads, n_kv) for h in range(n_heads)])
        self._prep_key = None
        if metric == "attn":
            Sq = Sq if Sq is not None else query_moments(src, SX, n_heads, d)
            g = n_heads // n_kv
            self.Qg = Sq.reshape(n_kv, g, d, d).sum(1) / d  # heads h = g_idx * g + j read KV group g_idx (kv_group)
            self.Mv = self._value_metric()
            self.wv_eig, self.Uv = np.linalg.eigh(self.Mv)

    def _value_metric(self):
        L, d, H, n_kv = self.n_kv * self.d, self.d, self.H, self.n_kv
        Mv = np.zeros((L, L))
        wo = self.src["wo"].astype(np.float64)
        for h in range(H):
            g = kv_group(h, H, n_kv)
            Wo_h = wo[:, h * d:(h + 1) * d]
            Mv[g * d:(g + 1) * d, g * d:(g + 1) * d] += Wo_h.T @ Wo_h
        return Mv

    def _prepare(self, U_rot: np.ndarray):
        """The rotation's part, shared by every balance: alpha, the latent covariance, M_k's eigendecomposition."""
        if self._prep_key is not None and self._prep_key is U_rot:
            return self._prep
        rope, d, L = self.rope, self.d, self.n_kv * self.d
        Un = U_rot[:, rope:]
        SKn = Un.T @ self.SK @ Un
        Skk, Svv = np.diag(SKn), np.diag(self.SVV)
        alpha = float(np.sqrt(np.maximum(Skk, 0)).mean() / np.sqrt(np.maximum(Svv, 0)).mean()) if len(Skk) else 1.0
        if not np.isfinite(alpha) or alpha <= 0:
            raise YouzhiError("non-finite or zero key/value norms in calibration statistics; check the checkpoint and "
                              "the calibration text")
        nk = L - rope
        cross = Un.T @ self.SKV / alpha
        Sxx = np.block([[SKn / (alpha * alpha), cross], [cross.T, self.SVV]])
        prep = {"alpha": alpha, "Sxx": Sxx, "Un": Un}
        if self.metric == "attn":
            Mk = np.zeros((nk, nk))
            for g in range(self.n_kv):
                u = Un[g * d:(g + 1) * d]
                Mk += u.T @ self.Qg[g] @ u
            Mk *= alpha * alpha  # the latent holds K_nope / alpha
            bal = np.trace(self.Mv @ Sxx[nk:, nk:]) / max(np.trace(Mk @ Sxx[:nk, :nk]), 1e-30) if nk else 1.0
            prep.update(bal=bal, trMk=np.trace(Mk), Mk_eig=np.linalg.eigh(Mk))
        self._prep_key, self._prep = U_rot, prep
        return prep

    def build(self, U_rot: np.ndarray, rank: int, beta: float = 1.0, R_override: Optional[np.ndarray] = None):
        p = self._prepare(U_rot)
        rope, L = self.rope, self.n_kv * self.d
        nk = L - rope
        alpha, Sxx = p["alpha"], p["Sxx"]
        eig = None
        if R_override is not None:
            down, up = R_override[:, :rank].T, R_override[:, :rank]
        elif self.metric == "attn":
            # _sqrt_psd of diag(beta*bal*M_k, M_v) block by block: the same damping, the same eigenvalue floor
            wk, Uk = p["Mk_eig"]
            wk = beta * p["bal"] * wk
            delta = 1e-6 * (beta * p["bal"] * p["trMk"] + np.trace(self.Mv)) / (2 * L - rope)
            wk, wv = wk + delta, self.wv_eig + delta
            floor = 1e-12 * max(wk.max() if nk else 0.0, wv.max())
            wk, wv = np.maximum(wk, floor), np.maximum(wv, floor)
            Mh = np.zeros((2 * L - rope, 2 * L - rope))
            Mih = np.zeros_like(Mh)
            Mh[:nk, :nk], Mih[:nk, :nk] = (Uk * np.sqrt(wk)) @ Uk.T, (Uk / np.sqrt(wk)) @ Uk.T
            Mh[nk:, nk:], Mih[nk:, nk:] = (self.Uv * np.sqrt(wv)) @ self.Uv.T, (self.Uv / np.sqrt(wv)) @ self.Uv.T
            eig, Vr = pca(Mh @ Sxx @ Mh, self.damping)
            down, up = Vr[:, :rank].T @ Mh, Mih @ Vr[:, :rank]
        else:
            eig, R = pca(Sxx, self.damping)
            down, up = R[:, :rank].T, R[:, :rank]
        # down @ [Un^T A_k / alpha; A_v] without forming the rotated key rows
        W = (down[:, :nk] @ p["Un"].T / alpha) @ self.Ak + down[:, nk:] @ self.Av
        out = self._tensors(U_rot, W, up, alpha, rank)
        info = {"alpha": alpha}
        if eig is not None:
            info["pca_energy_kept"] = float(eig[:rank].sum() / eig.sum())
        return out, info

    def _tensors(self, U_rot, W, up, alpha, rank):
        """`_layer_tensors` with the candidate-independent rows taken from the cache (float32 throughout)."""
        H, d, rope, L = self.H, self.d, self.rope, self.n_kv * self.d
        sc = np.sqrt((d + rope) / d)
        Ur = U_rot[:, :rope]
        Ug = U_rot.reshape(self.n_kv, d, L)[self.group]  # [H, d, L]: W_UK[h] U_rot
        q_rope = np.matmul(Ug[:, :, :rope].transpose(0, 2, 1), self.Wq) * sc  # [H, rope, D]
        q = np.concatenate([self.q_nope32, q_rope.astype(np.float32)], 1).reshape(H * (d + rope), -1)
        Rk, Rv = up[:L - rope], up[L - rope:]
        kv_k = np.matmul(Ug[:, :, rope:] * alpha, Rk)  # [H, d, rank]
        kv_v = Rv.reshape(self.n_kv, d, rank)[self.group]
        out = {"q_proj.weight": q,
               "kv_a_proj_with_mqa.weight": np.concatenate([W[:, :-1], Ur.T @ self.wk64], 0).astype(np.float32),
               "kv_b_proj.weight": np.concatenate([kv_k, kv_v], 1).reshape(H * 2 * d, rank).astype(np.float32)}
        out.update(self.fixed)
        if "bq" in self.src:
            b_rope = np.einsum("hrd,hd->hr", Ug[:, :, :rope].transpose(0, 2, 1), self.bq) * sc
            out["q_proj.bias"] = np.concatenate([self.bq_nope32, b_rope.astype(np.float32)], 1).reshape(-1)
        if "bk" in self.src or "bv" in self.src:
            out["kv_a_proj_with_mqa.bias"] = np.concatenate([W[:, -1], Ur.T @ self.bk], 0).astype(np.float32)
        return out
