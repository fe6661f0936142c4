"""Training: GKD recovery of a converted MLA student from its GQA teacher, or SFT of the student.

One process (or one msrun worker) holds the frozen teacher and the trainable student (or, with
`distill.offline_teacher`, the teacher's stored top-k file instead of the teacher: `teacher_topk.py`). The distill
loss is `chunked_loss.py`'s by default (`distill.loss=full`: the plain loss on full logits). Per optimizer step:

1. `gradient_accumulation_steps` global micro-batches are drawn (`data.EpochSampler`, `batch_size * world` rows
   each; this rank keeps rows rank, rank + world, ...). In distill mode each micro-batch is replaced, with probability
   `distill.lmbda` (one coin shared by all ranks), by prompts continued with the student's own samples
   (`data.StudentContinuation`, scored on the continuation only).
2. The number of scored tokens of the whole global batch is summed over ranks, and every micro-batch's loss is
   `sum of per-token losses / that number` (GKD generalized JSD, or SFT cross entropy). Gradients are summed over
   micro-batches (accumulators) and ranks (`nn.DistributedGradReducer`, SUM) inside the compiled update, then clipped
   by global norm and applied by AdamW (`optim.py`). The result is the gradient of the global token-mean however the
   batch is split, so 2 workers reproduce one process. In distill mode with 0 < jsd_beta < 1 the step's loss is
   checked against the largest value the generalized JSD can take before anything is applied (`step_guard.py`).
3. Rank 0 appends a row to `loss_log.jsonl` (`loss_log.py`), updates the progress bar, and every
   `save_checkpoint_steps` writes `checkpoint/step_XXXXXXXX/` atomically (`checkpointing.py`: student weights, AdamW
   moments, data position and the lambda coin's RNG state; no pickle; output_dir's layout: `run_output.py`).
   `resume_training` restores all of it and truncates the loss log to the checkpoint, so an interrupted-and-resumed
   run reproduces the uninterrupted one.

At `max_steps` the student is written as a Hugging Face directory `hf_model/` (the student's config.json and tokenizer
files, weights in `model.save_dtype`) that `load_model` and `tools/eval_ppl.py` read, plus `loss_curve.png`.

Model / pipeline parallel (Ascend only; refused on CPU): the step is `parallel.build_semi_auto_step` (sharded models
with explicit operator strategies and the plain GKD loss on the vocabulary-split logits, the live teacher in the same
graph, pipeline micro-batches as the accumulation, one graph per step, the same guard applied inside the graph),
compiled by tools/dryrun.py on CPU; it has not run on hardware here. Every rank checkpoints its parameter slices
(`step_N/rank_R/`) and MindSpore's strategy file (`strategy/`); tools/merge_slices.py turns them into the Hugging Face
directory.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from typing import Any, Dict, List, Optional

import mindspore as ms
import numpy as np
from mindspore import communication
from mindspore.nn.utils import no_init_parameters

from youzhi_ms.checkpoint.hf import read_config
from youzhi_ms.checkpoint.mindspore_ckpt import load_model, model_kind
from youzhi_ms.config import load_any_config
from youzhi_ms.data.tokenizer import Tokenizer
from youzhi_ms.errors import YouzhiError
from youzhi_ms.runtime import init_context
from youzhi_ms.train.checkpointing import rng_from_json, rng_state_to_json
from youzhi_ms.train.chunked_loss import ChunkedGKDNet, TeacherHidden, TopKGKDNet, head_weight
from youzhi_ms.train.data import (EpochSampler, StudentContinuation, build_dataset, collate, row_rngs,
                                  shard_rows)
from youzhi_ms.train.loop import run_training
from youzhi_ms.train.losses import GKDNet, SFTNet
from youzhi_ms.train.optim import (AllReduceSum, ApplyStep, FusedStep, MicroStep, ResetAccumulators, UpdateCore,
                                   lr_factor)
from youzhi_ms.train.parallel import (build_semi_auto_step, check_device, check_semi_auto, check_world,
                                      held_parameters, load_sharded_weights, local_rows, plan_parallel)
from youzhi_ms.train.run_config import RunConfig
from youzhi_ms.train.run_output import HF_DIR, RunOutput  # noqa: F401  (HF_DIR: the pipeline's name for hf_model/)
from youzhi_ms.train.step_guard import StepGuard
from youzhi_ms.train.teacher_topk import TopKStore

log = logging.getLogger("youzhi_ms.train")


# --------------------------------------------------------------------------------------------------------- distributed
def launched_by_msrun() -> bool:
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED")


def init_distributed():
    """(rank, world). Under msrun, `communication.init()` joins the cluster (in msrun's scheduler process it serves the
    cluster and never returns); otherwise a single process."""
    if not launched_by_msrun():
        return 0, 1
    communication.init()
    return communication.get_rank(), communication.get_group_size()


# ----------------------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Set-up (models, trainable set, optimizer, loss, step graphs, data) and one optimizer step (`train_step`). The
    loop that drives the steps is loop.py; what goes to output_dir is `self.output` (run_output.py); the
    corrupted-step check is `self.guard` (step_guard.py)."""

    def __init__(self, cfg: Dict[str, Any], rank: Optional[int] = None, world: Optional[int] = None):
        """`cfg`: run_config.load_run_config's validated dict, parsed here once into typed sections."""
        self.run_config = conf = RunConfig.parse(cfg)
        self.run_mode = conf.run_mode
        self.max_steps = conf.runner.max_steps
        self.micro_bs = conf.runner.batch_size
        self.accum = conf.runner.gradient_accumulation_steps
        self.seq_len = conf.runner.seq_length
        self.seed = conf.seed
        self.out = os.path.abspath(os.path.expanduser(conf.output_dir))  # '~/x' is the home folder's, not ./~
        self.device = conf.context.device_target
        check_device(cfg["parallel_config"], self.device)  # before anything heavy
        if conf.model.student is None:
            raise YouzhiError("model.student is not set; pass the converted MLA directory, e.g. "
                              "--set model.student=output/smollm2_mla")
        self.offline = conf.offline_teacher
        if conf.distilling and not self.offline and conf.distill.teacher is None:
            raise YouzhiError("distill.teacher is not set; pass the source (GQA) model directory, e.g. "
                              "--set distill.teacher=output/smollm2_hf")
        self._read_model_configs()

        init_context("graph" if conf.context.graph_mode else "pynative", device=self.device, seed=self.seed)
        if rank is None:
            rank, world = init_distributed()
        self.rank, self.world = rank, world
        self.is_main = rank == 0
        self._setup_parallel()
        self.output = RunOutput(self.out, self.rank, self.world, self.sharded, self._inputs())

    # ------------------------------------------------------------------------------------------------ set-up
    def _read_model_configs(self):
        self.student_dir = self.run_config.model.student
        self.student_cfg = load_any_config(read_config(self.student_dir),
                                           os.path.join(self.student_dir, "config.json"))
        self.teacher_cfg = None
        if self.run_config.distilling and not self.offline:
            self.teacher_dir = self.run_config.distill.teacher
            self.teacher_cfg = load_any_config(read_config(self.teacher_dir),
                                               os.path.join(self.teacher_dir, "config.json"))
            if self.teacher_cfg.vocab_size != self.student_cfg.vocab_size:
                raise YouzhiError(f"teacher vocab_size {self.teacher_cfg.vocab_size} != student vocab_size "
                                  f"{self.student_cfg.vocab_size}; GKD compares next-token distributions, so both "
                                  "must share the tokenizer (use the conversion's source model as the teacher)")
        for who, c in (("student", self.student_cfg), ("teacher", self.teacher_cfg)):
            if c is not None and self.seq_len > c.max_position_embeddings:
                raise YouzhiError(f"runner_config.seq_length {self.seq_len} exceeds the {who}'s "
                                  f"max_position_embeddings {c.max_position_embeddings}")

    def _setup_parallel(self):
        """The parallel plan and this rank's place in it: its data-parallel index among `dp_world` replicas and, with
        pipeline parallel, its pipeline stage (model parallel is the innermost rank dimension, stages the outermost)."""
        self.plan = plan_parallel(self.run_config.raw["parallel_config"], self.student_cfg.raw,
                                  self.teacher_cfg.raw if self.teacher_cfg else None, self.world)
        check_world(self.plan, self.world, self.device)
        self.ranks_per_pp_stage = self.world // self.plan.pipeline_stage
        self.rank_in_pp_stage = self.rank % self.ranks_per_pp_stage
        self.in_last_pp_stage = self.rank // self.ranks_per_pp_stage == self.plan.pipeline_stage - 1
        if self.plan.semi_auto:  # Ascend only (check_device refused it elsewhere); compiled by tools/dryrun.py
            check_semi_auto(self.run_config, self.plan)
            self.micro_bs = local_rows(self.run_config, self.plan)  # pipeline: all micro-batches of the step at once
            if self.run_config.context.max_device_memory:
                ms.set_context(max_device_memory=self.run_config.context.max_device_memory)
            self.dp_rank = self.rank_in_pp_stage // self.plan.model_parallel
            self.dp_world = self.plan.data_parallel
        else:
            self.dp_rank, self.dp_world = self.rank, self.world

    def _setup_models(self):
        """Models, then the trainable set and its optimizer, then the loss, then the compiled step graphs."""
        self.guard = StepGuard(self.run_config.distill.jsd_beta if self.run_config.distilling else None)
        self.allreduce = AllReduceSum() if self.world > 1 else None
        if self.plan.semi_auto:
            return self._build_semi_auto()
        self._load_models()
        self._select_trainable()
        self._build_optimizer()
        self._build_loss_net()
        self._build_step_graphs()

    def _load_models(self):
        self.student, _ = load_model(self.student_dir)
        self.student.set_train(True)
        if self.run_config.recompute:
            for layer in self.student.decoder.layers:  # keep layer inputs only; recompute the rest in the backward
                layer.recompute()
        self.teacher = self.topk = None
        if self.offline:
            distill = self.run_config.distill
            self.topk = TopKStore(distill.offline_teacher)
            self.topk.check_compatible(self.student_cfg.vocab_size, self.seq_len, distill.temperature)
        elif self.run_config.distilling:
            self.teacher, _ = load_model(self.teacher_dir)
            for p in self.teacher.get_parameters():  # distinct names: both models live in one graph
                p.name = "teacher." + p.name
                p.requires_grad = False

    def _select_trainable(self):
        """model.trainable: every student parameter, the attention ones only (`.self_attention.`), or those plus
        every RMSNorm weight (`attention+norms`: 35K more parameters, the layers' input scales)."""
        params = list(self.student.get_parameters())
        kind = self.run_config.model.trainable
        if kind == "all":
            train = params
        else:
            train = [p for p in params if ".self_attention." in p.name
                     or (kind == "attention+norms" and p.name.endswith("layernorm.weight"))]
        chosen = {id(p) for p in train}
        for p in params:
            p.requires_grad = id(p) in chosen
        if not train:
            raise YouzhiError("model.trainable selects no parameters")
        self.trainable = train

    def _group_learning_rates(self) -> List[float]:
        """Group 0 at learning_rate; group 1 (the latent `kv_layernorm`s) at kv_layernorm_learning_rate when set."""
        schedule = self.run_config.lr_schedule
        kv_lr = schedule.kv_layernorm_learning_rate
        return [float(schedule.learning_rate)] + ([float(kv_lr)] if kv_lr is not None else [])

    def _build_optimizer(self):
        """AdamW over the trainable set, one learning-rate group per _group_learning_rates; no weight decay on norms
        and biases."""
        self.group_lrs = self._group_learning_rates()
        kv_group = len(self.group_lrs) > 1
        group_ids = [1 if kv_group and ".kv_layernorm." in p.name else 0 for p in self.trainable]
        opt = self.run_config.optimizer
        decays = [float(opt.weight_decay) if len(p.shape) >= 2 else 0.0 for p in self.trainable]
        self.core = UpdateCore(self.trainable, group_ids, decays, tuple(opt.betas), opt.eps, opt.max_grad_norm,
                               self.world)  # semi-auto (which inserts its own reduction) does not come here

    def _build_semi_auto(self):
        """Model / pipeline parallel: the sharded step of parallel.build_semi_auto_step, built as placeholders and
        compiled first, so each rank then reads only the slices it holds (a 7B pair is 57 GB in float32; every rank
        loading it whole would need that much host memory per process); MindSpore's strategy file goes to
        `strategy/` with the first checkpoint, for tools/merge_slices.py."""
        if self.run_config.distilling and self.run_config.distill.loss == "chunked" and self.is_main:
            # the chunked loss multiplies by the head weight itself and would bypass the sharded head cells; with
            # the vocabulary split over model_parallel the full-logit tensors are 1/mp per rank anyway
            log.info("model / pipeline parallel: the sharded step's plain GKD loss (distill.loss=chunked applies to "
                     "data-parallel runs)")
        # written when the graph compiles, i.e. before output_dir is claimed: kept aside until the first checkpoint
        self.strategy_file = os.path.join(tempfile.mkdtemp(prefix="youzhi_strategy_"),
                                          f"strategy_rank_{self.rank}.ckpt")
        with no_init_parameters():
            self.parallel_net, self.pstep, self.student, self.teacher = build_semi_auto_step(
                self.run_config, self.plan, self.student_cfg, self.teacher_cfg, self.rank, self.world,
                strategy_file=self.strategy_file)
        ids = ms.Tensor(np.zeros((self.micro_bs, self.seq_len), np.int32))
        self.parallel_net.compile(ids, ids, ms.Tensor(np.zeros((self.micro_bs, self.seq_len), np.float32)))
        self.layout = self.parallel_net.parameter_layout_dict
        load_sharded_weights(self.student, self.student_dir, model_kind(self.student_cfg), self.layout,
                             self.rank_in_pp_stage)
        if self.teacher is not None:
            load_sharded_weights(self.teacher, self.teacher_dir, model_kind(self.teacher_cfg), self.layout,
                                 self.rank_in_pp_stage, prefix="teacher.")
        self.core = self.pstep.core
        self.trainable = list(self.core.params)
        self.group_lrs = self._group_learning_rates()
        self.fused = None
        self.teacher_hidden = self.topk = None  # offline / separate teacher: refused by check_semi_auto

    def _held(self, params) -> list:
        """Parameters this rank holds: all of them, or under model / pipeline parallel its compiled slices."""
        return held_parameters(params, self.layout) if self.plan.semi_auto else list(params)

    def _build_loss_net(self):
        """distill: the chunked vocabulary loss (from the live teacher, in or out of the training graph, or from the
        stored top-k file), or the plain one on full logits (distill.loss=full); sft: cross entropy."""
        distill = self.run_config.distill
        self.teacher_hidden = None
        if self.run_config.distilling and distill.loss == "chunked":
            head_trains = any(p is head_weight(self.student) for p in self.trainable)
            if self.offline:
                self.loss_net = TopKGKDNet(self.student, distill.jsd_beta, distill.temperature,
                                           distill.loss_chunk_tokens, head_trains)
            else:
                separate = distill.teacher_graph == "separate"
                self.loss_net = ChunkedGKDNet(self.student, self.teacher, distill.jsd_beta, distill.temperature,
                                              distill.loss_chunk_tokens, head_trains, teacher_outside=separate)
                self.teacher_hidden = TeacherHidden(self.teacher) if separate else None
        elif self.run_config.distilling:
            self.loss_net = GKDNet(self.student, self.teacher, distill.jsd_beta, distill.temperature)
        else:
            self.loss_net = SFTNet(self.student)

    def _build_step_graphs(self):
        """One fused graph (forward, backward, update) when there is nothing to check or accumulate; otherwise a
        micro-step graph accumulating gradients and an apply graph, so a bounded loss is checked before its update
        is applied (see train_step)."""
        self.fused = None
        if self.accum == 1 and self.guard.loss_bound is None:
            self.fused = FusedStep(self.loss_net, self.core)
        else:
            self.accumulators = self.core.params.clone(prefix="accum", init="zeros")
            self.micro = MicroStep(self.loss_net, self.core, self.accumulators)
            self.apply = ApplyStep(self.core, self.accumulators)
            self.reset = ResetAccumulators(self.accumulators)

    def _setup_data(self):
        self.tokenizer = Tokenizer.from_dir(self.student_dir)
        tok = self.tokenizer
        self.pad_id = tok.pad_id if tok.pad_id is not None else tok.eot_id
        self.dataset = build_dataset(self.run_config.raw["train_dataset"], tok, self.seq_len, self.pad_id)
        # run_mode sft on a packed text (wiki split, .txt, .jsonl with "text") scores every token: continued
        # pre-training on a domain corpus (tools/pipeline.py's domain step); on chat data only the responses
        self.sampler = EpochSampler(len(self.dataset), self.seed, self.run_config.train_dataset.shuffle)
        self.coin = np.random.default_rng([self.seed, 7])  # on-policy decisions, identical on every rank
        self.continuation = None
        distill = self.run_config.distill
        if self.run_config.distilling and distill.lmbda > 0:
            self.continuation = StudentContinuation(self.student, self.student_cfg, self.seq_len,
                                                    distill.max_new_tokens, distill.temperature, distill.top_p,
                                                    (tok.eos_id, tok.eot_id), self.pad_id)

    # ------------------------------------------------------------------------------------------------ helpers
    def _sum_over_ranks(self, values: List[float]) -> np.ndarray:
        """Sum over data-parallel groups (model / pipeline replicas of one group hold the same values)."""
        arr = np.asarray(values, np.float32)
        if self.allreduce is None:
            return arr.astype(np.float64)
        total = self.allreduce(ms.Tensor(arr)).asnumpy().astype(np.float64)
        return total / (self.world // self.dp_world)

    def lrs(self, step: int) -> List[float]:
        """Each learning-rate group's rate at optimizer step `step` (0-based)."""
        schedule = self.run_config.lr_schedule
        total = schedule.total_steps or self.max_steps
        warmup = schedule.warmup_steps if schedule.warmup_steps is not None else \
            int(round(schedule.warmup_ratio * total))
        factor = lr_factor(step, total, warmup, schedule.min_lr_ratio)
        return [lr * factor for lr in self.group_lrs]

    def next_micro_batch(self, step: int, micro: int) -> Dict[str, Any]:
        """This rank's part of global micro-batch `micro` of optimizer step `step` (0-based)."""
        global_rows = self.sampler.take(self.micro_bs * self.dp_world)
        local = shard_rows(np.arange(len(global_rows)), self.dp_rank, self.dp_world)
        batch = collate([self.dataset[int(global_rows[i])] for i in local])
        batch["rows"] = [int(global_rows[i]) for i in local]  # dataset windows (the offline teacher's key)
        on_policy = False
        if self.run_config.distilling:
            on_policy = bool(self.coin.random() < self.run_config.distill.lmbda)
        if on_policy:
            prompts = self.continuation.prompts(batch, self.dataset.prompt_keeps_end)
            batch = self.continuation(prompts, row_rngs(self.seed, step, micro, local))
        batch["on_policy"] = on_policy
        return batch

    # ------------------------------------------------------------------------------------------------ checkpoints
    @property
    def sharded(self) -> bool:
        """Model / pipeline parallel (Ascend): every rank holds parameter slices and checkpoints its own."""
        return self.plan.semi_auto

    def checkpoints(self) -> List[str]:
        """Complete checkpoint step directories (for this rank's files), oldest first."""
        return self.output.checkpoints()

    def _run_signature(self) -> dict:
        return {"run_mode": self.run_mode, "global_batch": self.micro_bs * self.dp_world * self.accum,
                "micro_batch_global": self.micro_bs * self.dp_world, "seq_length": self.seq_len,
                "trainable": [p.name for p in self.trainable], "seed": self.seed,
                "gradient_accumulation_steps": self.run_config.runner.gradient_accumulation_steps}

    def _optimizer_params(self) -> list:
        return self._held(list(self.core.m) + list(self.core.v))

    def save_checkpoint(self, step: int) -> Optional[str]:
        """Data parallel: rank 0 writes the (replicated) state. Sharded: every rank writes its slices to rank_R/."""
        if not (self.is_main or self.sharded):
            return None
        state = {"data": self.sampler.state_dict(), "rng": rng_state_to_json(self.coin),
                 "signature": self._run_signature(), "world_size": self.world}
        return self.output.save_checkpoint(step, self._held(self.student.get_parameters()), self._optimizer_params(),
                                           state, self.run_config.keep_checkpoint_max,
                                           self.strategy_file if self.sharded else None)

    def load_checkpoint(self, path: str) -> int:
        state = self.output.load_checkpoint(path, self._run_signature(), self._held(self.student.get_parameters()),
                                            self._optimizer_params())
        self.sampler.load_state_dict(state["data"])
        self.coin = rng_from_json(state["rng"])
        return int(state["step"])

    # ------------------------------------------------------------------------------------------------ outputs
    def _inputs(self) -> list:
        return [("model.student", self.student_dir), ("distill.teacher", self.run_config.distill.teacher),
                ("train_dataset.data_path", self.run_config.train_dataset.data_path)]

    def _check_output(self, resume: bool, overwrite: bool) -> None:
        self.output.check(resume, overwrite)

    def _prepare_output(self, resume: bool, overwrite: bool) -> int:
        """Returns the step to start from (restoring the newest checkpoint when resuming)."""
        start = self.load_checkpoint(self.checkpoints()[-1]) if resume else 0
        self.output.claim(resume, overwrite, start, self.run_config.raw)
        return start

    def export_hf(self) -> str:
        """The trained student as a Hugging Face directory next to the checkpoints (rank 0)."""
        return self.output.export_hf(self.student, self.student_cfg, self.student_dir, self.run_config.model.save_dtype)

    def weights_digest(self) -> str:
        h = hashlib.sha256()
        for p in self._held(self.student.get_parameters()):
            h.update(p.name.encode())
            h.update(np.ascontiguousarray(p.asnumpy()).tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------------------------------------ one step
    def train_step(self, step: int) -> Dict[str, Any]:
        t0 = time.time()
        batches = [self.next_micro_batch(step, m) for m in range(self.accum)]
        local = float(sum(b["loss_mask"].sum() for b in batches))
        count = float(self._sum_over_ranks([local])[0])
        scale = ms.Tensor(1.0 / max(count, 1.0), ms.float32)
        lrs = self.lrs(step)
        b1, b2 = self.run_config.optimizer.betas
        update_args = (ms.Tensor(np.asarray(lrs, np.float32)), ms.Tensor(1.0 - float(b1) ** (step + 1), ms.float32),
                       ms.Tensor(1.0 - float(b2) ** (step + 1), ms.float32))
        inputs = [self._net_inputs(b, scale) for b in batches]
        row = {"step": step + 1, "loss": None, "lr": lrs[0], "grad_norm": None, "tokens": int(count),
               "on_policy": [b["on_policy"] for b in batches]}
        if self.plan.semi_auto:  # one sharded graph per step; its loss takes (ids, labels, mask) only
            self.pstep.set_hyper(float(scale.asnumpy()), *[float(a.asnumpy()) for a in update_args[1:]], lrs)
            self.guard.checked_in_graph(step, lambda: self._semi_auto_call(inputs[0][:3]), row)
        elif self.fused is not None:
            loss, norm = self.fused(*update_args, ms.mutable(inputs[0]))
            row["loss"] = float(loss.asnumpy())
            row["grad_norm"] = float(norm.asnumpy())
        else:
            self.guard.accumulated_update(step, lambda: self._accumulate(inputs),
                                          lambda: float(self.apply(*update_args).asnumpy()), self.reset, row)
        row["seconds"] = round(time.time() - t0, 4)
        return row

    def _net_inputs(self, batch: dict, scale) -> tuple:
        """The loss net's inputs for micro-batch `batch`: ids, labels, mask, scale, then the teacher's part when it
        is not computed inside the training graph (its hidden states from its own graph, or the stored top-k)."""
        ids = ms.Tensor(batch["input_ids"], ms.int32)
        inputs = (ids, ms.Tensor(batch["labels"], ms.int32), ms.Tensor(batch["loss_mask"], ms.float32), scale)
        if self.teacher_hidden is not None:
            inputs += (self.teacher_hidden(ids),)
        elif self.topk is not None:
            stored = self.topk.batch(batch["rows"], batch["input_ids"])
            inputs += (ms.Tensor(stored["ids"]), ms.Tensor(stored["lq_top"]), ms.Tensor(stored["lq_tail"]))
        return inputs

    def _accumulate(self, inputs: list) -> float:
        """The micro-batches' gradients into the accumulators; returns the step's global loss."""
        loss_local = sum(float(self.micro(ms.mutable(x)).asnumpy()) for x in inputs)
        return float(self._sum_over_ranks([loss_local])[0]) if self.world > 1 else loss_local

    def _semi_auto_call(self, batch: tuple) -> tuple:
        """One call of the sharded graph: (global loss, gradient norm, applied). The loss is the last pipeline
        stage's; every rank of that stage holds the same global loss."""
        loss, norm, ok = self.parallel_net(*batch)
        mine = float(loss.asnumpy()) if self.in_last_pp_stage else 0.0
        total = float(self._sum_over_ranks([mine])[0]) * self.world / self.dp_world / self.ranks_per_pp_stage \
            if self.world > 1 else mine
        return total, float(norm.asnumpy()), bool(ok.asnumpy())

    # ------------------------------------------------------------------------------------------------ the loop
    def run(self, resume: bool = False, progress: Optional[bool] = None, overwrite: bool = False) -> Dict[str, Any]:
        """The whole run (loop.py). `overwrite`: start over in an output_dir holding an earlier youzhi_ms run."""
        return run_training(self, resume, progress, overwrite)


def train(cfg: Dict[str, Any], resume: bool = False, progress: Optional[bool] = None,
          overwrite: bool = False) -> Dict[str, Any]:
    """Run a training job from a validated config (see run_config.load_run_config)."""
    return Trainer(cfg).run(resume=resume, progress=progress, overwrite=overwrite)
