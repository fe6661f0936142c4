"""Stage 3 of 5, layer-adaptive FreqFold: choose the RoRoPE bands of every layer by the budget-aware residual-stream error.

Candidates (per layer):
  * 'adaptive': every monotone tiling of the d/2 frequencies into contiguous bands whose sizes are fold sizes
    (c, 2c, 4c, ... d/2) and never decrease from the highest frequency to the lowest: high frequencies, whose
    misrotation costs the most phase per position, get small bands; low ones may share a rope pair among many
    frequencies. 36 tilings per layer for d = 64, c = 2; 202 for d = 128.
  * 'adaptive-layer': one uniform F per layer.
Every candidate is converted fully at the target kv_lora_rank (RoRoPE + latent PCA, `LayerStats.build`) and scored by
`calibrate.ResidualScore`. Its default kind, `local-block`, is the squared error of the layer's output after its MLP
against the source layer's output on the same inputs: measured on held-out text of two domains it picks better plans
than the issue's residual-stream-with-drift score, which over-fits the upstream drift of the calibration text
(docs/benchmarks.md section 2; the other kinds stay selectable). The best few candidates are then re-scored over the
key/value balances (`latent_pca`), and the (bands, balance) pair with the smallest full error wins. Both searches
score every candidate in full and so choose the same; the fast one (the default) builds the candidates from per-layer
products and scores them in worker processes, the exhaustive one builds each as it is exported (for checking).
Successive halving (`--search-survivors`, `--search-balance-survivors`: a subsample round first, only the best few in
full) is quicker still but drops near-ties the 30 layers after them amplify (docs/benchmarks.md section 2).
`decide` turns the conversion options into that search for one layer.

When a head dimension gives more candidates than `max_candidates`, a rank-blind, separable band proxy (`BandProxy`:
the variance of each band's logit error under the source attention, a second-order KL) shortlists them; uniform
tilings always stay in. It is not needed for d <= 64 and is measured against the exhaustive search in
docs/benchmarks.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from youzhi_ms.contract import max_rank
from youzhi_ms.convert.latent import kv_group
from youzhi_ms.convert.rorope import Band, describe_bands, pca, uniform_bands, validate_bands
from youzhi_ms.convert.score_workers import default_workers, map_scores

MODES = ("adaptive", "adaptive-layer")


def fold_sizes(d: int, c: int) -> List[int]:
    out, F = [], c
    while F <= d // 2:
        out.append(F)
        F *= 2
    return out


def monotone_tilings(d: int, c: int, sizes: Optional[Sequence[int]] = None) -> List[List[Band]]:
    """Every tiling of frequencies 0..d/2-1 into contiguous bands with sizes from `sizes` (default: the fold sizes),
    non-decreasing from the highest frequency (0) to the lowest."""
    n = d // 2
    sizes = sorted(sizes or fold_sizes(d, c))
    out: List[List[Band]] = []

    def extend(pos: int, smallest: int, acc: List[Band]):
        if pos == n:
            out.append(list(acc))
            return
        for F in sizes:
            if F >= smallest and pos + F <= n:
                acc.append((pos, F))
                extend(pos + F, F, acc)
                acc.pop()

    extend(0, sizes[0], [])
    return out


def layer_candidates(mode: str, d: int, c: int) -> Dict[str, List[Band]]:
    """Named band tilings of one layer: 'F=4' for uniform ones, describe_bands() text for mixed ones."""
    uniform = {f"F={F}": uniform_bands(d, F) for F in fold_sizes(d, c)}
    if mode == "adaptive-layer":
        return uniform
    out = {}
    for bands in monotone_tilings(d, c):
        sizes = {F for _, F in bands}
        out[f"F={bands[0][1]}" if len(sizes) == 1 else describe_bands(bands)] = bands
    return out


def _complex_heads(x: np.ndarray) -> np.ndarray:
    """[..., d] half-split -> complex [..., d/2]."""
    h = x.shape[-1] // 2
    return x[..., :h].astype(np.float64) + 1j * x[..., h:].astype(np.float64)


class BandProxy:
    """Rank-blind logit-error proxy for every candidate band of one layer (used only to shortlist large candidate sets).

    q [N,S,H,d], k [N,S,kv,d] pre-RoPE; probs [N,H,S,S] the source attention; inv_freq [d/2]. Queries are subsampled
    every `q_stride` positions (keys are all kept) to bound time and memory; float32 real matmuls throughout."""

    def __init__(self, q, k, probs, inv_freq, n_kv, K_moments_fn, c: int, scale: float, q_stride: int = 4):
        self.N, self.S, self.H, d = q.shape
        self.d, self.c, self.n_kv = d, c, n_kv
        self.inv_freq = inv_freq.astype(np.float64)
        self.tq = np.arange(q_stride - 1, self.S, q_stride)
        self.qc = _complex_heads(q[:, self.tq])  # [N,Tq,H,d/2]
        self.kc = _complex_heads(k)  # [N,S,kv,d/2]
        self.p = probs[:, :, self.tq].astype(np.float32)  # [N,H,Tq,S]
        self.moments = K_moments_fn
        self.scale = scale
        self.group = np.array([kv_group(h, self.H, n_kv) for h in range(self.H)])
        rel = self.tq[:, None] - np.arange(self.S)[None, :]  # t - s
        n_units = d // 2 // c
        Tq = len(self.tq)
        # true per-frequency logit contributions, accumulated at multiples of c: prefix[u] = sum_{j < u*c}
        self.prefix = np.zeros((n_units + 1, self.N, self.H, Tq, self.S), np.float32)
        acc = np.zeros((self.N, self.H, Tq, self.S))
        for j in range(d // 2):
            qj = self.qc[:, :, :, j].transpose(0, 2, 1)  # [N,H,Tq]
            kj = self.kc[:, :, self.group, j].transpose(0, 2, 1)  # [N,H,S] (each head's kv group)
            acc += np.real(qj[..., :, None] * np.conj(kj[..., None, :]) * np.exp(1j * self.inv_freq[j] * rel))
            if (j + 1) % c == 0:
                self.prefix[(j + 1) // c] = acc

    def error(self, band: Band) -> float:
        f, F = band
        n_kv, c = self.n_kv, self.c
        _, U = pca(self.moments([band])[0])
        keep = F // c
        true = self.prefix[(f + F) // c] - self.prefix[f // c]
        # components: k'_m(s) = sum_{i,j} U[(i,j), m] k_{i,j}(s); q'_{h,m}(t) = sum_j U[(g(h), j), m] q_{h,j}(t)
        kp = self.kc[:, :, :, f:f + F].reshape(self.N, self.S, n_kv * F) @ U  # [N,S,M], feature order (i, j)
        Ug = U.reshape(n_kv, F, -1)[self.group]  # [H,F,M]
        qp = np.matmul(self.qc[:, :, :, f:f + F].transpose(0, 2, 1, 3), Ug)  # [N,H,Tq,M]
        # rope components rotate at omega_{f + m c}; the rest carry no rotation
        w = np.zeros(qp.shape[-1])
        w[:keep] = self.inv_freq[f + np.arange(keep) * c]
        qr = qp * np.exp(1j * self.tq[:, None] * w[None, :])
        kr = kp * np.exp(1j * np.arange(self.S)[:, None] * w[None, :])
        Qf = np.concatenate([qr.real, qr.imag], -1).astype(np.float32)
        Kf = np.concatenate([kr.real, kr.imag], -1).astype(np.float32)
        approx = np.matmul(Qf, Kf[:, None].swapaxes(-1, -2))  # Re(q conj k) summed over components
        delta = (true - approx) * self.scale
        mean = (self.p * delta).sum(-1, dtype=np.float64)
        var = (self.p * delta * delta).sum(-1, dtype=np.float64) - mean * mean
        return float(var.sum() / (self.N * len(self.tq)))


def shortlist(cands: Dict[str, List[Band]], band_error: Callable[[Band], float], limit: int) -> Dict[str, List[Band]]:
    """The `limit` candidates with the smallest summed band proxy, plus every uniform tiling."""
    if len(cands) <= limit:
        return cands
    cache: Dict[Band, float] = {}

    def total(bands):
        for b in bands:
            if b not in cache:
                cache[b] = band_error(b)
        return sum(cache[b] for b in bands)

    ranked = sorted(cands, key=lambda n: total(cands[n]))
    keep = set(ranked[:limit]) | {n for n in cands if n.startswith("F=")}
    return {n: cands[n] for n in cands if n in keep}


@dataclass
class Decision:
    """What the layer's FreqFold search decided, and the errors it decided on (all `ResidualScore` values)."""
    name: str
    bands: List[Band]
    beta: float
    score: float
    scores: Dict[str, float] = field(default_factory=dict)  # candidates scored in full at balance 1
    refined: Dict[str, float] = field(default_factory=dict)  # "name @ beta" for the finalists
    coarse: Dict[str, float] = field(default_factory=dict)  # every candidate on the subsample (halving only)
    coarse_balances: Dict[str, float] = field(default_factory=dict)  # "name @ beta" on the subsample (halving only)


