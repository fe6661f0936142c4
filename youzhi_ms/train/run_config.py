"""Training run configuration: MindFormers-style yaml sections plus a `distill` section, `--set` overrides, validation.

Every key a run can use is listed in DEFAULTS below (the schema): a yaml file or an override naming any other key is
refused with one message that names the key, the file, and the closest valid spelling. Values of `--set key=value` are
parsed as yaml scalars (`3` -> int, `1e-4` -> float, `true` -> bool, `null` -> None, `[0.9, 0.95]` -> list).
`load_run_config` returns the validated plain dict (each section checked by its own function, SECTION_CHECKS); the
code that runs a config parses it once with `RunConfig.parse` into typed sections (`run.runner.batch_size`).

Sections (MindFormers names where MindFormers has the concept):
  seed, output_dir, run_mode (distill | sft: cross entropy on the responses of chat data, or on every token
                   of a packed text = continued pre-training), resume_training
  context          mode (GRAPH_MODE | PYNATIVE_MODE), device_target (CPU | Ascend | GPU), max_device_memory
  parallel         parallel_mode (data_parallel | semi_auto_parallel), enable_parallel_optimizer (semi-auto: shard the
                   AdamW moments and the weights over the data-parallel replicas)
  parallel_config  data_parallel (null = all workers), model_parallel, pipeline_stage, micro_batch_num,
                   use_seq_parallel, vocab_emb_dp
  model            student (converted MLA Hugging Face dir), trainable (all | attention | attention+norms), save_dtype
  runner_config    max_steps, batch_size (per worker, per micro-batch), gradient_accumulation_steps, seq_length,
                   stop_at_step (end this invocation early, with a checkpoint), progress
  optimizer        type (AdamW), betas, eps, weight_decay, max_grad_norm (<= 0: no clipping)
  lr_schedule      type (CosineWithWarmUpLR), learning_rate, kv_layernorm_learning_rate (null = learning_rate),
                   warmup_ratio / warmup_steps, min_lr_ratio, total_steps (null = max_steps)
  callbacks        list of {type: CheckpointMonitor, save_checkpoint_steps, keep_checkpoint_max} and
                   {type: LossMonitor, per_print_times}
  train_dataset    data_path (wiki-calib | wiki-eval | .txt | .jsonl), format (auto | packed | chat), shuffle,
                   max_tokens (truncate a packed token stream), replay_path / replay_fraction (packed text: windows of
                   a general text mixed in as that fraction of all windows; train/data.py)
  distill          teacher (source GQA Hugging Face dir), beta (the JSD mix), lmbda, temperature, max_new_tokens, top_p,
                   loss (chunked: vocabulary loss in token chunks with a hand-written backward | full: plain logits),
                   loss_chunk_tokens, teacher_graph (joint: teacher forward inside the training graph | separate: in
                   its own no-grad graph), offline_teacher (a tools/make_teacher_topk.py file: no live teacher).
                   Model / pipeline parallel has its own sharded plain loss and needs the live, joint teacher.
  recompute_config recompute (Cell.recompute on every student decoder layer: only the layer inputs are kept, the rest
                   is recomputed in the backward; both the data-parallel and the model / pipeline parallel step)
  dry_run          student_config / teacher_config: a config.json (or its directory) giving the model shapes to
                   tools/dryrun.py when model.student / distill.teacher are not on the machine
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
from typing import Any, Dict, List, Optional, Sequence

import yaml

from youzhi_ms.cli import path_problem
from youzhi_ms.errors import YouzhiError

CALLBACK_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "CheckpointMonitor": {"save_checkpoint_steps": 100, "keep_checkpoint_max": 2},
    "LossMonitor": {"per_print_times": 10},
}

DEFAULTS: Dict[str, Any] = {
    "seed": 0,
    "output_dir": "output/train",
    "run_mode": "distill",
    "resume_training": False,
    "context": {"mode": "GRAPH_MODE", "device_target": "CPU", "max_device_memory": None},
    "parallel": {"parallel_mode": "data_parallel", "enable_parallel_optimizer": False},
    "parallel_config": {"data_parallel": None, "model_parallel": 1, "pipeline_stage": 1, "micro_batch_num": 1,
                        "use_seq_parallel": False, "vocab_emb_dp": True},
    "model": {"student": None, "trainable": "all", "save_dtype": "fp32"},
    "runner_config": {"max_steps": 100, "batch_size": 2, "gradient_accumulation_steps": 1, "seq_length": 256,
                      "stop_at_step": None, "progress": True},
    "optimizer": {"type": "AdamW", "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.01, "max_grad_norm": 1.0},
    "lr_schedule": {"type": "CosineWithWarmUpLR", "learning_rate": 1e-4, "kv_layernorm_learning_rate": None,
                    "warmup_ratio": 0.05, "warmup_steps": None, "min_lr_ratio": 0.1, "total_steps": None},
    "callbacks": [dict(type=k, **v) for k, v in CALLBACK_DEFAULTS.items()],
    "train_dataset": {"data_path": "wiki-calib", "format": "auto", "shuffle": True, "max_tokens": None,
                      "replay_path": None, "replay_fraction": 0.0},
    "distill": {"teacher": None, "beta": 0.5, "lmbda": 0.5, "temperature": 0.9, "max_new_tokens": 128, "top_p": 1.0,
                "loss": "chunked", "loss_chunk_tokens": 128, "teacher_graph": "joint", "offline_teacher": None},
    "recompute_config": {"recompute": False},
    "dry_run": {"student_config": None, "teacher_config": None},
}

RUN_MODES = ("distill", "sft")


MAX_ALIASES = 100  # a run config needs a few (*anchor references) at most; nested ones multiply (a "billion laughs")


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads exponent floats without a dot (1e-4, 5E3) as numbers, as YAML 1.2 does;
    plain PyYAML (YAML 1.1) would return the string '1e-4'. At most MAX_ALIASES alias references: a few nested ones
    build a structure whose every message or copy is gigabytes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases = getattr(self, "_aliases", 0) + 1
            if self._aliases > MAX_ALIASES:
                event = self.peek_event()
                raise yaml.YAMLError(f"more than {MAX_ALIASES} alias references (*name), line "
                                     f"{event.start_mark.line + 1}; a run config needs only a few")
        return super().compose_node(parent, index)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml(stream):
    """The one yaml reader of the project (run configs, pipeline configs, model configs given as yaml): plain
    mappings, lists and values, YAML 1.2 floats, at most MAX_ALIASES alias references."""
    return yaml.load(stream, Loader=_Loader)


# keys that existed under another name on some branch's yamls / commands (docs/benchmarks.md section 6a)
MOVED = {"model.recompute": "recompute_config.recompute"}


def _unknown(key: str, valid: Sequence[str], where: str) -> YouzhiError:
    if key in MOVED:
        return YouzhiError(f"config key {key!r} in {where} is now {MOVED[key]!r} (MindFormers' name); rename it")
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(valid), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return YouzhiError(f"unknown config key {key!r} in {where}{hint}; valid keys here: {', '.join(sorted(valid))}")


def _merge_callbacks(base: List[dict], items, where: str) -> List[dict]:
    if not isinstance(items, list):
        raise YouzhiError(f"'callbacks' in {where} must be a list of {{type: ..., ...}} entries")
    out = {c["type"]: dict(c) for c in base}
    for item in items:
        if not isinstance(item, dict) or "type" not in item:
            raise YouzhiError(f"every entry of 'callbacks' in {where} needs a 'type' ({', '.join(CALLBACK_DEFAULTS)})")
        t = item["type"]
        if t not in CALLBACK_DEFAULTS:
            raise _unknown(f"callbacks.{t}", CALLBACK_DEFAULTS, where)
        for k, v in item.items():
            if k != "type" and k not in CALLBACK_DEFAULTS[t]:
                raise _unknown(f"callbacks.{t}.{k}", CALLBACK_DEFAULTS[t], where)
            out[t][k] = v
    return list(out.values())


def _merge(base: Dict[str, Any], new: Dict[str, Any], where: str, prefix: str = "") -> None:
    for k, v in new.items():
        key = f"{prefix}{k}"
        if k not in base:
            raise _unknown(key, base, where)
        if k == "callbacks" and not prefix:
            base[k] = _merge_callbacks(base[k], v, where)
        elif isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise YouzhiError(f"config key {key!r} in {where} is a section; give it as a mapping of keys, "
                                  f"got {v!r}")
            _merge(base[k], v, where, key + ".")
        else:
            base[k] = v


def parse_override(text: str) -> tuple:
    """'section.key=value' -> (['section', 'key'], value parsed as a yaml scalar)."""
    if "=" not in text:
        raise YouzhiError(f"--set {text!r}: expected section.key=value, e.g. --set runner_config.max_steps=20")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise YouzhiError(f"--set {text!r}: the key must be dotted names, e.g. runner_config.max_steps")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError as exc:
        why = getattr(exc, "problem", None) or exc
        raise YouzhiError(f"--set {text!r}: the value is not a yaml scalar ({why})") from None
    return key.split("."), value


def apply_override(cfg: Dict[str, Any], parts: List[str], value) -> None:
    where = "--set"
    if parts[0] == "callbacks":
        if len(parts) != 3:
            raise YouzhiError("callback overrides look like --set callbacks.CheckpointMonitor.save_checkpoint_steps=5")
        cfg["callbacks"] = _merge_callbacks(cfg["callbacks"], [{"type": parts[1], parts[2]: value}], where)
        return
    node = cfg
    for i, p in enumerate(parts):
        dotted = ".".join(parts[:i + 1])
        if not isinstance(node, dict) or p not in node:
            raise _unknown(dotted, node if isinstance(node, dict) else [], where)
        if i == len(parts) - 1:
            if isinstance(node[p], dict):
                raise YouzhiError(f"--set {dotted}=...: {dotted!r} is a section; set one of its keys "
                                  f"({', '.join(node[p])})")
            node[p] = value
        else:
            node = node[p]


def read_yaml_sections(path: str, sections: str) -> Dict[str, Any]:
    """A yaml config file read as hostile input: a mapping of sections (`sections` names some, for the message)."""
    if not os.path.isfile(path):
        raise YouzhiError(f"config file {path} {path_problem(path, 'file')}")
    try:
        with open(path, encoding="utf-8") as f:
            data = load_yaml(f) or {}
    except yaml.YAMLError as exc:
        raise YouzhiError(f"{path} is not valid yaml: {' '.join(str(exc).split())}; fix it there (plain "
                          "mappings, lists and values only)") from None
    except UnicodeDecodeError:
        raise YouzhiError(f"{path} is not UTF-8 text; save the yaml as UTF-8") from None
    if not isinstance(data, dict):
        raise YouzhiError(f"{path} must be a yaml mapping of sections ({sections})")
    return data


def layered_config(defaults: Dict[str, Any], path: Optional[str], overrides: Sequence[str], check,
                   sections: str) -> Dict[str, Any]:
    """`defaults` <- yaml file <- `--set` overrides, then `check(cfg)`: how every yaml of the project is read (the
    training run config here, the pipeline config in youzhi_ms/pipeline/config.py). A plain nested dict."""
    cfg = copy.deepcopy(defaults)
    if path is not None:
        _merge(cfg, read_yaml_sections(path, sections), path)
    for text in overrides:
        apply_override(cfg, *parse_override(text))
    check(cfg)
    return cfg


def load_run_config(path: Optional[str], overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """DEFAULTS <- yaml file <- overrides, validated."""
    return layered_config(DEFAULTS, path, overrides, validate, "seed, output_dir, model, runner_config, ...")


def callback(cfg: Dict[str, Any], name: str) -> Optional[Dict[str, Any]]:
    return next((c for c in cfg["callbacks"] if c["type"] == name), None)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise YouzhiError(msg)


def _int(cfg, section, key, lo=1, allow_none=False):
    v = cfg[section][key] if section else cfg[key]
    name = f"{section}.{key}" if section else key
    if v is None and allow_none:
        return
    _need(isinstance(v, int) and not isinstance(v, bool) and v >= lo, f"{name} must be an integer >= {lo}, got {v!r}")


def _num(cfg, section, key, lo=None, hi=None, allow_none=False):
    v = cfg[section][key]
    name = f"{section}.{key}"
    if v is None and allow_none:
        return
    _need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
          f"{name} must be a number (finite), got {v!r}")
    _need(lo is None or v >= lo, f"{name} must be >= {lo}, got {v}")
    _need(hi is None or v <= hi, f"{name} must be <= {hi}, got {v}")


def _flag(cfg, section, key):
    v = cfg[section][key] if section else cfg[key]
    _need(isinstance(v, bool), f"{f'{section}.' if section else ''}{key} must be true or false, got {v!r}")


def _path(cfg, section, key):
    v = cfg[section][key]
    _need(v is None or (isinstance(v, str) and v.strip()),
          f"{section}.{key} must be a directory path, got {v!r}")


def _check_top_level(cfg: Dict[str, Any]) -> None:
    _int(cfg, None, "seed", 0)
    _flag(cfg, None, "resume_training")
    _need(cfg["run_mode"] in RUN_MODES, f"run_mode must be one of {RUN_MODES}, got {cfg['run_mode']!r}")
    _need(isinstance(cfg["output_dir"], str) and cfg["output_dir"], "output_dir must be a directory path")


def _check_context(cfg: Dict[str, Any]) -> None:
    c = cfg["context"]
    _need(c["max_device_memory"] is None or isinstance(c["max_device_memory"], str),
          f"context.max_device_memory must be a size such as '58GB', got {c['max_device_memory']!r}")
    _need(c["mode"] in ("GRAPH_MODE", "PYNATIVE_MODE", 0, 1),
          f"context.mode must be GRAPH_MODE or PYNATIVE_MODE, got {c['mode']!r}")
    _need(c["device_target"] in ("CPU", "Ascend", "GPU"),
          f"context.device_target must be CPU, Ascend or GPU, got {c['device_target']!r}")


def _check_parallel(cfg: Dict[str, Any]) -> None:
    """Sections `parallel` and `parallel_config` (whether a layout fits the world is parallel.py's check)."""
    _need(cfg["parallel"]["parallel_mode"] in ("data_parallel", "semi_auto_parallel"),
          f"parallel.parallel_mode must be data_parallel or semi_auto_parallel, got "
          f"{cfg['parallel']['parallel_mode']!r}")
    for section, key in (("parallel", "enable_parallel_optimizer"), ("parallel_config", "use_seq_parallel"),
                         ("parallel_config", "vocab_emb_dp")):
        _flag(cfg, section, key)
    _int(cfg, "parallel_config", "data_parallel", 1, allow_none=True)
    for k in ("model_parallel", "pipeline_stage", "micro_batch_num"):
        _int(cfg, "parallel_config", k, 1)


def _check_model(cfg: Dict[str, Any]) -> None:
    """Sections `model` and `recompute_config` (the student's)."""
    m = cfg["model"]
    _path(cfg, "model", "student")
    _need(m["trainable"] in ("all", "attention", "attention+norms"),
          f"model.trainable must be 'all', 'attention' or 'attention+norms', got {m['trainable']!r}")
    _need(m["save_dtype"] in ("fp32", "bf16", "fp16"),
          f"model.save_dtype must be fp32, bf16 or fp16, got {m['save_dtype']!r}")
    _flag(cfg, "recompute_config", "recompute")


def _check_runner(cfg: Dict[str, Any]) -> None:
    _flag(cfg, "runner_config", "progress")
    for k in ("max_steps", "batch_size", "gradient_accumulation_steps", "seq_length"):
        _int(cfg, "runner_config", k, 1)
    _int(cfg, "runner_config", "stop_at_step", 1, allow_none=True)
    _need(cfg["runner_config"]["seq_length"] >= 2,
          f"runner_config.seq_length {cfg['runner_config']['seq_length']} leaves no token to learn from (each window's "
          "first token is never predicted); use at least 2, e.g. the default 256")


def _check_optimizer(cfg: Dict[str, Any]) -> None:
    """Sections `optimizer` and `lr_schedule`."""
    _need(cfg["optimizer"]["type"] == "AdamW", f"optimizer.type must be AdamW, got {cfg['optimizer']['type']!r}")
    betas = cfg["optimizer"]["betas"]
    _need(isinstance(betas, (list, tuple)) and len(betas) == 2 and
          all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas),
          f"optimizer.betas must be two numbers in [0, 1), got {betas!r}")
    _num(cfg, "optimizer", "eps", 0.0)
    _num(cfg, "optimizer", "weight_decay", 0.0)
    _num(cfg, "optimizer", "max_grad_norm")
    _need(cfg["lr_schedule"]["type"] == "CosineWithWarmUpLR",
          f"lr_schedule.type must be CosineWithWarmUpLR, got {cfg['lr_schedule']['type']!r}")
    _num(cfg, "lr_schedule", "learning_rate", 0.0)
    _num(cfg, "lr_schedule", "kv_layernorm_learning_rate", 0.0, allow_none=True)
    _num(cfg, "lr_schedule", "warmup_ratio", 0.0, 1.0)
    _int(cfg, "lr_schedule", "warmup_steps", 0, allow_none=True)
    _num(cfg, "lr_schedule", "min_lr_ratio", 0.0, 1.0)
    _int(cfg, "lr_schedule", "total_steps", 1, allow_none=True)


