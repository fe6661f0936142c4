"""The per-rank parameter slices of a model / pipeline parallel run turned back into one Hugging Face DeepSeek-V3
directory, with MindSpore's own distributed-checkpoint tooling.

A run's `checkpoint/step_N/rank_R/student.safetensors` holds rank R's slices of the student (MindSpore names) and
`strategy/strategy_rank_R.ckpt` the layout MindSpore compiled for rank R (AutoParallel.save_param_strategy_file).
The merge is MindSpore's: `merge_pipeline_strategys` joins the stages' strategy files, `unified_safetensors` puts
every parameter back together from the slices the strategy names (model-parallel splits, pipeline stages, and the
parallel optimizer's shards). youzhi_ms then checks every tensor against the student's config.json (name, full
shape), renames to Hugging Face names and writes the directory atomically, with the student's config.json and
tokenizer files. Bit-exactness is tested by slicing weights on CPU by the compiled layouts and merging them back
(tests/test_merge_slices.py).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import tempfile
from types import SimpleNamespace
from typing import Callable, Optional

import numpy as np
import yaml
from safetensors import safe_open

from youzhi_ms.checkpoint.hf import ShardedWriter, read_config, write_model_files
from youzhi_ms.cli import path_problem
from youzhi_ms.errors import YouzhiError
from youzhi_ms.fsutil import atomic_output_dir, check_output_dir
from youzhi_ms.models.names import ms_to_hf
from youzhi_ms.train.parallel import param_shapes
from youzhi_ms.train.run_config import load_yaml

STUDENT_FILE = "student.safetensors"
STATE_FILE = "trainer_state.json"


def _rank_dirs(step_dir: str) -> dict:
    out = {}
    for d in glob.glob(os.path.join(step_dir, "rank_*")):
        m = re.fullmatch(r"rank_(\d+)", os.path.basename(d))
        if m and os.path.isdir(d):
            out[int(m.group(1))] = d
    return out


def newest_complete_step(ckpt_root: str, world: Optional[int] = None) -> str:
    """The newest step_N directory in which every rank's slices are complete (its state file written)."""
    steps = []
    for d in glob.glob(os.path.join(ckpt_root, "step_*")):
        m = re.fullmatch(r"step_(\d+)", os.path.basename(d))
        if m:
            steps.append((int(m.group(1)), d))
    for _, d in sorted(steps, reverse=True):
        ranks = _rank_dirs(d)
        n = world or (max(ranks) + 1 if ranks else 0)
        if n and all(r in ranks and os.path.isfile(os.path.join(ranks[r], STATE_FILE)) for r in range(n)):
            return d
    raise YouzhiError(f"{ckpt_root} has no step directory with every rank's slices (rank_R/{STATE_FILE}); the run "
                      "wrote no sharded checkpoint yet, or a rank's files are missing")


def _world_of(step_dir: str) -> int:
    ranks = _rank_dirs(step_dir)
    if not ranks:
        raise YouzhiError(f"{step_dir} has no rank_R/ directories: not a model / pipeline parallel checkpoint")
    with open(os.path.join(ranks[min(ranks)], STATE_FILE)) as f:
        try:
            world = int(json.load(f)["world_size"])
        except (ValueError, KeyError, TypeError):
            raise YouzhiError(f"{ranks[min(ranks)]}/{STATE_FILE} is not a trainer state (no world_size)") from None
    missing = [r for r in range(world) if r not in ranks or not os.path.isfile(os.path.join(ranks[r], STUDENT_FILE))]
    if missing:
        raise YouzhiError(f"{step_dir}: the slices of rank(s) {missing[:8]} are missing ({world} ranks wrote the run); "
                          "copy every node's rank_R/ directories here before merging")
    return world


@contextlib.contextmanager
def _without_memory_throttle():
    """mindspore 2.10's unified_safetensors sleeps after each output part until the machine's memory is less than
    50% used (a brake for its pool of worker processes). With one process on a shared host that is a hang (measured:
    a 2 MB merge waited forever while other jobs held 56% of the memory), so for the duration of the call its view
    of memory reads 0% used; the merge itself holds one output part (<= 3 GB) at a time."""
    import mindspore.parallel.transform_safetensors as ts  # lazy: see merge_slices
    real = ts.psutil
    ts.psutil = SimpleNamespace(virtual_memory=lambda: SimpleNamespace(percent=0.0))
    try:
        yield
    finally:
        ts.psutil = real


