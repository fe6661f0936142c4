"""The dry run of a model / pipeline parallel training plan: check the plan, compile one rank per pipeline stage with
MindSpore's parallel compiler under DryRun (compile_rank.py, one child process each), and turn the compiled slices
into the per-rank memory table (memory.py) against the 64 GB of an Ascend 910B card.

A rank's memory depends only on its pipeline stage (the ranks of one stage hold slices of equal size), so the first
rank of every stage is compiled ("rank roles"); `rank=` compiles one given rank instead. Without CANN the children load
the compile-only stand-in (cann_standin.py); with CANN installed they use it, and `level=1` asks MindSpore for its own
memory statistics (DryRun level 1; not available with the stand-in).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from youzhi_ms.config import load_any_config
from youzhi_ms.contract import read_config_json
from youzhi_ms.dryrun import cann_standin, memory
from youzhi_ms.errors import YouzhiError
from youzhi_ms.fsutil import atomic_output_dir
from youzhi_ms.train.parallel import check_semi_auto, param_shapes, plan_parallel
from youzhi_ms.train.run_config import RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class DryRunResult:
    report: dict
    table: str
    fits: bool
    limit_bytes: int
    worst: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ model shapes
def _read_config_json(path: str, what: str) -> dict:
    p = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(p):
        raise YouzhiError(f"{what}: {p} does not exist; give a config.json or a model directory that holds one")
    return read_config_json(p)


def _resolve(path: Optional[str]) -> Optional[str]:
    """Relative yaml paths are tried against the working directory, then the repository root."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    if os.path.exists(os.path.join(ROOT, path)):
        return os.path.join(ROOT, path)
    return path


def model_configs(run: RunConfig, student: Optional[str], teacher: Optional[str]):
    """(student config dict, teacher config dict or None, where each came from). Order: the command-line flag, the
    trained-model directory of the yaml if it is on this machine, the yaml's dry_run section."""
    found = []
    for who, flag, run_path, fallback in (("student", student, run.model.student, run.dry_run.student_config),
                                          ("teacher", teacher, run.distill.teacher, run.dry_run.teacher_config)):
        if who == "teacher" and not run.distilling:
            found.append((None, None))
            continue
        run_path = _resolve(run_path)
        if run_path and os.path.isfile(os.path.join(run_path, "config.json")) and not flag:
            source = run_path
        else:
            source = _resolve(flag or fallback)
        if not source:
            key = "model.student" if who == "student" else "distill.teacher"
            raise YouzhiError(f"no {who} model shapes: {key} ({run_path}) has no config.json here; pass "
                              f"--{who}-config PATH (a config.json or model directory) or set "
                              f"dry_run.{who}_config in the yaml")
        found.append((_read_config_json(source, f"--{who}-config"), source))
    (student_config, student_source), (teacher_config, teacher_source) = found
    return student_config, teacher_config, {"student": student_source, "teacher": teacher_source}


# ------------------------------------------------------------------------------------------------ the plan
def check_plan(run: RunConfig, student: dict, teacher: Optional[dict]):
    """The plan as the trainer would build it on Ascend, with its refusals (one YouzhiError each)."""
    models = {"student": load_any_config(student), "teacher": load_any_config(teacher) if teacher is not None else None}
    if models["teacher"] is not None and models["teacher"].vocab_size != models["student"].vocab_size:
        raise YouzhiError(f"teacher vocab_size {models['teacher'].vocab_size} != student vocab_size "
                          f"{models['student'].vocab_size}; GKD needs one tokenizer")
    if run.parallel_config.data_parallel is None:
        raise YouzhiError("parallel_config.data_parallel is null; a dry run needs the cluster size: set "
                          "data_parallel (devices = data_parallel x model_parallel x pipeline_stage)")
    plan = plan_parallel(run.raw["parallel_config"], student, teacher)
    if not plan.semi_auto:
        raise YouzhiError("parallel_config has model_parallel 1 and pipeline_stage 1: that is a data-parallel run "
                          "(tools/train.py under msrun), which the dry run does not model; set model_parallel or "
                          "pipeline_stage > 1")
    if run.parallel.parallel_mode != "semi_auto_parallel":
        raise YouzhiError("parallel.parallel_mode must be semi_auto_parallel for model / pipeline parallel plans")
    if run.context.device_target != "Ascend":
        raise YouzhiError("context.device_target must be Ascend for a model / pipeline parallel plan")
    check_semi_auto(run, plan)
    for who, c in models.items():
        if c is not None and run.runner.seq_length > c.max_position_embeddings:
            raise YouzhiError(f"runner_config.seq_length {run.runner.seq_length} exceeds the {who}'s "
                              f"max_position_embeddings {c.max_position_embeddings}")
    return plan