def choose(cands: Dict[str, List[Band]], score_of: Callable[[List[Band], float], float],
           betas: Sequence[float] = (1.0,), finalists: int = 3,
           progress: Optional[Callable[[int, int], None]] = None,
           coarse_of: Optional[Callable[[List[Band], float], float]] = None, survivors: int = 0,
           workers: int = 1, balance_survivors: int = 0) -> Decision:
    """The layer's (bands, key/value balance) pair with the smallest error among those scored in full.

    score_of(bands, beta) -> error; progress(done, total) after every pair scored (either score).
    Every candidate in full at balance 1, then the best `finalists` in full at every other balance: the exhaustive
    rule, and the default. Successive halving, when asked (coarse_of(bands, beta): a cheaper score that ranks like
    score_of, e.g. on a subsample of the query positions): with `survivors` > 0 every candidate by coarse_of at
    balance 1 and only the best `survivors` in full; with `balance_survivors` > 0 the finalists' other balances by
    coarse_of and only the best `balance_survivors` pairs in full. Halving equals the exhaustive rule unless the full
    score's winner falls outside a coarse round's survivors, which near-ties make likely (docs/benchmarks.md
    section 2). Each round's pairs are scored by up to `workers` processes (`score_workers.map_scores`); the result
    does not depend on their number. Ties keep the first name."""
    top_n = min(max(1, finalists), len(cands))
    halving = coarse_of is not None and survivors > 0 and len(cands) > max(survivors, top_n)
    n_full = max(survivors, top_n) if halving else len(cands)
    other_betas = [b for b in betas if b != 1.0]
    n_pairs = top_n * len(other_betas)
    balance_halving = coarse_of is not None and len(cands) > top_n and 0 < balance_survivors < n_pairs
    n_pairs_full = balance_survivors if balance_halving else n_pairs
    total = (len(cands) if halving else 0) + (n_pairs if balance_halving else 0) + n_full + n_pairs_full
    done = [0]

    def tick():
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    def scored(fn, items):
        return dict(zip(items, map_scores(fn, items, workers, tick)))

    coarse: Dict[str, float] = {}
    coarse_balances: Dict[str, float] = {}
    names = list(cands)
    if halving:
        coarse = scored(lambda n: coarse_of(cands[n], 1.0), names)
        names = sorted(names, key=coarse.get)[:n_full]
        names = [n for n in cands if n in set(names)]  # candidate order, so ties keep the first name
    scores = scored(lambda n: score_of(cands[n], 1.0), names)
    top = sorted(scores, key=scores.get)[:top_n]
    pairs = [(n, beta) for n in top for beta in other_betas]
    if balance_halving and pairs:
        pair_coarse = scored(lambda nb: coarse_of(cands[nb[0]], nb[1]), pairs)
        coarse_balances = {f"{n} @ {beta:g}": v for (n, beta), v in pair_coarse.items()}
        keep = set(sorted(pairs, key=pair_coarse.get)[:n_pairs_full])
        pairs = [nb for nb in pairs if nb in keep]
    other = scored(lambda nb: score_of(cands[nb[0]], nb[1]), pairs)
    refined: Dict[str, float] = {}
    best: Tuple[float, str, float] = (np.inf, top[0], 1.0)
    for n in top:
        for beta in betas:
            if beta == 1.0:
                s = scores[n]
            elif (n, beta) in other:
                s = other[(n, beta)]
            else:
                continue  # dropped by the coarse balance round
            if len(betas) > 1:
                refined[f"{n} @ {beta:g}"] = s
            if s < best[0]:
                best = (s, n, float(beta))
    s, n, beta = best
    return Decision(name=n, bands=list(cands[n]), beta=beta, score=s, scores=scores, refined=refined, coarse=coarse,
                    coarse_balances=coarse_balances)