def _check_callbacks(cfg: Dict[str, Any]) -> None:
    for name, keys in CALLBACK_DEFAULTS.items():
        entry = callback(cfg, name)
        for key in keys if entry else ():
            _need(isinstance(entry[key], int) and entry[key] >= 1, f"callbacks.{name}.{key} must be an integer >= 1")


def _check_train_dataset(cfg: Dict[str, Any]) -> None:
    d = cfg["train_dataset"]
    _flag(cfg, "train_dataset", "shuffle")
    _need(d["format"] in ("auto", "packed", "chat"),
          f"train_dataset.format must be auto, packed or chat, got {d['format']!r}")
    _need(isinstance(d["data_path"], str) and d["data_path"],
          "train_dataset.data_path must be wiki-calib, wiki-eval or a file path")
    _int(cfg, "train_dataset", "max_tokens", 1, allow_none=True)
    _num(cfg, "train_dataset", "replay_fraction", 0.0, 0.9)
    if d["replay_fraction"] > 0:
        _need(isinstance(d["replay_path"], str) and d["replay_path"].strip() != "", "train_dataset.replay_fraction > 0 "
              "needs train_dataset.replay_path: the general text to mix in (wiki-calib, a .txt or a .jsonl)")
        _need(d["format"] != "chat", "train_dataset.replay_fraction > 0 works with packed text only; set "
              "train_dataset.format to packed (or auto) or replay_fraction to 0")


