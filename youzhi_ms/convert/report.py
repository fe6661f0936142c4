"""The conversion report: a readable markdown summary and a PNG of the per-layer FreqFold choice and its errors."""
from __future__ import annotations

import numpy as np


def write_markdown(rep: dict, path: str) -> None:
    lines = ["# GQA -> MLA conversion report", "",
             f"- source: `{rep['source']}` ({rep['source_model_type']})",
             f"- export: {rep['export']}; kv_lora_rank {rep['kv_lora_rank']}, qk_rope_head_dim "
             f"{rep['qk_rope_head_dim']} (c = {rep['collapse_c']})",
             f"- KV cache per token per layer: GQA {rep['cache_values_per_token_per_layer']['gqa']} -> MLA "
             f"{rep['cache_values_per_token_per_layer']['mla']} values ({rep['cache_ratio']:.2f}x smaller)",
             f"- FreqFold mode: {rep['freqfold_mode']}; calibration {rep['calibration']['text']}, "
             f"{rep['calibration']['tokens']} tokens (proxies on {rep['calibration']['proxy_tokens']})",
             f"- time: {rep['seconds']} s", ""]
    if rep.get("auto_trace"):
        lines += ["## auto search (calibration perplexity)", "", "| F | calib ppl |", "|---|---|"]
        lines += [f"| {t['F']} | {t['calib_ppl']:.4f} |" for t in rep["auto_trace"]] + [""]
    lines += ["## per layer", "", "| layer | choice | bands (F x count) | attn rel err | alpha | PCA energy kept |"
              + (" refit err before -> after |" if rep["export"] == "deepseek" else ""),
              "|---|---|---|---|---|---|" + ("---|" if rep["export"] == "deepseek" else "")]
    from youzhi_ms.convert.rorope import describe_bands
    for L in rep["layers"]:
        row = (f"| {L['layer']} | {L['choice']} | {describe_bands([tuple(b) for b in L['bands']])} | "
               f"{L['attn_rel_err']:.4g} | {L['alpha']:.3f} | {L['pca_energy_kept']:.4f} |")
        if rep["export"] == "deepseek" and L.get("refit"):
            row += f" {L['refit']['rel_err_norm_only']:.3g} -> {L['refit']['rel_err_refit']:.3g} |"
        lines.append(row)
    if any(L["proxy_errors"] for L in rep["layers"]):
        lines += ["", "## candidate errors per layer (budget-aware attention-output error; lower is better)", ""]
        for L in rep["layers"]:
            if L["proxy_errors"]:
                cands = ", ".join(f"{k}: {v:.4g}" for k, v in sorted(L["proxy_errors"].items(), key=lambda kv: kv[1]))
                lines.append(f"- layer {L['layer']}: {cands}")
    if rep["warnings"]:
        lines += ["", "## deployment warnings", ""] + [f"- {w}" for w in rep["warnings"]]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plot(rep: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = rep["layers"]
    n = len(layers)
    nfreq = sum(b[1] for b in layers[0]["bands"])
    grid = np.zeros((n, nfreq))
    for L in layers:
        for f, F in L["bands"]:
            grid[L["layer"], f:f + F] = np.log2(F)
    fig, axes = plt.subplots(1, 2, figsize=(12, max(3.5, 0.18 * n + 1.5)), gridspec_kw={"width_ratios": [3, 2]})
    lo, hi = np.log2(rep["collapse_c"]), np.log2(max(nfreq, rep["collapse_c"]))
    im = axes[0].imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest", vmin=lo, vmax=max(hi, lo + 1))
    axes[0].set_xlabel("RoPE frequency index j (0 = highest frequency)")
    axes[0].set_ylabel("layer")
    axes[0].set_title(f"FreqFold band size per frequency ({rep['freqfold_mode']})")
    ticks = np.arange(lo, max(hi, lo + 1) + 1)
    cb = fig.colorbar(im, ax=axes[0], ticks=ticks)
    cb.ax.set_yticklabels([f"F={int(2 ** t)}" for t in ticks])
    cb.set_label("fold size F of the band")
    errs = [L["attn_rel_err"] for L in layers]
    axes[1].semilogx(errs, range(n), "o-", label="chosen")
    if any(L["proxy_errors"] for L in layers):
        names = sorted({k for L in layers for k in L["proxy_errors"] if k.startswith("F=")},
                       key=lambda s: int(s[2:]))
        for name in names:
            axes[1].semilogx([L["proxy_errors"].get(name, np.nan) for L in layers], range(n), ".", alpha=0.5,
                             label=name)
    axes[1].invert_yaxis()
    axes[1].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[1].set_xlabel("attention-output relative error (calibration)")
    axes[1].set_title(f"r={rep['kv_lora_rank']}+{rep['qk_rope_head_dim']} ({rep['cache_ratio']:.2f}x smaller cache)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
