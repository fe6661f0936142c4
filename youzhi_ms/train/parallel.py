"""Parallel layout of a training run: data parallel on any device; MindFormers-style model / pipeline parallel
strategies for Ascend.

`plan_parallel` is a pure function from `parallel_config` (and the model configs) to a `ParallelPlan`: the data /
model / pipeline degrees, a strategy table `{cell name: (activation strategy, weight strategy)}` for every linear and
embedding of the student (and the teacher, under the `teacher.` prefix the trainer gives its parameters), and the
pipeline stage of every decoder layer. Strategies follow MindFormers' layout for `MatMul(x[N, in], W[out, in]^T)`
with `N = batch * seq` split by data parallel:

  column parallel (output features split over mp): ((dp, 1), (mp, 1))   q / kv_b (up) / gate / up / lm head
  row parallel    (input features split over mp):  ((dp, mp), (1, mp))  o_proj (linear_proj) / down (linear_fc2)
  replicated weight:                               ((dp, 1), (1, 1))    q_a / kv_a (down) projections: the latent is
                                                                        shared by all heads, so it is not split
  embedding gather (ids, table):                   ((dp, 1), (1, 1))    with vocab_emb_dp (table replicated), else
                                                   ((dp, 1), (mp, 1))    (vocab rows split over mp)

With `use_seq_parallel` the row-parallel outputs are reduce-scattered along the sequence (MindFormers' sequence
parallel); this only changes the recorded strategy of the row-parallel layers' output (the sharded model refuses it).

`build_semi_auto_step` turns a plan into the compiled training step: `sharded_model.py` realises this table operator
by operator (tools/dryrun.py checks every compiled parameter slice against it), `parallel_step.py` is the update.
MindSpore's CPU backend has no semi-auto / auto parallel (measured: "Invalid communication backend: CPU ... only
support Ascend/GPU"), so model_parallel or pipeline_stage > 1 is refused on CPU by `check_world`; on a machine without
Ascend hardware the step is compiled (never run) by tools/dryrun.py under MindSpore's DryRun.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from youzhi_ms.checkpoint.hf import HFCheckpoint
from youzhi_ms.checkpoint.mindspore_ckpt import is_ms_layout  # no MindSpore at its top
from youzhi_ms.contract import MLA_MODEL_TYPE, expected_tensors, parse_config
from youzhi_ms.errors import YouzhiError
from youzhi_ms.models.names import hf_to_ms, ms_to_hf
from youzhi_ms.train.run_config import RunConfig

# MindSpore (and the modules that import it: losses, parallel_step, sharded_model) is imported inside
# the two functions that build or fill the sharded step: the dry run's parent process plans and checks from this module
# without MindSpore (dryrun/__init__.py: only its compile workers import it, after the CANN stand-in is set up).

Strategy = Tuple[Tuple[int, ...], ...]


@dataclass(frozen=True)
class ParallelPlan:
    data_parallel: int
    model_parallel: int
    pipeline_stage: int
    micro_batch_num: int
    use_seq_parallel: bool
    vocab_emb_dp: bool
    strategies: Dict[str, Strategy] = field(default_factory=dict)
    pp_stage_of: Dict[str, int] = field(default_factory=dict)  # parameter prefix -> its pipeline stage

    @property
    def device_num(self) -> int:
        return self.data_parallel * self.model_parallel * self.pipeline_stage

    @property
    def semi_auto(self) -> bool:
        return self.model_parallel > 1 or self.pipeline_stage > 1


def _model_dims(cfg: Mapping, who: str) -> dict:
    """What the strategy table needs of a model, read from its Hugging Face config dict through the contract (the
    trainer passes its configs' `.raw`, the dry run the config.json dicts): one key vocabulary at this boundary."""
    f = parse_config(cfg, f"the {who}'s config")
    mla = f["model_type"] == MLA_MODEL_TYPE
    return dict(mla=mla, layers=f["num_hidden_layers"], heads=f["num_attention_heads"],
                kv_heads=f["num_key_value_heads"], inter=f["intermediate_size"], vocab=f["vocab_size"],
                q_lora=f["q_lora_rank"] if mla else None, tied=f["tie_word_embeddings"])


def _divides(mp: int, n: int, what: str, who: str) -> None:
    if n % mp:
        raise YouzhiError(f"parallel_config.model_parallel={mp} does not divide the {who}'s {what} ({n}); choose a "
                          f"model_parallel that divides it")


def _model_table(dims: dict, dp: int, mp: int, pp: int, seq_par: bool, vocab_dp: bool, prefix: str, who: str):
    col: Strategy = ((dp, 1), (mp, 1))
    row: Strategy = ((dp, mp), (1, mp))
    rep: Strategy = ((dp, 1), (1, 1))
    if seq_par and mp > 1:
        row = ((dp, mp), (1, mp), (dp * mp, 1))  # third entry: output layout (reduce-scatter over the sequence)
    if mp > 1:
        _divides(mp, dims["heads"], "num_attention_heads", who)
        _divides(mp, dims["inter"], "intermediate_size", who)
        if not dims["mla"]:
            _divides(mp, dims["kv_heads"], "num_key_value_heads", who)
        if not vocab_dp:
            _divides(mp, dims["vocab"], "vocab_size", who)
    if dims["layers"] < pp:
        raise YouzhiError(f"parallel_config.pipeline_stage={pp} exceeds the {who}'s {dims['layers']} layers")
    table: Dict[str, Strategy] = {}
    pp_stage_of: Dict[str, int] = {}
    table[prefix + "embedding.word_embeddings"] = ((dp, 1), (1, 1)) if vocab_dp else ((dp, 1), (mp, 1))
    pp_stage_of[prefix + "embedding"] = 0
    for i in range(dims["layers"]):
        p = f"{prefix}decoder.layers.{i}."
        a = p + "self_attention."
        if dims["mla"]:
            if dims["q_lora"]:
                table[a + "linear_q_down_proj"] = rep
                table[a + "linear_q_up_proj"] = col
            else:
                table[a + "linear_q_proj"] = col
            table[a + "linear_kv_down_proj"] = rep
            table[a + "linear_kv_up_proj"] = col
        else:
            for n in ("linear_q", "linear_k", "linear_v"):
                table[a + n] = col
        table[a + "linear_proj"] = row
        table[p + "mlp.gating"] = col
        table[p + "mlp.hidden"] = col
        table[p + "mlp.linear_fc2"] = row
        pp_stage_of[p.rstrip(".")] = i * pp // dims["layers"]
    if not dims["tied"]:
        table[prefix + "output_layer"] = col
    pp_stage_of[prefix + "decoder.final_layernorm"] = pp - 1
    pp_stage_of[prefix + "output_layer"] = pp - 1
    return table, pp_stage_of


def param_shapes(cfg: dict) -> Dict[str, Tuple[int, ...]]:
    """{parameter name: full shape} of the model a Hugging Face config dict describes, with the MindSpore
    (MindFormers) names models/ and sharded_model.py use: the checkpoint contract's tensor list, renamed. No MindSpore
    needed (the dry run's parent process, its strategy check and its unsharded byte count)."""
    f = parse_config(cfg)
    kind = "mla" if f["model_type"] == MLA_MODEL_TYPE else "gqa"
    return {hf_to_ms(name, kind): tuple(int(d) for d in shape) for name, shape in expected_tensors(f).items()}


def plan_parallel(parallel_config: dict, student_cfg: Mapping, teacher_cfg: Optional[Mapping] = None,
                  world_size: Optional[int] = None) -> ParallelPlan:
    """The layout for `parallel_config` (MindFormers keys) and the models' Hugging Face config dicts. data_parallel
    None means world_size / (mp * pp)."""
    mp = int(parallel_config.get("model_parallel", 1) or 1)
    pp = int(parallel_config.get("pipeline_stage", 1) or 1)
    dp = parallel_config.get("data_parallel")
    if dp is None:
        world = world_size or 1
        if world % (mp * pp):
            raise YouzhiError(f"{world} workers cannot be split into model_parallel={mp} x pipeline_stage={pp} groups")
        dp = world // (mp * pp)
    dp = int(dp)
    micro = int(parallel_config.get("micro_batch_num", 1) or 1)
    if pp > 1 and micro < pp:
        raise YouzhiError(f"parallel_config.micro_batch_num ({micro}) must be >= pipeline_stage ({pp}) so every "
                          "pipeline stage has work (MindFormers uses micro_batch_num >= pipeline_stage)")
    seq_par = bool(parallel_config.get("use_seq_parallel", False))
    vocab_dp = bool(parallel_config.get("vocab_emb_dp", True))
    table, pp_stage_of = _model_table(_model_dims(student_cfg, "student"), dp, mp, pp, seq_par, vocab_dp, "", "student")
    if teacher_cfg is not None:
        teacher_table, teacher_pp_stage_of = _model_table(_model_dims(teacher_cfg, "teacher"), dp, mp, pp, seq_par,
                                                          vocab_dp, "teacher.", "teacher")
        table.update(teacher_table)
        pp_stage_of.update(teacher_pp_stage_of)
    return ParallelPlan(dp, mp, pp, micro, seq_par, vocab_dp, table, pp_stage_of)


def check_device(parallel_config: dict, device_target: str) -> None:
    """Refuse model / pipeline parallel on CPU, with the reason (called before any model is loaded)."""
    mp = int(parallel_config.get("model_parallel", 1) or 1)
    pp = int(parallel_config.get("pipeline_stage", 1) or 1)
    if (mp > 1 or pp > 1) and device_target == "CPU":
        raise YouzhiError(
            f"parallel_config.model_parallel={mp} / pipeline_stage={pp} needs MindSpore's semi-auto parallel, which "
            "the CPU backend does not have (its collectives only support data parallel: 'Invalid communication "
            "backend: CPU ... only support Ascend/GPU'); on CPU set model_parallel: 1 and pipeline_stage: 1 and "
            "launch data-parallel workers with run_scripts/msrun_launcher.sh")


def check_world(plan: ParallelPlan, world_size: int, device_target: str) -> None:
    """Refuse layouts the running job cannot execute, each with the reason."""
    check_device({"model_parallel": plan.model_parallel, "pipeline_stage": plan.pipeline_stage}, device_target)
    if plan.device_num != world_size:
        raise YouzhiError(
            f"parallel_config data_parallel={plan.data_parallel} x model_parallel={plan.model_parallel} x "
            f"pipeline_stage={plan.pipeline_stage} = {plan.device_num} devices, but the job has {world_size} "
            f"worker(s); launch {plan.device_num} workers (msrun_launcher.sh \"...\" {plan.device_num}) or set "
            "parallel_config.data_parallel: null to use all workers")


def param_groups(params, run: RunConfig):
    """(trainable parameters, learning-rate group of each, weight decay of each), by the trainer's rules:
    model.trainable 'attention' keeps the self_attention parameters; lr_schedule.kv_layernorm_learning_rate (if set)
    is group 1 for the kv_layernorm weights; no decay on 1-D parameters (norms, biases)."""
    params = list(params)
    if run.model.trainable == "attention":
        train = [p for p in params if ".self_attention." in p.name]
    else:
        train = params
    if not train:
        raise YouzhiError("model.trainable selects no parameters")
    kv_lr = run.lr_schedule.kv_layernorm_learning_rate
    groups = [1 if kv_lr is not None and ".kv_layernorm." in p.name else 0 for p in train]
    wd = float(run.optimizer.weight_decay)
    decays = [wd if len(p.shape) >= 2 else 0.0 for p in train]
    return train, groups, decays


def local_rows(run: RunConfig, plan: ParallelPlan) -> int:
    """Rows of one step's batch on one data-parallel rank: batch_size per pipeline micro-batch."""
    rows = int(run.runner.batch_size)
    return rows * plan.micro_batch_num if plan.pipeline_stage > 1 else rows


def check_semi_auto(run: RunConfig, plan: ParallelPlan) -> None:
    """What the sharded step does not do, refused before anything is built."""
    if plan.use_seq_parallel:
        raise YouzhiError("parallel_config.use_seq_parallel is not implemented by youzhi_ms's sharded model; set it "
                          "to false")
    accum = int(run.runner.gradient_accumulation_steps)
    if accum != 1:
        how = ("the pipeline micro-batches are the accumulation: set gradient_accumulation_steps: 1 and "
               f"micro_batch_num: {plan.micro_batch_num * accum}") if plan.pipeline_stage > 1 else \
            "raise batch_size instead, or use pipeline stages (their micro-batches are the accumulation)"
        raise YouzhiError(f"runner_config.gradient_accumulation_steps={accum} under model/pipeline parallel: one "
                          f"optimizer step is one compiled graph; {how}")
    if run.distilling and run.distill.lmbda > 0:
        raise YouzhiError(f"distill.lmbda={run.distill.lmbda}: on-policy sampling needs the student's decode "
                          "graph, which the sharded model does not have; under model / pipeline parallel set "
                          "distill.lmbda: 0.0 (GKD on the dataset's sequences)")
    if run.offline_teacher:
        raise YouzhiError("distill.offline_teacher is implemented for data parallel only (the sharded step computes "
                          "the teacher live, its head split over model_parallel); drop it, or set "
                          "parallel_config.model_parallel=1 and pipeline_stage=1")
    if run.distilling and run.distill.teacher_graph != "joint":
        raise YouzhiError(f"distill.teacher_graph={run.distill.teacher_graph} is implemented for data parallel only; "
                          "under model / pipeline parallel the teacher runs inside the sharded step: set it to joint")
    if run.parallel.enable_parallel_optimizer and plan.data_parallel == 1:
        raise YouzhiError("parallel.enable_parallel_optimizer shards the optimizer over the data-parallel replicas, "
                          "and data_parallel is 1; set it to false or raise data_parallel")


def build_semi_auto_step(run: RunConfig, plan: ParallelPlan, student_cfg, teacher_cfg, rank: int, world: int,
                         use_fused: bool = True, strategy_file: Optional[str] = None):
    """The training step of a model / pipeline parallel run, as MindSpore compiles it on every rank:
    sharded student (+ teacher) and loss (sharded_model.py), pipeline stages, optional recompute of the student's
    layers, AdamW with clipping (parallel_step.py), wrapped in MindSpore's AutoParallel (semi_auto; pipeline stages;
    dataset strategy: the batch split over data parallel, replicated over model parallel; optimizer sharding when
    parallel.enable_parallel_optimizer). Used by the trainer (Ascend) and by tools/dryrun.py (compile only).

    Returns (parallel_net, step, student, teacher). Call `step.set_hyper(...)` before each `parallel_net(ids,
    labels, loss_mask)`; inputs are [local_rows(run, plan), seq_length] on every rank."""
    check_semi_auto(run, plan)
    from mindspore.parallel.auto_parallel import AutoParallel  # lazy: see the imports at the top
    from youzhi_ms.train.losses import jsd_upper_bound
    from youzhi_ms.train.parallel_step import ShardedStep, ShardedUpdateCore
    from youzhi_ms.train.sharded_model import build_sharded
    dp, mp, pp = plan.data_parallel, plan.model_parallel, plan.pipeline_stage
    loss_net, student, teacher = build_sharded(student_cfg, teacher_cfg if run.distilling else None,
                                               run.runner.seq_length, dp, mp, plan.vocab_emb_dp, use_fused,
                                               jsd_beta=run.distill.jsd_beta, temperature=run.distill.temperature)
    if pp > 1:
        student.set_pp_stages(pp)
        if teacher is not None:
            teacher.set_pp_stages(pp)
    if run.recompute:
        for layer in student.decoder.layers:
            layer.recompute()
    train, groups, decays = param_groups(student.get_parameters(), run)
    chosen = {id(p) for p in train}
    for p in student.get_parameters():
        p.requires_grad = id(p) in chosen
    opt = run.optimizer
    core = ShardedUpdateCore(train, groups, decays, tuple(opt.betas), opt.eps, opt.max_grad_norm)
    bound = jsd_upper_bound(run.distill.jsd_beta) if run.distilling else None
    shard_opt = bool(run.parallel.enable_parallel_optimizer)
    step = ShardedStep(loss_net, core, max(groups) + 1, pp, plan.micro_batch_num, bound, rank, world, shard_opt)
    step.set_train()
    net = AutoParallel(step, parallel_mode="semi_auto")
    if pp > 1:
        net.pipeline(stages=pp)
    net.dataset_strategy(((dp, 1), (dp, 1), (dp, 1)))
    if shard_opt:
        net.hsdp()
    if strategy_file:
        net.disable_strategy_file_only_for_trainable_params()
        net.save_param_strategy_file(strategy_file)
    return net, step, student, teacher


def rank_slice(array, dev_matrix, tensor_map, local_rank: int, opt_shard: int = 1):
    """This rank's block of a full tensor under a compiled layout: tensor dim d is split over device-matrix axis
    len - 1 - tensor_map[d] (MindSpore numbers the axes from the right; -1 = not split), the stage's ranks enumerate the
    device matrix row-major; with the parallel optimizer (`opt_shard` > 1) the block is cut again along dim 0 among the
    ranks holding the same block, in rank order."""
    dev_matrix = [int(x) for x in dev_matrix]
    coords = np.unravel_index(int(local_rank), dev_matrix) if dev_matrix else ()
    index, used = [], set()
    for d, k in enumerate(tensor_map):
        if k == -1:
            index.append(slice(None))
            continue
        axis = len(dev_matrix) - 1 - k
        used.add(axis)
        n = array.shape[d] // dev_matrix[axis]
        index.append(slice(coords[axis] * n, (coords[axis] + 1) * n))
    block = array[tuple(index)]
    if opt_shard > 1:
        replicas = [r for r in range(int(np.prod(dev_matrix)))
                    if all(np.unravel_index(r, dev_matrix)[a] == coords[a] for a in used)]
        if len(replicas) % opt_shard:
            raise ValueError(f"optimizer shard of {opt_shard} does not divide the {len(replicas)} replicas")
        k = replicas.index(int(local_rank)) % opt_shard
        n = block.shape[0] // opt_shard
        block = block[k * n:(k + 1) * n]
    return np.ascontiguousarray(block)


def opt_shard_size(group_name: str) -> int:
    """Size of a parameter's optimizer-shard group from its name in the layout ('' = not sharded): MindSpore names
    communication groups '<size>-<hash>'."""
    m = re.match(r"^(\d+)-", group_name or "")
    return int(m.group(1)) if m else 1


def held_parameters(params, layout: dict) -> list:
    """The parameters this rank holds after compilation (pipeline stages hold only their own layers)."""
    return [p for p in params if p.name in layout]


def load_sharded_weights(model, model_dir: str, kind: str, layout: dict, local_rank: int, prefix: str = "") -> int:
    """Fill the slices this rank holds from a Hugging Face or MindSpore-layout directory, one tensor read at a time
    (host memory: one full tensor, not the model). `layout` is the compiled `parameter_layout_dict`, `local_rank` the
    rank's index inside its pipeline stage; `prefix` is stripped from the names first (the teacher's 'teacher.').
    Returns the number of tensors loaded."""
    import mindspore as ms  # lazy: see the imports at the top
    ckpt = HFCheckpoint(model_dir)
    ms_layout = is_ms_layout(ckpt)
    n = 0
    for p in held_parameters(model.get_parameters(), layout):
        name = p.name[len(prefix):] if prefix and p.name.startswith(prefix) else p.name
        src = name if ms_layout else ms_to_hf(name, kind)
        if src not in ckpt:
            raise YouzhiError(f"{model_dir}: tensor {src} is missing; the checkpoint does not match config.json")
        lay = layout[p.name]
        block = rank_slice(ckpt.get(src), lay[0], lay[1], local_rank, opt_shard_size(lay[5] if len(lay) > 5 else ""))
        if tuple(block.shape) != tuple(p.shape):
            raise YouzhiError(f"{src}: this rank's slice is {tuple(block.shape)}, the compiled parameter is "
                              f"{tuple(p.shape)}; the checkpoint does not match config.json")
        p.set_data(ms.Tensor(block, p.dtype))
        n += 1
    return n