def _check_distill(cfg: Dict[str, Any]) -> None:
    d = cfg["distill"]
    _path(cfg, "distill", "teacher")
    for key, hi in (("beta", 1.0), ("lmbda", 1.0), ("temperature", None), ("top_p", 1.0)):
        _num(cfg, "distill", key, 0.0, hi)
    _int(cfg, "distill", "max_new_tokens", 1)
    _need(d["loss"] in ("chunked", "full"), f"distill.loss must be chunked or full, got {d['loss']!r}")
    _int(cfg, "distill", "loss_chunk_tokens", 1)
    _need(d["teacher_graph"] in ("joint", "separate"),
          f"distill.teacher_graph must be joint or separate, got {d['teacher_graph']!r}")
    _need(d["offline_teacher"] is None or (isinstance(d["offline_teacher"], str) and d["offline_teacher"]),
          "distill.offline_teacher must be a file path (tools/make_teacher_topk.py) or null")


def _check_distill_run(cfg: Dict[str, Any]) -> None:
    """What a distill run needs of `distill` together with the other sections (after each section is checked)."""
    d = cfg["distill"]
    if cfg["run_mode"] != "distill":
        return
    if d["offline_teacher"] is not None:
        _need(d["lmbda"] == 0, f"distill.lmbda {d['lmbda']} > 0 needs the live teacher: on-policy batches are the "
              "student's own samples, which no stored file can hold; set distill.lmbda=0 to distill from "
              f"{d['offline_teacher']}, or drop distill.offline_teacher")
        _need(d["loss"] == "chunked", "distill.offline_teacher works with distill.loss=chunked only")
    if d["lmbda"] > 0:
        _need(d["max_new_tokens"] < cfg["runner_config"]["seq_length"],
              f"distill.max_new_tokens ({d['max_new_tokens']}) must be smaller than "
              f"runner_config.seq_length ({cfg['runner_config']['seq_length']}): on-policy sequences are a prompt "
              "plus the student's continuation inside one window")
    _need(d["temperature"] != 0, "distill.temperature 0 is only meaningful for sampling; the GKD loss divides logits "
          "by it. Use a small positive value (e.g. 0.1), or 1.0 for the plain distributions")