def expected_slices(plan, student: dict, teacher: Optional[dict]) -> Dict[str, List[int]]:
    """Slice shape of every linear / embedding weight predicted by the plan's strategy table (weight strategy:
    the split of [out, in] resp. [vocab, hidden])."""
    shapes = param_shapes(student)
    if teacher is not None:
        shapes.update({"teacher." + k: v for k, v in param_shapes(teacher).items()})
    out = {}
    for cell, strategy in plan.strategies.items():
        name = cell + ".weight"
        if name not in shapes:
            continue
        split = strategy[1]
        out[name] = [d // s for d, s in zip(shapes[name], split)]
    return out


# ------------------------------------------------------------------------------------------------ children
def _child_env(standin, rank: int, world: int, level: int, log_level: str) -> Dict[str, str]:
    env = standin.child_env() if standin is not None else dict(os.environ)
    env.update(MS_SIMULATION_LEVEL=str(level), RANK_SIZE=str(world), RANK_ID=str(rank), GLOG_v=log_level,
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p))
    for var in ("MS_ROLE", "MS_WORKER_NUM", "MS_SCHED_HOST", "MS_SCHED_PORT"):  # never join a real cluster
        env.pop(var, None)
    return env


def _start(job: dict, workdir: str, env: Dict[str, str]):
    tag = f"rank_{job['rank']}"
    job_path = os.path.join(workdir, f"{tag}.job.json")
    job["out"] = os.path.join(workdir, f"{tag}.result.json")
    job["log"] = os.path.join(workdir, f"{tag}.log")
    with open(job_path, "w") as f:
        json.dump(job, f)
    with open(job["log"], "w") as lf:
        proc = subprocess.Popen([sys.executable, "-m", "youzhi_ms.dryrun.compile_rank", job_path], cwd=workdir,
                                env=env, stdout=lf, stderr=subprocess.STDOUT)
    return proc, time.time()


def _collect(job: dict, proc, t0: float) -> dict:
    if not os.path.isfile(job["out"]):
        if proc.returncode is not None and proc.returncode < 0:  # killed: the kernel's OOM killer sends SIGKILL
            raise YouzhiError(f"the compile of rank {job['rank']} was killed (signal {-proc.returncode}) after "
                              f"{int(time.time() - t0)} s; a full-depth compile holds the whole graph in host memory "
                              "(7B: ~8 GB, 14B: more than 19 GB): free memory, or check the plan at its real widths "
                              f"with --layers-per-stage 1; log {job['log']}")
        tail = open(job["log"], errors="replace").read()[-1500:]
        raise RuntimeError(f"the compile of rank {job['rank']} died (exit {proc.returncode}) without a result; "
                           f"log {job['log']}:\n{tail}")
    with open(job["out"]) as f:
        res = json.load(f)
    res["log"] = job["log"]
    # DryRun level 1 (real CANN only): MindSpore logs its own memory statistics (GLOG_v=1)
    with open(job["log"], errors="replace") as f:
        res["mindspore_memory"] = [line.strip()[-300:] for line in f if "peak memory" in line.lower()][-20:]
    res["wall_seconds"] = round(time.time() - t0, 1)
    return res


def _compile_all(jobs: List[dict], envs: List[Dict[str, str]], workdir: str, parallel: int,
                 log: Callable[[str], None]) -> List[dict]:
    """Run the children, at most `parallel` at a time; any failure (or Ctrl-C) stops the ones still running."""
    pending = list(zip(jobs, envs))
    running, done = [], {}
    t_start = time.time()
    next_note = 60
    try:
        while pending or running:
            while pending and len(running) < parallel:
                job, env = pending.pop(0)
                proc, t0 = _start(job, workdir, env)
                running.append((job, proc, t0))
            time.sleep(1)
            for item in list(running):
                job, proc, t0 = item
                if proc.poll() is not None:
                    running.remove(item)
                    res = _collect(job, proc, t0)
                    done[job["rank"]] = res
                    if res.get("ok"):
                        log(f"  rank {job['rank']}: compiled in {res['wall_seconds']} s, peak host memory "
                            f"{res['peak_rss_gb']} GB")
                    else:
                        return [done[j["rank"]] for j in jobs if j["rank"] in done]
            if time.time() - t_start >= next_note and running:
                log(f"  ... still compiling rank(s) {[j['rank'] for j, _, _ in running]} "
                    f"({int(time.time() - t_start)} s)")
                next_note += 60
    finally:
        for _, proc, _ in running:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return [done[j["rank"]] for j in jobs]


