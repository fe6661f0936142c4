"""Runs the stages in order, each in its own process, and keeps the state file that makes the pipeline resumable.

Why a process per stage: every stage measures its own peak memory (getrusage of that process, not the maximum of
everything before it), a graph-mode training and the evaluations do not share one MindSpore context, and a stage's
memory is returned to the system before the next one starts.

The state file (`pipeline_state.json` in output_dir) records per stage: a fingerprint (its config sections, the
content of the files it reads, and the fingerprints and finish times of the stages it reads from), its status, time,
peak memory and figures. With --resume a stage is skipped when its record is `done` with the same fingerprint and its
outputs are still there; a training stage that was interrupted (record `interrupted` or `failed`, same fingerprint,
a checkpoint in its run directory) continues from its newest checkpoint; every other stage runs again from the start
(the conversion itself continues from its finished layers). A stage that runs again gets a new finish time, so
everything that read its output runs again too.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from youzhi_ms.errors import YouzhiError
from youzhi_ms.fsutil import claim_run_dir, record_written, replace_json
from youzhi_ms.pipeline.config import ROOT
from youzhi_ms.pipeline.stages import BY_NAME, STAGES, Context, Stage, is_output

STATE = "pipeline_state.json"
CONFIG = "pipeline_config.json"
RESULTS = "stages"  # each stage process's result file, read back by the runner
SUMMARY_FILES = ("summary.json", "summary.md", "summary.png")
# everything the pipeline writes in its output_dir, as the output marker lists it (directories end in '/'; the
# conversion's resumable work directory is '.mla.partial/'): --overwrite removes exactly these
ENTRIES = ("source_hf/", "eval_source.json", "mla/", ".mla.partial/", "eval_mla.json", "gkd/", "eval_gkd.json",
           "domain/", "eval_domain.json", "mindir/", "final.gguf", "plan.json", STATE, CONFIG, RESULTS + "/") + SUMMARY_FILES
STATE_VERSION = 1


def _file_digest(path: Optional[str]) -> Optional[str]:
    """sha256 of a file's content, the name itself for a built-in text (wiki-eval, news, smollm2, ...)."""
    if path is None or not os.path.isfile(path):
        return path
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(stage: Stage, ctx: Context, stages: Dict[str, dict]) -> str:
    deps = {d: [stages.get(d, {}).get("fingerprint"), stages.get(d, {}).get("finished")] for d in stage.deps}
    doc = {"stage": stage.name, "config": {s: ctx.cfg[s] for s in stage.sections},
           "files": [_file_digest(f) for f in stage.files(ctx)], "deps": deps}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: str, obj) -> None:
    """The runner's own bookkeeping files, never half-written; an interrupted write leaves a temp file named as the
    output rule knows its leftovers, so a later --overwrite is not stopped by it."""
    replace_json(path, obj, ensure_ascii=False, default=str)


def load_state(out: str) -> Dict[str, Any]:
    path = os.path.join(out, STATE)
    if not os.path.isfile(path):
        return {"version": STATE_VERSION, "stages": {}}
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as exc:
        raise YouzhiError(f"{path} cannot be read ({exc}); start the pipeline over with --overwrite") from None
    if not (isinstance(state, dict) and state.get("version") == STATE_VERSION and isinstance(state.get("stages"),
                                                                                              dict)):
        raise YouzhiError(f"{path} is not a youzhi_ms pipeline state (version {STATE_VERSION}); start the pipeline "
                          "over with --overwrite")
    return state


def _has_checkpoint(run_dir: str) -> bool:
    ck = os.path.join(run_dir, "checkpoint")
    return os.path.isdir(ck) and any(n.startswith("step_") for n in os.listdir(ck))


def _inputs(cfg: Dict[str, Any]) -> List[tuple]:
    e = cfg["eval"]
    return [("source.model", cfg["source"]["model"]), ("domain.corpus", cfg["domain"]["corpus"]),
            ("eval.general_text", e["general_text"]), ("eval.domain_text", e["domain_text"]), ("eval.mcq", e["mcq"]),
            ("eval.mcq_dev", e["mcq_dev"]), ("gkd.config", cfg["gkd"]["config"]),
            ("domain.config", cfg["domain"]["config"])]