# one check per section, in DEFAULTS' order; the last one relates sections to each other
SECTION_CHECKS = (_check_top_level, _check_context, _check_parallel, _check_model, _check_runner, _check_optimizer,
                  _check_callbacks, _check_train_dataset, _check_distill, _check_distill_run)


def validate(cfg: Dict[str, Any]) -> None:
    """Types and ranges of everything that is not a path (paths are checked when they are opened)."""
    for check in SECTION_CHECKS:
        check(cfg)


# ------------------------------------------------------------------------------------------------------ typed sections
# The validated dict parsed once into typed sections, so the trainer reads `run.runner.batch_size` (a name an editor
# and a reader can follow) instead of `cfg["runner_config"]["batch_size"]`. Field names are the yaml keys, except
# `DistillSection.jsd_beta` (yaml `distill.beta`, TRL's name; "beta" is another thing in the converter).
@dataclasses.dataclass(frozen=True)
class ContextSection:
    mode: Any
    device_target: str
    max_device_memory: Optional[str]

    @property
    def graph_mode(self) -> bool:
        return self.mode in ("GRAPH_MODE", 0)


@dataclasses.dataclass(frozen=True)
class ParallelSection:
    parallel_mode: str
    enable_parallel_optimizer: bool


@dataclasses.dataclass(frozen=True)
class ParallelConfigSection:
    """MindFormers' names: `pipeline_stage` is the number of pipeline stages."""
    data_parallel: Optional[int]
    model_parallel: int
    pipeline_stage: int
    micro_batch_num: int
    use_seq_parallel: bool
    vocab_emb_dp: bool


