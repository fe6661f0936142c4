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
parallel); this only changes the recorded strategy of the row-parallel layers' output.

MindSpore's CPU backend has no semi-auto / auto parallel (measured: "Invalid communication backend: CPU ... only
support Ascend/GPU"), so model_parallel or pipeline_stage > 1 is refused on CPU by `check_world`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from youzhi_ms.errors import YouzhiError

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
    stages: Dict[str, int] = field(default_factory=dict)

    @property
    def device_num(self) -> int:
        return self.data_parallel * self.model_parallel * self.pipeline_stage

    @property
    def semi_auto(self) -> bool:
        return self.model_parallel > 1 or self.pipeline_stage > 1


def _get(cfg, key, default=None):
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _model_dims(cfg) -> dict:
    """Works on HF config.json dicts and on SourceConfig / MLAConfig objects."""
    is_mla = (_get(cfg, "model_type") == "deepseek_v3" or _get(cfg, "kv_lora_rank") is not None)
    layers = _get(cfg, "num_hidden_layers", None) or _get(cfg, "num_layers")
    heads = _get(cfg, "num_attention_heads", None) or _get(cfg, "num_heads")
    kv = _get(cfg, "num_key_value_heads", None) or _get(cfg, "num_kv_heads", None) or heads
    return dict(mla=is_mla, layers=int(layers), heads=int(heads), kv_heads=int(kv),
                inter=int(_get(cfg, "intermediate_size")), vocab=int(_get(cfg, "vocab_size")),
                q_lora=_get(cfg, "q_lora_rank"), tied=bool(_get(cfg, "tie_word_embeddings", False)))


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
    stages: Dict[str, int] = {}
    table[prefix + "embedding.word_embeddings"] = ((dp, 1), (1, 1)) if vocab_dp else ((dp, 1), (mp, 1))
    stages[prefix + "embedding"] = 0
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
        stages[p.rstrip(".")] = i * pp // dims["layers"]
    if not dims["tied"]:
        table[prefix + "output_layer"] = col
    stages[prefix + "decoder.final_layernorm"] = pp - 1
    stages[prefix + "output_layer"] = pp - 1
    return table, stages


def plan_parallel(parallel_config: dict, student_cfg, teacher_cfg=None, world_size: Optional[int] = None) \
        -> ParallelPlan:
    """The layout for `parallel_config` (MindFormers keys). data_parallel None means world_size / (mp * pp)."""
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
    table, stages = _model_table(_model_dims(student_cfg), dp, mp, pp, seq_par, vocab_dp, "", "student")
    if teacher_cfg is not None:
        t_table, t_stages = _model_table(_model_dims(teacher_cfg), dp, mp, pp, seq_par, vocab_dp, "teacher.",
                                         "teacher")
        table.update(t_table)
        stages.update(t_stages)
    return ParallelPlan(dp, mp, pp, micro, seq_par, vocab_dp, table, stages)


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


def apply_plan(plan: ParallelPlan, cells_by_name: dict) -> None:
    """Ascend only (semi-auto parallel): attach the table to the cells with `Cell.shard` and set pipeline stages.

    `cells_by_name` maps a cell name of the table / stage map to the cell (e.g. `dict(net.cells_and_names())`).
    Used with parallel_mode auto_parallel + sharding propagation (Cell.shard fixes the linears, the ops in between
    are derived). NOT exercised here: MindSpore's CPU backend has no semi-auto / auto parallel and no Ascend machine
    was available, so this function has never run; the strategy table itself is what the tests check.
    """
    for name, strategy in plan.strategies.items():
        cell = cells_by_name.get(name)
        if cell is None:
            continue
        act, weight = strategy[0], strategy[1]
        if name.endswith("word_embeddings"):  # ids [B, S]
            cell.shard(in_strategy=((act[0], 1),), parameter_plan={"self.weight": weight})
        else:  # x [B, S, in]: batch split by dp, features as in the 2-D layout
            cell.shard(in_strategy=((act[0], 1, act[1]),), parameter_plan={"self.weight": weight})
    for name, stage in plan.stages.items():
        cell = cells_by_name.get(name)
        if cell is not None:
            cell.pipeline_stage = stage
