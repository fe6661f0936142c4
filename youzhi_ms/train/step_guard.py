"""The guard against corrupted GKD steps: a loss the generalized JSD cannot take is never applied.

A token-mean generalized JSD (0 < jsd_beta < 1) is at most `losses.jsd_upper_bound(jsd_beta)`. A step whose loss is
above it was computed wrongly (seen with MindSpore 2.10 on CPU: ~1e4 on some steps of some runs, with corrupted
gradients that ruined a run): its gradients are dropped and the step computed again, `CORRUPT_RETRIES` times, then
skipped (no update). `CORRUPT_STEPS_MAX` skipped steps in a row stop the run (the trainer saves its state first, so
`--resume` continues in a fresh process).
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Tuple

from youzhi_ms.errors import YouzhiError
from youzhi_ms.train.losses import jsd_upper_bound

log = logging.getLogger("youzhi_ms.train")

CORRUPT_RETRIES = 1       # recomputations of a GKD step whose loss is out of range
CORRUPT_STEPS_MAX = 3     # consecutive skipped steps before the run stops (state saved; --resume continues)


class StepGuard:
    """`jsd_beta`: the distillation's JSD mix (None: SFT, nothing to check). Counts skipped steps in a row."""

    def __init__(self, jsd_beta: Optional[float]):
        self.jsd_beta = jsd_beta
        self.loss_bound = jsd_upper_bound(jsd_beta) if jsd_beta is not None else None
        self.skipped_in_a_row = 0

    def out_of_range(self, loss: float) -> bool:
        return self.loss_bound is not None and loss > self.loss_bound * (1.0 + 1e-4) + 1e-6

    def accumulated_update(self, step: int, accumulate: Callable[[], float], apply: Callable[[], float],
                           drop: Callable[[], None], row: dict) -> None:
        """`accumulate()` computes the step's micro-batches into the gradient accumulators and returns the global
        loss; in range, `apply()` updates and returns the gradient norm; out of range, `drop()` zeroes the
        accumulators and the step is computed again, then skipped. Fills `row` (loss, grad_norm, retries, skipped)."""
        for attempt in range(1 + CORRUPT_RETRIES):
            row["loss"] = accumulate()
            if not self.out_of_range(row["loss"]):
                row["grad_norm"] = apply()
                break
            drop()
            if attempt < CORRUPT_RETRIES:
                row["retries"] = attempt + 1
            log.warning("step %d: loss %.6g exceeds %.4f, the largest value the generalized JSD (distill.beta %g) can "
                        "take: a corrupted computation; its gradients are dropped%s", step + 1, row["loss"],
                        self.loss_bound, self.jsd_beta,
                        " and the step is computed again" if attempt < CORRUPT_RETRIES else
                        " and the step is skipped (no update)")
        else:
            row["skipped"] = True

    def checked_in_graph(self, step: int, run_graph: Callable[[], Tuple[float, float, bool]], row: dict) -> None:
        """Model / pipeline parallel: `run_graph()` computes, checks and (if the loss is in range) applies the step
        in one graph, returning (global loss, gradient norm, applied); a rejected step changed nothing, so it is
        computed once more, then skipped. Fills `row` like accumulated_update."""
        for attempt in range(1 + CORRUPT_RETRIES):
            row["loss"], norm, applied = run_graph()
            if applied:
                row["grad_norm"] = norm
                break
            if attempt < CORRUPT_RETRIES:
                row["retries"] = attempt + 1
            log.warning("step %d: loss %.6g exceeds %.4f (generalized JSD maximum): a corrupted computation; "
                        "nothing was applied%s", step + 1, row["loss"], self.loss_bound,
                        ", computing the step again" if attempt < CORRUPT_RETRIES else ", the step is skipped")
        else:
            row["skipped"] = True

    def count(self, row: dict) -> bool:
        """After each step: True when the run must stop (CORRUPT_STEPS_MAX skipped steps in a row)."""
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if row.get("skipped") else 0
        return self.skipped_in_a_row >= CORRUPT_STEPS_MAX

    def stop_error(self, step: int, saved_dir: str) -> YouzhiError:
        return YouzhiError(f"{self.skipped_in_a_row} steps in a row (up to step {step}) computed a loss above the "
                           f"generalized JSD's maximum {self.loss_bound:.4f}, i.e. corrupted values, and were "
                           f"skipped. The state is saved in {saved_dir}; run the same command with --resume to "
                           "continue from it in a fresh process")