@dataclasses.dataclass(frozen=True)
class DryRunSection:
    student_config: Optional[str]
    teacher_config: Optional[str]


@dataclasses.dataclass(frozen=True)
class ModelSection:
    student: Optional[str]
    trainable: str
    save_dtype: str


@dataclasses.dataclass(frozen=True)
class RunnerSection:
    max_steps: int
    batch_size: int
    gradient_accumulation_steps: int
    seq_length: int
    stop_at_step: Optional[int]
    progress: bool


@dataclasses.dataclass(frozen=True)
class OptimizerSection:
    type: str
    betas: List[float]
    eps: float
    weight_decay: float
    max_grad_norm: float


@dataclasses.dataclass(frozen=True)
class LrScheduleSection:
    type: str
    learning_rate: float
    kv_layernorm_learning_rate: Optional[float]
    warmup_ratio: float
    warmup_steps: Optional[int]
    min_lr_ratio: float
    total_steps: Optional[int]


@dataclasses.dataclass(frozen=True)
class TrainDatasetSection:
    data_path: str
    format: str
    shuffle: bool
    max_tokens: Optional[int]
    replay_path: Optional[str]
    replay_fraction: float


@dataclasses.dataclass(frozen=True)
class DistillSection:
    teacher: Optional[str]
    jsd_beta: float
    lmbda: float
    temperature: float
    max_new_tokens: int
    top_p: float
    loss: str
    loss_chunk_tokens: int
    teacher_graph: str
    offline_teacher: Optional[str]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A validated run config as typed sections; `raw` is the plain dict (what run_config.yaml records, what the
    dry run sends to its compile workers, and the sections data.build_dataset and parallel.plan_parallel read)."""
    raw: Dict[str, Any] = dataclasses.field(repr=False)
    seed: int
    output_dir: str
    run_mode: str
    resume_training: bool
    context: ContextSection
    parallel: ParallelSection
    parallel_config: ParallelConfigSection
    model: ModelSection
    runner: RunnerSection
    optimizer: OptimizerSection
    lr_schedule: LrScheduleSection
    train_dataset: TrainDatasetSection
    distill: DistillSection
    recompute: bool
    dry_run: DryRunSection
    save_checkpoint_steps: Optional[int]   # None: no CheckpointMonitor (checkpoints at the end only)
    keep_checkpoint_max: int
    print_every: Optional[int]             # LossMonitor.per_print_times; None: no LossMonitor

    @classmethod
    def parse(cls, cfg: Dict[str, Any]) -> "RunConfig":
        """`cfg`: load_run_config's validated dict."""
        distill = dict(cfg["distill"])
        distill["jsd_beta"] = distill.pop("beta")
        checkpoints = callback(cfg, "CheckpointMonitor") or {}
        return cls(raw=cfg, seed=cfg["seed"], output_dir=cfg["output_dir"], run_mode=cfg["run_mode"],
                   resume_training=cfg["resume_training"], context=ContextSection(**cfg["context"]),
                   parallel=ParallelSection(**cfg["parallel"]),
                   parallel_config=ParallelConfigSection(**cfg["parallel_config"]), model=ModelSection(**cfg["model"]),
                   runner=RunnerSection(**cfg["runner_config"]), optimizer=OptimizerSection(**cfg["optimizer"]),
                   lr_schedule=LrScheduleSection(**cfg["lr_schedule"]),
                   train_dataset=TrainDatasetSection(**cfg["train_dataset"]), distill=DistillSection(**distill),
                   recompute=cfg["recompute_config"]["recompute"], dry_run=DryRunSection(**cfg["dry_run"]),
                   save_checkpoint_steps=checkpoints.get("save_checkpoint_steps"),
                   keep_checkpoint_max=checkpoints.get("keep_checkpoint_max", 2),
                   print_every=(callback(cfg, "LossMonitor") or {}).get("per_print_times"))

    @property
    def distilling(self) -> bool:
        return self.run_mode == "distill"

    @property
    def offline_teacher(self) -> bool:
        """Distillation from a stored top-k file instead of a live teacher."""
        return self.distilling and self.distill.offline_teacher is not None
