"""The conversion report: a readable markdown summary and a PNG of the per-layer FreqFold choice and its errors."""
from __future__ import annotations

import numpy as np

COLUMNS = """\
Columns:
- **choice**: the candidate the search kept (`F=4` = uniform bands of 4 frequencies; `2x4,4x2,16x1` = four bands of
  2, then two of 4, then one of 16, from the highest frequency to the lowest; `plan` = given by --freqfold-plan).
- **residual error**: what the search minimised, the squared error of the residual stream after this layer's attention
  block (input from the already-converted layers) against the original model's, relative to the energy of the
  original attention output, on the proxy windows. It counts the drift of earlier layers, so it can grow with depth
  even when the layer itself converts well.
- **attention error**: the built layer's own error, its attention output against the source attention on the same
  inputs (relative squared error), without upstream drift.
- **K/V balance**: the weight of key errors against value errors in the attention-aware latent PCA (1 = equal total
  error energy), chosen per layer by the same residual error; `-` for TransMLA's balanced PCA.
- **alpha**: the key/value norm ratio the latent is balanced with (mean per-dimension norm of NoPE keys over values).
- **PCA energy kept**: share of the (metric-weighted) latent energy inside the kv_lora_rank components.
"""


def _rank(scores: dict) -> str:
    return ", ".join(f"{k}: {v:.4f}" for k, v in sorted(scores.items(), key=lambda kv: kv[1]))


def write_markdown(rep: dict, path: str) -> None:
    lines = ["# GQA -> MLA conversion report", "",
             f"- source: `{rep['source']}` ({rep['source_model_type']})",
             f"- export: {rep['export']}; kv_lora_rank {rep['kv_lora_rank']}, qk_rope_head_dim "
             f"{rep['qk_rope_head_dim']} (c = {rep['collapse_c']})",
             f"- KV cache per token per layer: GQA {rep['cache_values_per_token_per_layer']['gqa']} -> MLA "
             f"{rep['cache_values_per_token_per_layer']['mla']} values ({rep['cache_ratio']:.2f}x smaller)",
             f"- FreqFold mode: {rep['freqfold_mode']} (search: {rep.get('freqfold_search', 'exhaustive')}); latent "
             f"PCA: {rep.get('pca_metric', 'attn')}; statistics: {rep.get('stats', 'cascaded')}",
             f"- calibration: {rep['calibration']['text']}, {rep['calibration']['tokens']} tokens (candidates "
             f"scored on {rep['calibration']['proxy_tokens']})",
             f"- time: {rep['seconds']} s", ""]
    if rep.get("auto_trace"):
        lines += ["## auto search (calibration perplexity)", "", "| F | calib ppl |", "|---|---|"]
        lines += [f"| {t['F']} | {t['calib_ppl']:.4f} |" for t in rep["auto_trace"]] + [""]
    deep = rep["export"] == "deepseek"
    lines += ["## per layer", "", "| layer | choice | residual error | attention error | K/V balance | alpha | "
              "PCA energy kept |" + (" refit error before -> after |" if deep else ""),
              "|---|---|---|---|---|---|---|" + ("---|" if deep else "")]
    for L in rep["layers"]:
        beta = f"{L['beta']:g}" if L.get("refined") else "-"
        row = (f"| {L['layer']} | {L['choice']} | {L['score']:.4f} | {L['attn_rel_err']:.4f} | {beta} | "
               f"{L['alpha']:.3f} | {L['pca_energy_kept']:.4f} |")
        if deep and L.get("refit"):
            row += f" {L['refit']['rel_err_norm_only']:.3g} -> {L['refit']['rel_err_refit']:.3g} |"
        lines.append(row)
    lines += ["", COLUMNS]
    if any(len(L["scores"]) > 1 or L.get("refined") for L in rep["layers"]):
        lines += ["## the search, per layer (residual error; lower is better)", "",
                  "Every candidate is built at K/V balance 1; the best three are then built at every balance "
                  "(`name @ balance`). The layer keeps the smallest of all these, so its residual error above equals "
                  "one entry here. With the fast search (`--freqfold-search fast`) every candidate is first scored "
                  "on a subsample of the scoring positions (`first round`, its own scale) and only the best few in "
                  "full; the finalists' other balances likewise (`balances, first round`), the best few of those "
                  "pairs in full.", ""]
        for L in rep["layers"]:
            lines.append(f"- layer {L['layer']}: {_rank(L['scores'])}")
            if L.get("coarse"):
                lines.append(f"  - first round ({len(L['coarse'])} tilings): {_rank(L['coarse'])}")
            if L.get("coarse_balances"):
                lines.append(f"  - balances, first round: {_rank(L['coarse_balances'])}")
            if L.get("refined"):
                lines.append(f"  - finalists: {_rank(L['refined'])}")
    if rep["warnings"]:
        lines += ["", "## deployment warnings", ""] + [f"- {w}" for w in rep["warnings"]]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plot(rep: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap
    layers = rep["layers"]
    n = len(layers)
    nfreq = sum(b[1] for b in layers[0]["bands"])
    sizes = []
    F = rep["collapse_c"]
    while F <= nfreq:
        sizes.append(F)
        F *= 2
    grid = np.zeros((n, nfreq))
    for L in layers:
        for f, F in L["bands"]:
            grid[L["layer"], f:f + F] = sizes.index(F) if F in sizes else np.nan
    # one clearly distinct colour per fold size (a qualitative map: F=2 and F=4 must not look alike)
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"][:len(sizes)]
    cmap = ListedColormap(colours)
    norm = BoundaryNorm(np.arange(len(sizes) + 1) - 0.5, len(sizes))
    fig, axes = plt.subplots(1, 2, figsize=(12, max(3.5, 0.18 * n + 1.5)), gridspec_kw={"width_ratios": [3, 2]})
    im = axes[0].imshow(grid, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    for L in layers:  # band edges, so neighbouring bands of the same size stay visible
        for f, F in L["bands"][1:]:
            axes[0].plot([f - 0.5, f - 0.5], [L["layer"] - 0.5, L["layer"] + 0.5], color="white", lw=0.8)
    axes[0].set_xlabel("RoPE frequency index j (0 = highest frequency)")
    axes[0].set_ylabel("layer")
    axes[0].set_title(f"FreqFold band size per frequency ({rep['freqfold_mode']})")
    cb = fig.colorbar(im, ax=axes[0], ticks=np.arange(len(sizes)))
    cb.ax.set_yticklabels([f"F={F}" for F in sizes])
    cb.set_label("fold size F of the band")
    axes[1].semilogx([L["score"] for L in layers], range(n), "o-", color="k", label="chosen")
    names = sorted({k for L in layers for k in L["scores"] if k.startswith("F=")}, key=lambda s: int(s[2:]))
    for name in names:
        vals = [L["scores"].get(name, np.nan) for L in layers]
        if np.isfinite(vals).any() and any(len(L["scores"]) > 1 for L in layers):
            axes[1].semilogx(vals, range(n), ".", alpha=0.7, label=f"uniform {name}")
    axes[1].invert_yaxis()
    axes[1].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[1].set_xlabel("residual-stream error after the attention block (calibration)")
    axes[1].set_title(f"r={rep['kv_lora_rank']}+{rep['qk_rope_head_dim']} ({rep['cache_ratio']:.2f}x smaller cache)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