def merge_slices(step_dir: str, strategy_dir: str, student_config: dict, workdir: str,
                 log: Callable[[str], None] = print) -> dict:
    """{MindSpore name: full float32 array} of the student, merged by MindSpore from the slices in `step_dir`."""
    # MindSpore is imported here, not at the top: it takes seconds, and merge_run answers a bad --run, --student-dir
    # or output directory before it is needed
    import mindspore as ms  # noqa: F401  (loads the framework before the parallel helpers)
    from mindspore.parallel import merge_pipeline_strategys, unified_safetensors
    world = _world_of(step_dir)
    files = sorted(glob.glob(os.path.join(strategy_dir, "*.ckpt")))
    if not files:
        raise YouzhiError(f"{strategy_dir} holds no strategy files (strategy_rank_R.ckpt, written by the trainer and "
                          "by tools/dryrun.py --strategy-dir)")
    merged_strategy = os.path.join(workdir, "strategy", "merged_strategy.ckpt")
    merge_pipeline_strategys(strategy_dir, merged_strategy)
    # MindSpore's merge reads every safetensors file of a rank directory: give it the student files only
    src = os.path.join(workdir, "slices")
    for r in range(world):
        os.makedirs(os.path.join(src, f"rank_{r}"))
        os.symlink(os.path.abspath(os.path.join(step_dir, f"rank_{r}", STUDENT_FILE)),
                   os.path.join(src, f"rank_{r}", STUDENT_FILE))
    out = os.path.join(workdir, "merged")
    log(f"merging the slices of {world} ranks ({step_dir}) with mindspore.parallel.unified_safetensors")
    with _without_memory_throttle():
        unified_safetensors(src, merged_strategy, out, max_process_num=1)
    expected = param_shapes(student_config)
    tensors = {}
    for path in sorted(glob.glob(os.path.join(out, "*.safetensors"))):
        with safe_open(path, framework="np") as f:
            for name in f.keys():
                if name in tensors:
                    raise YouzhiError(f"the merge wrote {name} twice")
                tensors[name] = f.get_tensor(name)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise YouzhiError(f"the merged slices do not match the student's config.json: missing {missing[:5]}, "
                          f"unexpected {extra[:5]}; merge with the strategy files of the same run")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise YouzhiError(f"merged {name} has shape {tuple(tensors[name].shape)}, config.json says {shape}")
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def merge_run(run_dir: str, output_dir: Optional[str] = None, step: Optional[int] = None,
              strategy_dir: Optional[str] = None, student_dir: Optional[str] = None, dtype: Optional[str] = None,
              overwrite: bool = False, log: Callable[[str], None] = print) -> str:
    """Write the Hugging Face directory of a model / pipeline parallel run's student (default `<run>/hf_model`)."""
    run_dir = os.path.abspath(run_dir)
    if not os.path.isdir(run_dir):
        raise YouzhiError(f"--run {run_dir} {path_problem(run_dir, 'folder')}; pass the training run's output_dir")
    cfg_path = os.path.join(run_dir, "run_config.yaml")
    run_cfg = {}
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            try:
                run_cfg = load_yaml(f) or {}
            except yaml.YAMLError as e:
                raise YouzhiError(f"{cfg_path} is not valid yaml ({' '.join(str(e).split())}); "
                                  "pass --student-dir and --dtype") from None
        if not isinstance(run_cfg, dict):
            raise YouzhiError(f"{cfg_path} is not a run config")
    student_dir = student_dir or (run_cfg.get("model") or {}).get("student")
    if not student_dir:
        raise YouzhiError(f"no student directory: {cfg_path} does not name model.student; pass --student-dir (the "
                          "converted model the run started from: its config.json and tokenizer are copied)")
    dtype = dtype or (run_cfg.get("model") or {}).get("save_dtype") or "bf16"
    if dtype not in ("fp32", "bf16", "fp16"):
        raise YouzhiError(f"--dtype must be fp32, bf16 or fp16, got {dtype!r}")
    student_config = read_config(student_dir)
    ckpt_root = os.path.join(run_dir, "checkpoint")
    step_dir = os.path.join(ckpt_root, f"step_{step:08d}") if step is not None else newest_complete_step(ckpt_root)
    if not os.path.isdir(step_dir):
        raise YouzhiError(f"{step_dir} does not exist; list {ckpt_root} for the saved steps")
    strategy_dir = strategy_dir or os.path.join(run_dir, "strategy")
    output_dir = os.path.abspath(output_dir or os.path.join(run_dir, "hf_model"))
    inputs = [("--run checkpoint", step_dir), ("--strategy-dir", strategy_dir), ("--student-dir", student_dir)]
    check_output_dir(output_dir, overwrite, inputs)  # before the merge, not after it
    work = tempfile.mkdtemp(prefix="youzhi_merge_")
    try:
        tensors = merge_slices(step_dir, strategy_dir, student_config, work, log)
        with atomic_output_dir(output_dir, overwrite, inputs, kind="trained model") as tmp:
            writer = ShardedWriter(tmp, dtype=dtype)
            for name in sorted(tensors):
                writer.add(ms_to_hf(name, "mla"), tensors[name])
            writer.close()
            write_model_files(tmp, read_config(student_dir), student_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {output_dir} ({len(tensors)} tensors, {dtype}) from {step_dir}")
    return output_dir
