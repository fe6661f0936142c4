#!/usr/bin/env python
"""Where GKD training memory goes: peak RSS per phase of a few training steps on the real pair, one variant per process.

  python benchmarks/bench_gkd_memory.py --source SMOLLM2_HF --student MLA_DIR --name chunked \
      [--steps 4] [--set distill.loss=full ...] [--out benchmarks/results/gkd_memory.jsonl]

Phases (peak resident set size of this process within each, the kernel's high-water mark reset between them through
/proc/self/clear_refs): `setup` (process + MindSpore context), `models` (student, teacher or top-k file, optimizer
state, graph cells built), `first_step` (graph compile + one step), `steps` (the remaining steps: the steady state).
`peak` is the largest of them. Also: median seconds of the steady steps, the machine load, the losses (so that
variants can be checked to compute the same thing). Appends one json line per run to --out.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from youzhi_ms.errors import cli_main  # noqa: E402


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return round(int(line.split()[1]) / 1024.0, 1)  # kB -> MiB
    raise RuntimeError(f"{key} not in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS to the current RSS (Linux >= 4.0)
        f.write("5")


def memory_parser(doc: str, steps: int, work: str, out: str) -> argparse.ArgumentParser:
    """The options every GKD memory benchmark takes (this one and bench_step_graphs.py)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, help="teacher: the source (GQA) Hugging Face directory")
    ap.add_argument("--student", required=True, help="the converted MLA directory")
    ap.add_argument("--name", required=True, help="label of this variant in the output")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--config", default="yaml_configs/distill_smollm2_mla.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--work", default=work, help="run directories go to WORK/NAME (an earlier run of the same name is "
                    "replaced, as train.py --overwrite does: only a directory a run created)")
    ap.add_argument("--out", default=out)
    return ap


def ready_trainer(args):
    """The trainer of --config + --set on the pair, set up as tools/train.py --overwrite would (models, optimizer,
    graph cells, data, run directory), no step run yet. Call after youzhi_ms.runtime.init_context("graph")."""
    from youzhi_ms.train.run_config import load_run_config
    from youzhi_ms.train.trainer import Trainer
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config_path = args.config if os.path.isfile(args.config) else os.path.join(root, args.config)
    cfg = load_run_config(config_path, [f"model.student={args.student}", f"distill.teacher={args.source}",
                                        f"output_dir={os.path.join(args.work, args.name)}",
                                        "runner_config.progress=false"] + args.overrides)
    tr = Trainer(cfg)
    tr._check_output(False, True)
    tr._setup_models()
    tr._setup_data()
    tr._prepare_output(False, True)
    return tr


def append_record(out: str, rec: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec))


@cli_main
def main():
    args = memory_parser(__doc__, 4, "output/bench_gkd_memory", "benchmarks/results/gkd_memory.jsonl").parse_args()
    from youzhi_ms.runtime import init_context
    init_context("graph")
    load0 = os.getloadavg()
    phases = {"setup": _status("VmHWM")}
    reset_peak()
    tr = ready_trainer(args)
    phases["models"] = _status("VmHWM")
    rows = []
    for step in range(args.steps):
        reset_peak()
        rows.append(tr.train_step(step))
        key = "first_step" if step == 0 else "steps"
        phases[key] = max(phases.get(key, 0.0), _status("VmHWM"))
        print(f"{args.name} step {step + 1}: loss {rows[-1]['loss']:.6f} {rows[-1]['seconds']:.2f} s, "
              f"peak {_status('VmHWM')} MiB", flush=True)
    steady = [r["seconds"] for r in rows[1:]] or [rows[0]["seconds"]]
    rec = {"name": args.name, "overrides": args.overrides, "date": time.strftime("%Y-%m-%d %H:%M"),
           "peak_rss_mib": max(phases.values()), "phase_peak_rss_mib": phases,
           "median_s_per_step": round(statistics.median(steady), 3), "first_step_s": rows[0]["seconds"],
           "losses": [r["loss"] for r in rows], "grad_norms": [r["grad_norm"] for r in rows],
           "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
           "machine": f"{os.cpu_count()} cores"}
    append_record(args.out, rec)


if __name__ == "__main__":
    main()
