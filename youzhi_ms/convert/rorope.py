"""Stage 2 of 5: RoRoPE with FreqFold bands: rotate the key latent per frequency band, keep RoPE on qk_rope_dim dims.

A *band* is a run of F contiguous frequencies (F a multiple of c = d / qk_rope_dim, starting at a multiple of c). One
PCA per band over its n_kv*F complex features (x and y halves as samples, the same real orthogonal U for both, so the
rotation commutes with RoPE when F = 1). The top F/c components of a band keep RoPE; band (f, F)'s b-th kept component
becomes rope pair p = f/c + b and rotates at omega_{c*p} = omega_{f + b*c}, exactly what the DeepSeek-V3 checkpoint's
rope head (dim d/c, same theta) applies. All other components lose RoPE (the approximation of this stage).
Uniform FreqFold F is the special case of equal bands; layer-adaptive FreqFold chooses bands per layer.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from youzhi_ms.convert.latent import half_split_index
from youzhi_ms.errors import YouzhiError

Band = Tuple[int, int]  # (first frequency, number of frequencies F)


def uniform_bands(d: int, F: int) -> List[Band]:
    return [(f, F) for f in range(0, d // 2, F)]


def validate_bands(bands: Sequence[Band], d: int, c: int) -> None:
    pos = 0
    for f, F in bands:
        if f != pos or F % c or F < c or f % c:
            raise YouzhiError(f"invalid FreqFold bands {list(bands)}: bands must tile 0..{d // 2 - 1} contiguously with "
                              f"sizes that are multiples of c={c}, starting at multiples of c")
        pos += F
    if pos != d // 2:
        raise YouzhiError(f"FreqFold bands {list(bands)} cover {pos} of {d // 2} frequencies")


def describe_bands(bands: Sequence[Band]) -> str:
    """Compact text, e.g. '2x4,4x4,16x1' = four bands of 2, four of 4, one of 16 (high to low frequency)."""
    out, prev, n = [], None, 0
    for _, F in bands:
        if F == prev:
            n += 1
        else:
            if prev is not None:
                out.append(f"{prev}x{n}")
            prev, n = F, 1
    out.append(f"{prev}x{n}")
    return ",".join(out)


def band_moments(K: np.ndarray, n_kv: int, d: int, bands: Sequence[Band]) -> List[np.ndarray]:
    """Uncentered second moments per band, float64: K [T, L] pre-RoPE keys (bias included) -> [n_kv*F]^2 each."""
    xi, yi = half_split_index(n_kv, d)
    out = []
    for f, F in bands:
        cols_x = xi[:, f:f + F].reshape(-1)
        cols_y = yi[:, f:f + F].reshape(-1)
        X = K[:, cols_x].astype(np.float64)
        Y = K[:, cols_y].astype(np.float64)
        out.append(X.T @ X + Y.T @ Y)
    return out


def query_band_moments(Sq: np.ndarray, n_heads: int, n_kv: int, d: int, bands: Sequence[Band]) -> List[np.ndarray]:
    """Second moments of the queries seen by each latent feature of a band, [n_kv*F]^2 (block-diagonal by KV group):
    group g's block sums E[q_h q_h^T] over its heads, x and y halves together (as `band_moments` does for keys)."""
    g = n_heads // n_kv
    Sg = Sq.reshape(n_kv, g, d, d).sum(1)  # [n_kv, d, d]
    h2 = d // 2
    out = []
    for f, F in bands:
        M = np.zeros((n_kv * F, n_kv * F))
        for i in range(n_kv):
            blk = Sg[i, f:f + F, f:f + F] + Sg[i, h2 + f:h2 + f + F, h2 + f:h2 + f + F]
            M[i * F:(i + 1) * F, i * F:(i + 1) * F] = blk
        out.append(M)
    return out


def qk_moments(Kmom: Sequence[np.ndarray], Qmom: Sequence[np.ndarray]) -> List[np.ndarray]:
    """Symmetrised products sym(S_k S_q) per band: a direction u scores u^T S_k S_q u, which is the expected squared
    logit carried by u (E[(q.u)^2] E[(k.u)^2]) when the two moments share eigenvectors. Ranking components by it keeps
    RoPE where query and key energy meet, instead of where key energy alone is large."""
    out = []
    for K, Qm in zip(Kmom, Qmom):
        Kn = K / max(np.trace(K), 1e-30)
        Qn = Qm / max(np.trace(Qm), 1e-30)
        P = Kn @ Qn
        out.append((P + P.T) / 2)
    return out


def pca(H: np.ndarray, damping: float = 0.01) -> Tuple[np.ndarray, np.ndarray]:
    """Eigenvectors of H + damping*mean(diag)*I, sorted by descending eigenvalue (float64)."""
    if not np.all(np.isfinite(H)):
        raise YouzhiError("non-finite calibration statistics (inf/nan in key/value activations); the source weights "
                          "overflow in this dtype or the calibration text produced invalid tokens: re-run in fp32, "
                          "check the checkpoint")
    Hd = H + damping * np.mean(np.diag(H)) * np.eye(len(H))
    w, U = np.linalg.eigh(Hd)
    order = np.argsort(w)[::-1]
    return w[order], U[:, order]


def rotation(n_kv: int, d: int, c: int, bands: Sequence[Band], moments: Sequence[np.ndarray], damping=0.01):
    """Orthogonal U_rot [L, L]: new latent = U_rot^T c_K, columns ordered [rope pairs interleaved (x,y) | NoPE dims].

    A band's kept components go to its rope pairs (frequencies omega_f, omega_{f+c}, ...) in eigenvalue order: the
    strongest component at the band's highest frequency. (Matching them by their energy-weighted mean frequency
    instead was measured worse: docs/benchmarks.md, section 2.)
    Returns U_rot and per-band eigenvalues (energy kept with RoPE is the top F/c of each band).
    """
    validate_bands(bands, d, c)
    return assemble_rotation(n_kv, d, c, bands, [pca(H, damping) for H in moments])


def assemble_rotation(n_kv: int, d: int, c: int, bands: Sequence[Band],
                      band_pcas: Sequence[Tuple[np.ndarray, np.ndarray]]):
    """`rotation` from each band's (eigenvalues, eigenvectors) as `pca` returns them: a band's PCA depends on the band
    alone, so the FreqFold search computes it once per band and reuses it in every tiling that has the band."""
    validate_bands(bands, d, c)
    L = n_kv * d
    r_R = d // c
    xi, yi = half_split_index(n_kv, d)
    U_rot = np.zeros((L, L))
    nope_cols = []
    eigs = []
    for (f, F), (w, U) in zip(bands, band_pcas):
        eigs.append(w)
        rows_x = xi[:, f:f + F].reshape(-1)
        rows_y = yi[:, f:f + F].reshape(-1)
        keep = F // c
        for m in range(U.shape[1]):
            colx, coly = np.zeros(L), np.zeros(L)
            colx[rows_x] = U[:, m]
            coly[rows_y] = U[:, m]
            if m < keep:
                p = f // c + m
                U_rot[:, 2 * p], U_rot[:, 2 * p + 1] = colx, coly
            else:
                nope_cols += [colx, coly]
    if nope_cols:
        U_rot[:, r_R:] = np.stack(nope_cols, 1)
    return U_rot, eigs
