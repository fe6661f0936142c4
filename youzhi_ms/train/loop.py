"""The training loop over a `trainer.Trainer`: how many steps, what is reported and saved when, and when a run stops.

The trainer knows what one optimizer step is (`train_step`) and how to save or restore its state; this module drives
it: check output_dir, set up, restore (resume), then steps until `max_steps` or `runner_config.stop_at_step`, each
step's row appended to the loss log with the progress bar and LossMonitor lines (rank 0), a checkpoint every
`save_checkpoint_steps` and at the end, and a stop (state saved) after the step guard's limit of skipped steps. At the
end every rank writes its summary; rank 0 draws the loss curve and exports the trained student.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import math
import resource
import sys
import time
from typing import Any, Dict, List, Optional

from youzhi_ms.errors import YouzhiError
from youzhi_ms.progress import ProgressBar
from youzhi_ms.train.loss_log import append_row

log = logging.getLogger("youzhi_ms.train")


def run_training(trainer, resume: bool = False, progress: Optional[bool] = None,
                 overwrite: bool = False) -> Dict[str, Any]:
    """`overwrite`: start over in an output_dir holding an earlier youzhi_ms run (what it wrote is removed). Rank 0
    holds output_dir's lock throughout, so a second run into it is refused at once."""
    try:
        with trainer.output.lock() if trainer.is_main else contextlib.nullcontext():
            return _run(trainer, resume, progress, overwrite)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            done = trainer.checkpoints()
            exc.add_note(f"the newest complete checkpoint {done[-1]} is kept: run the same command with --resume "
                         "to continue from it" if done else "no checkpoint was complete yet: the run starts over")
        raise


def _run(trainer, resume: bool, progress: Optional[bool], overwrite: bool) -> Dict[str, Any]:
    resume = resume or trainer.run_config.resume_training
    trainer._check_output(resume, overwrite)
    trainer._setup_models()
    trainer._setup_data()
    start = trainer._prepare_output(resume, overwrite)
    runner, max_steps = trainer.run_config.runner, trainer.max_steps
    stop_at, save_every = runner.stop_at_step, trainer.run_config.save_checkpoint_steps
    show = trainer.is_main and (runner.progress if progress is None else progress) and sys.stderr.isatty()
    bar = ProgressBar(total=max_steps, initial=start, desc=trainer.run_mode, unit="step", disable=not show)
    rows = []
    step = start
    t_run = time.time()
    last_saved = None
    while step < max_steps:
        if stop_at is not None and step >= stop_at:
            break
        row = trainer.train_step(step)
        step += 1
        if not math.isfinite(row["loss"]):
            raise YouzhiError(f"the loss became {row['loss']} at step {step}; lower lr_schedule.learning_rate or "
                              "check the data (resume from the last checkpoint with --resume)")
        rows.append(row)
        if trainer.is_main:
            _report(trainer, row, bar, show)
        _stop_after_corrupted_steps(trainer, row, step, bar)
        if (save_every and step % save_every == 0) or step == max_steps or step == stop_at:
            trainer.save_checkpoint(step)
            last_saved = step
    bar.close()
    return _finish(trainer, start, step, rows, time.time() - t_run, last_saved)


def _report(trainer, row: dict, bar, show: bool) -> None:
    """Rank 0: the loss log row, the progress bar, and a LossMonitor line every per_print_times steps."""
    append_row(trainer.output.loss_log, row)
    bar.update(1)
    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
    print_every, max_steps = trainer.run_config.print_every, trainer.max_steps
    step = row["step"]
    if print_every and (step % print_every == 0 or step == max_steps):
        grad_norm = "skipped" if row.get("skipped") else f"{row['grad_norm']:.4f}"
        msg = (f"step {step}/{max_steps} loss {row['loss']:.6f} lr {row['lr']:.3e} "
               f"grad_norm {grad_norm} {row['seconds']:.2f}s/step"
               f"{' on-policy' if any(row['on_policy']) else ''}")
        if not show:  # the bar shows the same numbers
            log.info(msg)


def _stop_after_corrupted_steps(trainer, row: dict, step: int, bar) -> None:
    if trainer.guard.count(row):
        bar.close()
        trainer.save_checkpoint(step)  # skipped steps changed nothing: this is the last good state
        raise trainer.guard.stop_error(step, trainer.output.step_dir(step))


def _finish(trainer, start: int, step: int, rows: List[dict], seconds: float, last_saved) -> Dict[str, Any]:
    """Per-rank summary json; rank 0 draws the loss curve and, at max_steps, exports the Hugging Face student."""
    result = {"start_step": start, "end_step": step, "steps_run": step - start, "rank": trainer.rank,
              "world": trainer.world, "seconds": round(seconds, 3), "last_checkpoint": last_saved,
              "losses": [r["loss"] for r in rows], "weights_sha256": trainer.weights_digest(),
              "loss_log": trainer.output.loss_log, "peak_rss_mib": peak_rss_mib()}
    trainer.output.write_rank_summary({k: v for k, v in result.items() if k != "losses"})
    if trainer.is_main:
        trainer.output.plot_loss_curve()
        if step == trainer.max_steps and not trainer.sharded:
            result["hf_model"] = trainer.export_hf()
        elif step == trainer.max_steps:
            log.warning("model/pipeline parallel: the final weights are the per-rank slices in %s; merge them "
                        "into a Hugging Face directory with tools/merge_slices.py --run %s",
                        trainer.checkpoints()[-1], trainer.out)
    return result


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (what decides whether workers fit side by side on one machine)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)  # KiB on Linux