def run_child(out: str, stage: str, resume: bool) -> int:
    """Run one stage in a fresh process (youzhi_ms/pipeline/worker.py) and wait for it. An interrupt of this
    process reaches the stage process too (Ctrl-C goes to the whole process group; a SIGTERM sent to this process
    alone is passed on), which stops cleanly; this process then stops with it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "youzhi_ms.pipeline.worker", "--output-dir", out, "--stage", stage] + \
        (["--resume"] if resume else [])
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            exc.add_note(f"the pipeline stopped in stage {stage}; the same command with --resume continues it "
                         "(finished stages are kept, an interrupted training from its newest checkpoint)")
        sig = signal.SIGTERM if exc.__class__.__name__ == "Terminated" else signal.SIGINT
        try:
            proc.wait(timeout=5)  # it got the same Ctrl-C from the terminal
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise


def run_pipeline(cfg: Dict[str, Any], resume: bool = False, overwrite: bool = False,
                 stop_after: Optional[str] = None, say=None) -> Dict[str, Any]:
    """Run (or continue) the pipeline; returns the summary (also written as summary.json / .md / .png)."""
    if stop_after is not None and stop_after not in BY_NAME:
        raise YouzhiError(f"--stop-after {stop_after!r} is not a stage; stages: {', '.join(BY_NAME)}")
    say = say or (lambda msg: print(msg, flush=True))
    out = claim_run_dir(cfg["output_dir"], overwrite, resume, _inputs(cfg))
    record_written(out, ENTRIES)
    state = load_state(out) if resume else {"version": STATE_VERSION, "stages": {}}
    _write_json(os.path.join(out, CONFIG), cfg)
    os.makedirs(os.path.join(out, RESULTS), exist_ok=True)
    ctx = Context(cfg, out)
    stages = state["stages"]
    t_all = time.time()
    for i, stage in enumerate(STAGES, 1):
        fp = fingerprint(stage, ctx, stages)
        rec = stages.get(stage.name, {})
        head = f"== [{time.strftime('%H:%M:%S')}] {i}/{len(STAGES)} {stage.name}"
        if rec.get("status") == "done" and rec.get("fingerprint") == fp and all(is_output(p)
                                                                                for p in stage.outputs(ctx)):
            say(f"{head}: done earlier ({rec.get('seconds')} s, finished {rec.get('finished')}), skipped")
        else:
            inner = (stage.resumable and rec.get("fingerprint") == fp and rec.get("status") != "done"
                     and _has_checkpoint(os.path.join(out, stage.name)))
            why = ("continues from its newest checkpoint" if inner else
                   "config or inputs changed, runs again" if rec.get("fingerprint") not in (None, fp) else
                   "output missing, runs again" if rec.get("status") == "done" else "")
            say(head + (f" ({why})" if why else ""))
            stages[stage.name] = {"status": "running", "fingerprint": fp, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            _write_json(os.path.join(out, STATE), state)
            result_path = os.path.join(out, RESULTS, stage.name + ".json")
            if os.path.exists(result_path):
                os.remove(result_path)  # the runner's own file: a stale result must not pass for this run's
            t0 = time.time()
            try:
                rc = run_child(out, stage.name, inner)
            except BaseException:
                stages[stage.name].update(status="interrupted", seconds=round(time.time() - t0, 1))
                _write_json(os.path.join(out, STATE), state)
                raise
            seconds = round(time.time() - t0, 1)
            if rc != 0 or not os.path.isfile(result_path):
                stages[stage.name].update(status="failed", exit_code=rc, seconds=seconds)
                _write_json(os.path.join(out, STATE), state)
                # the stage process printed its own `error:` / `interrupted` line; this one adds none
                raise SystemExit(rc if rc != 0 else 1)
            with open(result_path, encoding="utf-8") as f:
                result = json.load(f)
            stages[stage.name] = {"status": "done", "fingerprint": fp, "seconds": seconds,
                                  "peak_rss_mib": result.pop("peak_rss_mib", None), "result": result,
                                  "resumed_from_checkpoint": inner, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
            _write_json(os.path.join(out, STATE), state)
            say(f"   {stage.name} done in {seconds} s, peak memory "
                f"{(stages[stage.name]['peak_rss_mib'] or 0) / 1024:.2f} GiB")
        if stage.name == stop_after:
            say(f"stopped after {stop_after} (--stop-after); continue with the same command and --resume")
            return {"stopped_after": stop_after, "output_dir": out}
    from youzhi_ms.pipeline.summary import write_summary
    summary = write_summary(out, cfg, state, say=say)
    say(f"pipeline done: {out} (this invocation {round(time.time() - t_all)} s)")
    return summary
