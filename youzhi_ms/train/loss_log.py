"""The training loss log (`loss_log.jsonl`, one json row per optimizer step, written by rank 0) and its plot.

A row holds step, loss (token mean over the global batch), lr, grad_norm, tokens, on_policy (one flag per
micro-batch), seconds, and `retries` / `skipped` for GKD steps whose loss came out corrupted (see trainer.py). On
resume the log is cut back to the checkpoint's step, so the resumed log equals the uninterrupted one.
"""
from __future__ import annotations

import json
import logging
import os
from typing import List, Optional

from youzhi_ms.errors import YouzhiError

LOSS_LOG = "loss_log.jsonl"
log = logging.getLogger("youzhi_ms.train")


def _rows(path: str) -> List[tuple]:
    """(row, line) pairs. A last line without its newline or not parsing is a torn tail (the process was killed while
    appending it): it is dropped, as a database drops a torn log tail; the checkpoint the run resumes from is older
    than that step, so the step is run and logged again. A bad line elsewhere is damage, refused with its number."""
    with open(path, "rb") as f:
        lines = [ln for ln in f.readlines() if ln.strip()]
    out = []
    for n, raw in enumerate(lines):
        try:
            if not raw.endswith(b"\n"):
                raise ValueError("no newline")
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a loss row")
        except ValueError:
            if n == len(lines) - 1:
                log.warning("%s: dropped a torn last line (the run was killed while writing it)", path)
                break
            raise YouzhiError(f"{path}: line {n + 1} is not a loss-log row; the file is damaged: delete that line "
                              "(or the file) and run again") from None
        out.append((row, raw.decode("utf-8")))
    return out


def read_loss_log(path: str) -> List[dict]:
    return [row for row, _ in _rows(path)]


def append_row(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_loss_log(path: str, step: int) -> None:
    """Keep the rows of steps <= `step` (replaced through a temp file, so an interruption leaves the old log)."""
    if not os.path.isfile(path):
        return
    rows = [line for row, line in _rows(path) if row["step"] <= step]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)


def plot_loss_curve(log_path: str, png_path: str, title: Optional[str] = None) -> Optional[str]:
    """Loss (applied steps; on-policy batches marked, skipped steps as red lines) and learning rate per step."""
    if not os.path.isfile(log_path):
        return None
    rows = read_loss_log(log_path)
    if not rows:
        return None
    # lazy, and in this order: the Agg backend must be chosen before pyplot is imported (no display on a training
    # host), and matplotlib's import (seconds) is paid only by the run that writes the plot
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    good = [r for r in rows if not r.get("skipped")]  # their corrupted losses would flatten the curve
    ax.plot([r["step"] for r in good], [r["loss"] for r in good], lw=1.2, label="loss")
    onp = [(r["step"], r["loss"]) for r in good if any(r.get("on_policy", []))]
    if onp:
        ax.scatter(*zip(*onp), s=10, c="tab:orange", label="on-policy batch", zorder=3)
    bad = [r["step"] for r in rows if r.get("skipped")]
    if bad:
        for x in bad:
            ax.axvline(x, c="tab:red", lw=0.6, alpha=0.6)
        ax.plot([], [], c="tab:red", lw=0.6, label=f"skipped: loss out of range ({len(bad)} steps, not drawn)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (token mean)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in rows], c="gray", lw=0.8, ls="--", label="learning rate")
    ax2.set_ylabel("learning rate")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper right")
    ax.set_title(title or os.path.basename(os.path.dirname(os.path.abspath(log_path))))
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