# ------------------------------------------------------------------------------------------------ the run
def _standin_unless_cann(level: int, cache_dir: Optional[str], log):
    """None when a real CANN is installed, else the compile-only stand-in (level 0 only), built or reused."""
    cann = cann_standin.real_cann_root()
    if cann is not None:
        log(f"CANN: {cann}")
        return None
    if level != 0:
        raise YouzhiError("--level 1 needs CANN (MindSpore's memory statistics run the device kernels' host "
                          "side); this machine has none, and the compile-only stand-in supports level 0 only")
    standin = cann_standin.ensure_standin(cache_dir, log=log)
    log(f"CANN: not installed; using the compile-only stand-in {standin.root} (mindspore "
        f"{standin.manifest['mindspore_version']}; DryRun level 0: compile only, nothing runs)")
    return standin


def _compiled_depth(student: dict, teacher: Optional[dict], pp: int, layers_per_stage: Optional[int]):
    """The (student, teacher) config dicts the ranks compile: `layers_per_stage` x `pp` layers when given (every
    layer of a stage compiles to the same slices; build_report scales them back to the real depth)."""
    compiled_student, compiled_teacher = dict(student), dict(teacher) if teacher else None
    if layers_per_stage is not None:
        depth = layers_per_stage * pp
        if depth > int(student["num_hidden_layers"]) or (teacher and depth > int(teacher["num_hidden_layers"])):
            raise YouzhiError(f"--layers-per-stage {layers_per_stage} x {pp} stages exceeds the "
                              "models' depth; use a smaller value or leave it out")
        compiled_student["num_hidden_layers"] = depth
        if compiled_teacher:
            compiled_teacher["num_hidden_layers"] = depth
    return compiled_student, compiled_teacher


def dry_run(cfg: dict, student_path: Optional[str] = None, teacher_path: Optional[str] = None,
            rank: Optional[int] = None, level: int = 0, layers_per_stage: Optional[int] = None,
            strategy_dir: Optional[str] = None, cache_dir: Optional[str] = None, keep_workdir: bool = False,
            jobs_at_once: int = 1, overwrite: bool = False, log: Callable[[str], None] = print) -> DryRunResult:
    """`cfg`: load_run_config's dict (sent as it is to the compile workers)."""
    run = RunConfig.parse(cfg)
    student, teacher, sources = model_configs(run, student_path, teacher_path)
    plan = check_plan(run, student, teacher)
    world = plan.device_num
    ranks_per_pp_stage = world // plan.pipeline_stage
    if rank is not None and not 0 <= rank < world:
        raise YouzhiError(f"--rank {rank} is outside the plan's {world} ranks (0..{world - 1})")
    if level not in (0, 1):
        raise YouzhiError(f"--level {level}: DryRun levels 0 (compile) and 1 (compile + memory statistics) are "
                          "supported")
    standin = _standin_unless_cann(level, cache_dir, log)
    compiled_student, compiled_teacher = _compiled_depth(student, teacher, plan.pipeline_stage, layers_per_stage)
    roles = [rank] if rank is not None else [s * ranks_per_pp_stage for s in range(plan.pipeline_stage)]
    workdir = tempfile.mkdtemp(prefix="youzhi_dryrun_")
    jobs, envs = [], []
    for role in roles:
        job = {"config": cfg, "student_config": compiled_student, "teacher_config": compiled_teacher,
               "rank": role, "world": world}
        if strategy_dir:  # written by the children into the work directory, moved into place when all compiled
            job["strategy_file"] = os.path.join(workdir, "strategy", f"strategy_rank_{role}.ckpt")
        jobs.append(job)
        envs.append(_child_env(standin, role, world, level, "3" if level == 0 else "1"))
    log(f"compiling rank(s) {roles} (one per pipeline stage of {plan.pipeline_stage}; {world} ranks: dp "
        f"{plan.data_parallel} x mp {plan.model_parallel} x pp {plan.pipeline_stage})"
        + (f", {layers_per_stage} layer(s) per stage" if layers_per_stage else "")
        + (f", {jobs_at_once} at a time" if jobs_at_once > 1 else ""))
    ok = False
    try:
        results = _compile_all(jobs, envs, workdir, max(1, jobs_at_once), log)
        for res in results:
            res["stage"] = res["rank"] // ranks_per_pp_stage  # the report's "stage": the pipeline stage
            if not res.get("ok"):
                raise YouzhiError(f"MindSpore's parallel compiler rejected rank {res['rank']} (stage {res['stage']}) "
                                  f"of this plan: {res.get('error')}; log {res['log']}")
        if strategy_dir:
            with atomic_output_dir(strategy_dir, overwrite, flag="--strategy-dir", kind="strategy files") as tmp:
                for name in sorted(os.listdir(os.path.join(workdir, "strategy"))):
                    shutil.copy2(os.path.join(workdir, "strategy", name), os.path.join(tmp, name))
        ok = True
    finally:
        if ok and not keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report = build_report(run, plan, student, teacher, results, compiled_student, compiled_teacher, level,
                          standin is not None, sources)
    report["workdir"] = workdir if keep_workdir else None
    limit = report["limit_bytes"]
    fits = all(r["total_bytes"] <= limit for r in report["ranks"])
    worst = max(report["ranks"], key=lambda r: r["total_bytes"])
    return DryRunResult(report, format_table(report), fits, limit, worst)


