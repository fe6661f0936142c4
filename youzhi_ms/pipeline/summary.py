"""The pipeline's summary: one row per evaluated model (held-out general and domain perplexity, each also as a
multiple of the source's, MCQ accuracy, the time and peak memory of the stage that made the model and of its
evaluation), the export / plan stages, and the two trade-offs the domain step is judged by: forgetting (general ppl
after the domain step against after GKD) and the domain gain (domain ppl after the domain step against the source's).
Written as summary.md (the table printed at the end), summary.json and summary.png."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from youzhi_ms.pipeline.stages import EVALUATED

MAKER = {"source": "source", "mla": "convert", "gkd": "gkd", "domain": "domain"}
LABEL = {"source": "source (GQA)", "mla": "MLA, training-free", "gkd": "after GKD", "domain": "after domain step"}


def _gib(mib: Optional[float]) -> Optional[float]:
    return None if mib is None else round(mib / 1024.0, 2)


def build_summary(cfg: Dict[str, Any], state: Dict[str, Any]) -> Dict[str, Any]:
    st = state["stages"]
    evals = {m: st.get(f"eval_{m}", {}).get("result") for m in EVALUATED}
    src = evals.get("source") or {}
    rows: List[Dict[str, Any]] = []
    for m in EVALUATED:
        e = evals.get(m)
        if not e:
            continue
        made, ev = st.get(MAKER[m], {}), st.get(f"eval_{m}", {})
        row = {"model": m, "label": LABEL[m], "dir": e.get("model_dir")}
        for kind in ("general", "domain"):
            ppl = e[kind]["ppl"]
            row[f"{kind}_ppl"] = ppl
            row[f"{kind}_x_source"] = ppl / src[kind]["ppl"] if src.get(kind) else None
        row["mcq_acc"] = e["mcq"]["acc"] if e.get("mcq") else None
        row["stage_seconds"] = made.get("seconds")
        row["stage_peak_gib"] = _gib(made.get("peak_rss_mib"))
        row["eval_seconds"] = ev.get("seconds")
        row["eval_peak_gib"] = _gib(ev.get("peak_rss_mib"))
        if m in ("gkd", "domain"):
            row["steps"] = made.get("result", {}).get("steps")
        rows.append(row)
    other = [{"stage": n, "seconds": st.get(n, {}).get("seconds"), "peak_gib": _gib(st.get(n, {}).get("peak_rss_mib")),
              "result": st.get(n, {}).get("result")} for n in ("mindir", "gguf", "plan")]
    by = {r["model"]: r for r in rows}
    trade = {}
    if "gkd" in by and "domain" in by:
        g, d = by["gkd"], by["domain"]
        trade["forgetting_general"] = d["general_ppl"] / g["general_ppl"] - 1  # > 0: general text got harder
        trade["domain_gain_vs_gkd"] = 1 - d["domain_ppl"] / g["domain_ppl"]
    if "source" in by and "domain" in by:
        trade["domain_vs_source"] = by["domain"]["domain_ppl"] / by["source"]["domain_ppl"]
    total = sum(v.get("seconds") or 0 for v in st.values())
    return {"rows": rows, "other_stages": other, "trade_off": trade, "total_stage_seconds": round(total, 1),
            "eval": {k: cfg["eval"][k] for k in ("general_text", "domain_text", "max_tokens", "seq_len", "mcq")},
            "gkd_steps": cfg["gkd"]["max_steps"], "domain_steps": cfg["domain"]["max_steps"],
            "domain_corpus": cfg["domain"]["corpus"]}


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def render_table(s: Dict[str, Any]) -> str:
    e = s["eval"]
    lines = [f"general = {e['general_text']}, domain = {e['domain_text']} (held out; first {e['max_tokens']} tokens, "
             f"windows of {e['seq_len']}); domain training corpus {s['domain_corpus']}", "",
             "| model | general ppl | x source | domain ppl | x source | MCQ acc | stage s | stage peak GiB | eval s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        label = r["label"] + (f" ({r['steps']} steps)" if r.get("steps") else "")
        lines.append(f"| {label} | {_f(r['general_ppl'], '.3f')} | {_f(r['general_x_source'], '.3f')} | "
                     f"{_f(r['domain_ppl'], '.3f')} | {_f(r['domain_x_source'], '.3f')} | {_f(r['mcq_acc'], '.4f')} | "
                     f"{_f(r['stage_seconds'], '.0f')} | {_f(r['stage_peak_gib'], '.2f')} | "
                     f"{_f(r['eval_seconds'], '.0f')} |")
    lines += ["", "| stage | s | peak GiB | result |", "|---|---|---|---|"]
    for o in s["other_stages"]:
        res = o["result"] or {}
        if res.get("skipped"):
            what = "skipped: " + res["skipped"]
        elif o["stage"] == "plan" and res:
            mc = res["max_concurrency"]
            what = (f"max concurrency source {mc['source']:.1f} -> final {mc['final']:.1f}"
                    + (f" ({res['concurrency_ratio']:.2f}x)" if res.get("concurrency_ratio") else ""))
        else:
            what = res.get("output", "-")
        lines.append(f"| {o['stage']} | {_f(o['seconds'], '.0f')} | {_f(o['peak_gib'], '.2f')} | {what} |")
    t = s["trade_off"]
    if t:
        lines += [""]
        if "forgetting_general" in t:
            lines.append(f"forgetting: general ppl after the domain step {t['forgetting_general'] * 100:+.2f}% vs "
                         f"after GKD; domain ppl {-t['domain_gain_vs_gkd'] * 100:+.2f}% vs after GKD")
        if "domain_vs_source" in t:
            lines.append(f"domain gain: domain ppl after the domain step = {t['domain_vs_source']:.3f}x the source's")
    lines.append(f"all stages: {s['total_stage_seconds']:.0f} s")
    return "\n".join(lines)


def plot_summary(s: Dict[str, Any], png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = s["rows"]
    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, marker in (("general", "o"), ("domain", "s")):
        ax.plot(x, [r[f"{kind}_x_source"] for r in rows], marker=marker,
                label=f"{kind} ({s['eval'][kind + '_text']})")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x)
    ax.set_xticklabels([r["label"] for r in rows], fontsize=8)
    ax.set_ylabel("held-out perplexity / source's")
    ax.set_title("YouZhi pipeline: perplexity after each stage")
    for i, r in enumerate(rows):
        ax.annotate(f"{r['general_ppl']:.1f} / {r['domain_ppl']:.1f}", (i, r["general_x_source"]),
                    textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_summary(out: str, cfg: Dict[str, Any], state: Dict[str, Any], say=print) -> Dict[str, Any]:
    from youzhi_ms.fsutil import atomic_output_file, write_json_output
    s = build_summary(cfg, state)
    table = render_table(s)
    s["table"] = table
    write_json_output(os.path.join(out, "summary.json"), s, overwrite=True, flag="the summary")
    with atomic_output_file(os.path.join(out, "summary.md"), overwrite=True, flag="the summary") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(table + "\n")
    if s["rows"]:
        with atomic_output_file(os.path.join(out, "summary.png"), overwrite=True, flag="the summary plot") as tmp:
            plot_summary(s, tmp + ".png")
            os.replace(tmp + ".png", tmp)
    say("")
    say(table)
    return s
