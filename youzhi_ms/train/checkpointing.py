"""Training checkpoints: what a step directory holds, how it is written and read back, and when it may be resumed.

`checkpoint/step_XXXXXXXX/` (model / pipeline parallel: `step_XXXXXXXX/rank_R/`, one per rank) holds

- `student.safetensors`: every student weight (MindSpore names, float32),
- `optimizer.safetensors`: the AdamW moments `adam_m.*` / `adam_v.*`,
- `trainer_state.json`: step, data position, the on-policy coin's PCG64 state (128-bit integers as [high, low] uint64
  words: json has no 128-bit integers, and pickle is never used), the run signature, world size.

A step directory is written through `fsutil.atomic_output_dir`, so it either exists complete (its state file present)
or not at all; only the newest `keep` are kept. The run signature names what must not change across a resume (mode,
global batch, sequence length, the trainable parameter set, seed): resuming with another one is refused, because the
resumed run would no longer reproduce the uninterrupted one.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import time
from typing import Iterable, List

import numpy as np
import mindspore as ms

from youzhi_ms.checkpoint.hf import HFCheckpoint, save_safetensors, write_json
from youzhi_ms.errors import YouzhiError
from youzhi_ms.fsutil import atomic_output_dir, written_exactly

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoint"
STATE_FILE = "trainer_state.json"
STUDENT_FILE = "student.safetensors"
OPTIM_FILE = "optimizer.safetensors"
STATE_VERSION = 1
SIGNATURE_KEYS = ("run_mode", "global_batch", "seq_length", "trainable", "seed")  # must match to resume


# ------------------------------------------------------------------------------------------------------ rng <-> json
def _u128_words(x: int) -> List[int]:
    return [int(x >> 64), int(x & ((1 << 64) - 1))]


def rng_state_to_json(rng: np.random.Generator) -> dict:
    """A PCG64 generator's state as plain json (128-bit integers as [high, low] uint64 words)."""
    st = rng.bit_generator.state
    if st["bit_generator"] != "PCG64":
        raise ValueError("only PCG64 generators are checkpointed")
    return {"bit_generator": "PCG64", "state": _u128_words(st["state"]["state"]),
            "inc": _u128_words(st["state"]["inc"]), "has_uint32": int(st["has_uint32"]),
            "uinteger": int(st["uinteger"])}


def rng_from_json(d: dict) -> np.random.Generator:
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = {"bit_generator": "PCG64",
                               "state": {"state": (d["state"][0] << 64) | d["state"][1],
                                         "inc": (d["inc"][0] << 64) | d["inc"][1]},
                               "has_uint32": d["has_uint32"], "uinteger": d["uinteger"]}
    return rng


def check_signature(path: str, saved: dict, now: dict) -> None:
    for k in SIGNATURE_KEYS:
        if saved.get(k) != now.get(k):
            shown = "the trainable parameter set" if k == "trainable" else f"{k}={saved.get(k)!r}"
            raise YouzhiError(f"{path} was made with {shown}, this run has "
                              f"{'another' if k == 'trainable' else repr(now.get(k))}; resume with the same "
                              "configuration (global batch = batch_size x workers x accumulation)")


def _set_params(params: Iterable, path: str) -> None:
    stored = HFCheckpoint.from_file(path)
    for p in params:
        p.set_data(ms.Tensor(stored.get(p.name, expect_shape=tuple(p.shape)), p.dtype))


class RunCheckpoints:
    """The checkpoints of one run (`<output_dir>/checkpoint/`) as one rank sees them. `sharded`: every rank keeps its
    own parameter slices in `step_N/rank_R/` (model / pipeline parallel); otherwise rank 0's files are the state."""

    def __init__(self, output_dir: str, rank: int, sharded: bool):
        self.root = os.path.join(output_dir, CKPT_DIR)
        self.rank = rank
        self.sharded = sharded

    def step_dir(self, step: int) -> str:
        return os.path.join(self.root, f"step_{step:08d}")

    def files_dir(self, step_dir: str) -> str:
        return os.path.join(step_dir, f"rank_{self.rank}") if self.sharded else step_dir

    def complete(self) -> List[str]:
        """Complete step directories (for this rank's files), oldest first."""
        found = [d for d in glob.glob(os.path.join(self.root, "step_*"))
                 if os.path.isfile(os.path.join(self.files_dir(d), STATE_FILE))]
        return sorted(found, key=lambda d: int(os.path.basename(d).split("_")[1]))

    def save(self, step: int, student_params: Iterable, optimizer_params: Iterable, state: dict, keep: int) -> str:
        """Write step `step` atomically (`state`: the json-able trainer state; version and time are added), then
        delete all but the newest `keep` complete checkpoints."""
        path = self.step_dir(step)
        with atomic_output_dir(self.files_dir(path), True, flag="checkpoint directory", kind="checkpoint") as tmp:
            save_safetensors(os.path.join(tmp, STUDENT_FILE), [(p.name, p.asnumpy()) for p in student_params],
                             dtype="fp32")
            save_safetensors(os.path.join(tmp, OPTIM_FILE), [(p.name, p.asnumpy()) for p in optimizer_params],
                             dtype="fp32")
            write_json(os.path.join(tmp, STATE_FILE), {"version": STATE_VERSION, "step": step, **state,
                                                       "time": time.strftime("%Y-%m-%d %H:%M:%S")})
        for old in self.complete()[:-keep]:
            if not written_exactly(self.files_dir(old)):  # someone put a file of their own into it: keep it all
                log.warning("keeping the old checkpoint %s: it holds files the run did not write", old)
                continue
            shutil.rmtree(self.files_dir(old), ignore_errors=True)
            if self.sharded and os.path.isdir(old) and not os.listdir(old):
                os.rmdir(old)
        return path

    def load(self, step_dir: str, signature: dict, student_params: Iterable, optimizer_params: Iterable) -> dict:
        """Check the saved run signature against `signature`, load weights and moments into the given Parameters
        (by name, shape-checked) and return the saved trainer state."""
        path = self.files_dir(step_dir)
        try:
            with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
                state = json.load(f)
            if not isinstance(state, dict) or not isinstance(state.get("signature"), dict) or \
                    not isinstance(state.get("step"), int) or not {"data", "rng"} <= set(state):
                raise ValueError("fields missing")
        except (OSError, ValueError) as exc:
            raise YouzhiError(f"{os.path.join(path, STATE_FILE)} is damaged ({exc}); delete {step_dir} to resume "
                              "from the checkpoint before it") from None
        check_signature(path, state["signature"], signature)
        _set_params(student_params, os.path.join(path, STUDENT_FILE))
        _set_params(optimizer_params, os.path.join(path, OPTIM_FILE))
        return state