def decide(opt, i: int, layer_stats, objective, geo, band_proxy, progress=None) -> Decision:
    """Layer i's FreqFold bands and key/value balance, as the conversion options `opt` (pipeline.ConvertOptions) ask:
    given (a plan, a uniform F) or searched (the adaptive modes); `layer_stats` a calibrate.LayerStats, `objective`
    its calibrate.ResidualScore, band_proxy() the shortlisting proxy (built only when the candidates need it)."""
    d, c = geo.d, geo.c
    if opt.plan is not None:
        bands = [tuple(b) for b in opt.plan[i]]
        validate_bands(bands, d, c)
        cands = {"plan": bands}
    elif opt.freqfold in MODES:
        cands = layer_candidates(opt.freqfold, d, c)
        if len(cands) > opt.max_candidates:
            cands = shortlist(cands, band_proxy(), opt.max_candidates)
    else:
        cands = {f"F={int(opt.freqfold)}": uniform_bands(d, int(opt.freqfold))}
    betas = opt.betas if opt.pca_metric == "attn" and not opt.skip_pca else (1.0,)
    R_id = np.eye(max_rank(geo.n_kv, d, geo.rope_dim)) if opt.skip_pca else None
    # fast: candidates built from per-layer products (LatentPCA, the same layers to float tolerance), all scored in
    # full unless the options ask for successive halving (`choose`); exhaustive: every candidate built as it is
    # exported. The exported layer is built by layer_stats.build either way.
    fast = opt.freqfold_search == "fast"
    build = layer_stats.fast_build if fast else layer_stats.build
    workers = opt.search_workers or default_workers()
    if workers > 1:  # what every candidate reads, computed once here so the forked workers share it
        layer_stats.prepare_search(cands.values(), fast)

    def score_of(bands, beta):
        return objective(build(bands, beta, R_override=R_id)[0])

    coarse_of = None
    if fast and (opt.search_survivors or opt.search_balance_survivors):
        coarse = objective.subsample(opt.search_subsample, opt.search_windows)

        def coarse_of(bands, beta):
            return coarse(build(bands, beta, R_override=R_id)[0])

    return choose(cands, score_of, betas, opt.finalists, progress, coarse_of, opt.search_survivors, workers,
                  opt.search_balance_survivors)
