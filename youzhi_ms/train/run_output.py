"""A training run's output_dir: the output rule, what the run records there, its checkpoints and its exports.

    output_dir/
      run_config.yaml        the validated config of the run (rewritten by every invocation)
      loss_log.jsonl         one row a step (loss_log.py); loss_curve.png drawn from it
      checkpoint/step_N/     checkpointing.py (model / pipeline parallel: step_N/rank_R/, one per rank)
      strategy/              MindSpore's per-rank strategy files (model / pipeline parallel, for tools/merge_slices.py)
      ranks/rank_R.json      each rank's summary of the invocation
      hf_model/              the trained student as a Hugging Face directory (data parallel, at max_steps)

output_dir follows fsutil's output rule: never an input, never a directory another program wrote. Its marker lists
what the run writes, each entry added before it is first written, so `--overwrite` removes exactly that.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import yaml

from youzhi_ms.checkpoint.hf import ShardedWriter, read_config, write_model_files
from youzhi_ms.checkpoint.mindspore_ckpt import hf_state_dict_from_model, model_kind
from youzhi_ms.errors import YouzhiError
from youzhi_ms.fsutil import (atomic_output_dir, check_not_input, check_output_dir, claim_run_dir, output_lock,
                              record_written)
from youzhi_ms.train.checkpointing import RunCheckpoints
from youzhi_ms.train.loss_log import LOSS_LOG, plot_loss_curve, truncate_loss_log

HF_DIR = "hf_model"
RUN_CONFIG_FILE = "run_config.yaml"
LOSS_CURVE = "loss_curve.png"


class RunOutput:
    """output_dir as rank `rank` of `world` sees it. `sharded` (model / pipeline parallel): every rank writes its own
    checkpoint slices and strategy file; otherwise rank 0 writes everything. `inputs`: (flag, path) pairs output_dir
    must not be or lie inside."""

    def __init__(self, out: str, rank: int, world: int, sharded: bool, inputs: Sequence[Tuple[str, Optional[str]]]):
        self.out, self.rank, self.world, self.sharded = out, rank, world, sharded
        self.is_main = rank == 0
        self.inputs = list(inputs)
        self.store = RunCheckpoints(out, rank, sharded)
        self.loss_log = os.path.join(out, LOSS_LOG)

    # ------------------------------------------------------------------------------------------------ the output rule
    def lock(self):
        """Rank 0 holds output_dir's lock for the whole run, so a second run into it is refused at once."""
        return output_lock(self.out, "output_dir")

    def check(self, resume: bool, overwrite: bool) -> None:
        """Before anything is loaded: resume needs a checkpoint; a fresh run must not mix into an old output_dir, and
        output_dir follows the output rule (fsutil): never an input, never someone else's directory."""
        if resume and not self.checkpoints():
            raise YouzhiError(f"resume requested but {self.store.root} has no complete checkpoint; run without "
                              "--resume to start from the student directory")
        if not resume and not overwrite and (self.checkpoints() or os.path.isfile(self.loss_log)):
            raise YouzhiError(f"output_dir {self.out} already holds a run (checkpoints / {LOSS_LOG}); pass --resume "
                              "to continue it, --overwrite to start it over, or choose another output_dir")
        if resume or not self.is_main:  # other ranks: rank 0 may already have claimed output_dir
            check_not_input(self.out, self.inputs, "output_dir")
        else:
            check_output_dir(self.out, overwrite, self.inputs, "output_dir")
        if resume and self.is_main:
            # replaced when the resumed run completes: refuse now, not after the training, if it is not ours
            check_output_dir(os.path.join(self.out, HF_DIR), True, flag="the trained model directory")

    def claim(self, resume: bool, overwrite: bool, start_step: int, raw_config: Dict[str, Any]) -> None:
        """Rank 0: claim output_dir, list what the run writes, cut the loss log back to `start_step` when resuming,
        record the run's config."""
        if not self.is_main:
            return
        claim_run_dir(self.out, overwrite, resume, self.inputs)
        # one entry already there that the run did not write (an adopted folder) is never listed
        strategy = ["strategy/"] + [f"strategy/strategy_rank_{r}.ckpt{t}" for r in range(self.world)
                                    for t in ("", ".tmp")]
        record_written(self.out, [RUN_CONFIG_FILE, LOSS_LOG, LOSS_LOG + ".tmp", LOSS_CURVE, LOSS_CURVE + ".tmp.png",
                                  "ranks/", "checkpoint/", HF_DIR + "/"]
                       + [f"ranks/rank_{r}.json" for r in range(self.world)] + (strategy if self.sharded else []))
        if resume:
            truncate_loss_log(self.loss_log, start_step)
        with open(os.path.join(self.out, RUN_CONFIG_FILE), "w") as f:
            yaml.safe_dump(raw_config, f, sort_keys=False)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def checkpoints(self) -> List[str]:
        """Complete checkpoint step directories (for this rank's files), oldest first."""
        return self.store.complete()

    def step_dir(self, step: int) -> str:
        return self.store.step_dir(step)

    def save_checkpoint(self, step: int, student_params: Iterable, optimizer_params: Iterable, state: dict,
                        keep: int, strategy_file: Optional[str]) -> str:
        """Rank 0 lists the step directory (and its per-rank parts) in the marker before anyone writes it; a sharded
        rank also publishes its strategy file."""
        if self.is_main:
            step_dir = os.path.relpath(self.store.step_dir(step), self.out).replace(os.sep, "/") + "/"
            record_written(self.out, [step_dir] + [f"{step_dir}rank_{r}/" for r in range(self.world)
                                                   if self.sharded])
        if strategy_file is not None:
            self._publish_strategy(strategy_file)
        return self.store.save(step, student_params, optimizer_params, state, keep)

    def load_checkpoint(self, path: str, signature: dict, student_params: Iterable,
                        optimizer_params: Iterable) -> dict:
        return self.store.load(path, signature, student_params, optimizer_params)

    def _publish_strategy(self, strategy_file: str) -> None:
        """This rank's strategy file into `<output_dir>/strategy/` (once: it is written when the graph compiles,
        before output_dir is claimed)."""
        dst = os.path.join(self.out, "strategy", os.path.basename(strategy_file))
        if not os.path.isfile(dst):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(strategy_file, dst + ".tmp")
            os.replace(dst + ".tmp", dst)

    # ------------------------------------------------------------------------------------------------ end of a run
    def write_rank_summary(self, summary: Dict[str, Any]) -> None:
        os.makedirs(os.path.join(self.out, "ranks"), exist_ok=True)
        with open(os.path.join(self.out, "ranks", f"rank_{self.rank}.json"), "w") as f:
            json.dump(summary, f, indent=1)

    def plot_loss_curve(self) -> None:
        plot_loss_curve(self.loss_log, os.path.join(self.out, LOSS_CURVE))

    def export_hf(self, student, student_cfg, student_dir: str, save_dtype: str) -> str:
        """The trained student as a Hugging Face directory next to the checkpoints (rank 0): its weights in
        `save_dtype`, the config.json and tokenizer files of `student_dir`."""
        path = os.path.join(self.out, HF_DIR)
        with atomic_output_dir(path, True, flag="the trained model directory", kind="trained model") as tmp:
            writer = ShardedWriter(tmp, dtype=save_dtype)
            for name, arr in hf_state_dict_from_model(student, model_kind(student_cfg)).items():
                writer.add(name, arr)
            writer.close()
            write_model_files(tmp, read_config(student_dir), student_dir)
        return path