def _unsharded_bytes(parameters_full: List[tuple]) -> int:
    return sum(memory._prod(shape) * memory.dtype_bytes(dt) for shape, dt in parameters_full)


def _compiled_rank_memory(run: RunConfig, plan, student, teacher, res, compiled_student, compiled_teacher) -> dict:
    """Held (parameters, gradients, optimizer) and activation bytes of compiled rank `res`, scaled back to the real
    depth when a reduced depth was compiled."""
    pp, pp_stage = plan.pipeline_stage, res["stage"]
    trainable = {p["name"] for p in res["parameters"] if not p["name"].startswith(("teacher.", "adam_", "accu_"))
                 and p["name"] != "step_hyper"}
    scale = None
    if int(compiled_student["num_hidden_layers"]) != int(student["num_hidden_layers"]):
        def factor(full, comp):
            compiled = memory.layers_on_pp_stage(int(comp["num_hidden_layers"]), pp, pp_stage)
            return memory.layers_on_pp_stage(int(full["num_hidden_layers"]), pp, pp_stage) / compiled \
                if compiled else 0.0
        scale = {"student": factor(student, compiled_student),
                 "teacher": factor(teacher, compiled_teacher) if teacher else 0.0}
    if run.model.trainable == "attention":
        trainable = {n for n in trainable if ".self_attention." in n}
    held = memory.held_bytes(res["parameters"], pp > 1, trainable, scale)
    act = memory.activation_bytes(run, student, teacher, plan.data_parallel, plan.model_parallel, pp, pp_stage,
                                  plan.micro_batch_num, memory.gathered_bytes(res["parameters"], scale))
    return {"held": held, "act": act, "rank": res["rank"], "seconds": res["wall_seconds"],
            "peak_rss_gb": res["peak_rss_gb"], "mindspore_memory": res.get("mindspore_memory", [])}


def _check_slices(res: dict, expect: Dict[str, Any]) -> int:
    """How many of the plan's slice shapes compiled rank `res` holds; a different one is a planner bug."""
    names = {p["name"]: p for p in res["parameters"]}
    for name, shape in expect.items():
        if name in names and names[name]["slice_shape"] != shape:
            raise RuntimeError(f"rank {res['rank']}: {name} compiled to slice {names[name]['slice_shape']}, "
                               f"the plan's strategy table says {shape}")
    return sum(1 for name in expect if name in names)


def build_report(run: RunConfig, plan, student, teacher, results, compiled_student, compiled_teacher, level, standin,
                 sources):
    """The dry run's report: every rank's bytes (a rank's memory is that of its pipeline stage's compiled rank),
    the limit they must fit, and how the numbers were obtained. Report keys say `stage` for the pipeline stage."""
    world, pp = plan.device_num, plan.pipeline_stage
    ranks_per_pp_stage = world // pp
    expect = expected_slices(plan, compiled_student, compiled_teacher)
    checked = sum(_check_slices(res, expect) for res in results)
    by_pp_stage = {res["stage"]: _compiled_rank_memory(run, plan, student, teacher, res, compiled_student,
                                                       compiled_teacher) for res in results}
    full = [(shape, "float32") for shape in param_shapes(student).values()]
    if teacher is not None:
        full += [(shape, "float32") for shape in param_shapes(teacher).values()]
    limit = min(memory.CARD_BYTES, memory.parse_memory(run.context.max_device_memory) or memory.CARD_BYTES)
    ranks = []
    for rank in range(world):
        pp_stage = rank // ranks_per_pp_stage
        if pp_stage not in by_pp_stage:
            continue
        held, act = by_pp_stage[pp_stage]["held"], by_pp_stage[pp_stage]["act"]
        ranks.append({"rank": rank, "stage": pp_stage, "param_bytes": held["param"], "grad_bytes": held["grad"],
                      "optimizer_bytes": held["optimizer"], "activation_bytes": act["total"],
                      "total_bytes": held["param"] + held["grad"] + held["optimizer"] + act["total"]})
    return {
        "world_size": world, "data_parallel": plan.data_parallel, "model_parallel": plan.model_parallel,
        "pipeline_stage": pp, "unsharded_param_bytes": _unsharded_bytes(full), "ranks": ranks,
        "limit_bytes": limit, "card_bytes": memory.CARD_BYTES,
        "compiled": [{"rank": v["rank"], "stage": s, "seconds": v["seconds"], "peak_host_rss_gb": v["peak_rss_gb"],
                      "mindspore_memory_log": v["mindspore_memory"]} for s, v in sorted(by_pp_stage.items())],
        "activation_estimate": {str(s): v["act"] for s, v in sorted(by_pp_stage.items())},
        "strategy_table_checked": checked,
        "depth_reduced": int(compiled_student["num_hidden_layers"]) != int(student["num_hidden_layers"]),
        "compiled_layers": {"student": int(compiled_student["num_hidden_layers"]),
                            "teacher": int(compiled_teacher["num_hidden_layers"]) if compiled_teacher else None},
        "dryrun_level": level, "cann": "compile-only stand-in" if standin else "installed",
        "model_configs": sources, "micro_batch_num": plan.micro_batch_num,
        "batch_size": run.runner.batch_size, "seq_length": run.runner.seq_length, "recompute": run.recompute,
        "parallel_optimizer": run.parallel.enable_parallel_optimizer,
    }


def _gb(n: int) -> str:
    return f"{n / memory.GiB:6.2f}"


def format_table(report: dict) -> str:
    rows = []
    by_pp_stage = {}
    for r in report["ranks"]:
        by_pp_stage.setdefault(r["stage"], []).append(r)
    head = (f"{'ranks':<12} {'stage':>5} {'params':>8} {'grads':>8} {'optim':>8} {'activ*':>8} {'total':>8}  "
            f"of {memory.human(report['limit_bytes'])}")
    rows.append(head)
    rows.append("-" * len(head))
    for s, rs in sorted(by_pp_stage.items()):
        r = rs[0]
        span = f"{rs[0]['rank']}-{rs[-1]['rank']}" if len(rs) > 1 else str(rs[0]["rank"])
        verdict = "fits" if r["total_bytes"] <= report["limit_bytes"] else "DOES NOT FIT"
        rows.append(f"{span:<12} {s:>5} {_gb(r['param_bytes']):>8} {_gb(r['grad_bytes']):>8} "
                    f"{_gb(r['optimizer_bytes']):>8} {_gb(r['activation_bytes']):>8} {_gb(r['total_bytes']):>8}  "
                    f"{verdict}")
    rows.append(f"GB = 2^30 bytes per rank; params = student + teacher slices; * activations are an estimate "
                f"(youzhi_ms/dryrun/memory.py); unsharded parameters (one copy of both models): "
                f"{report['unsharded_param_bytes'] / memory.GiB:.2f} GB")
    if report["depth_reduced"]:
        rows.append(f"compiled at {report['compiled_layers']['student']} layer(s) deep (the depth-reduced check); the "
                    "per-layer slices are scaled to the full depth")
    return "\n".join(rows)
