#!/usr/bin/env python
"""GKD recovery on a real model pair: wiki-eval perplexity of the teacher and of the MLA student before and after N
GKD steps, time per step, peak memory, loss curve. Writes a JSON and a PNG.

  python benchmarks/bench_gkd.py --source output/quickstart/smollm2-hf --student output/quickstart/smollm2-mla \
      --steps 200 [--config yaml_configs/distill_smollm2_mla.yaml] [--set runner_config.batch_size=4 ...] \
      [--eval-tokens 16384] [--out benchmarks/results/gkd_smollm2.json]

Training is tools/train.py's trainer with the yaml (default distill_smollm2_mla.yaml) plus --set overrides; the run
directory is --work (default output/bench_gkd/run, replaced on every invocation) and holds the loss log, checkpoints and
the trained student (hf_model/). Perplexity follows youzhi_ms/eval/ppl.py (documents joined by end-of-text,
non-overlapping --eval-seq-len windows of the first --eval-tokens tokens). `recovered` = (ppl_before - ppl_after) /
(ppl_before - ppl_teacher): the fraction of the conversion's perplexity gap closed by GKD. Peak memory is the process's
maximum resident set size (resource.getrusage), recorded after each phase.
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from youzhi_ms.runtime import init_context  # noqa: E402


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)  # ru_maxrss is KiB on Linux


def phase_peak_mib() -> float:
    """Peak RSS since the last reset_phase_peak() (the kernel's high-water mark, VmHWM)."""
    with open("/proc/self/status") as f:
        return round(next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")) / 1024.0, 1)


def reset_phase_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, help="teacher: the source (GQA) Hugging Face directory")
    ap.add_argument("--student", required=True, help="the converted MLA directory")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--config", default="yaml_configs/distill_smollm2_mla.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--work", default="output/bench_gkd/run")
    ap.add_argument("--out", default="benchmarks/results/gkd_smollm2.json")
    ap.add_argument("--eval-text", default="wiki-eval")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-steps", default="", help="also evaluate these intermediate checkpoints, e.g. 50,100 "
                    "(needs save_checkpoint_steps dividing them and keep_checkpoint_max large enough)")
    ap.add_argument("--skip-teacher", action="store_true", help="do not measure the teacher's perplexity")
    ap.add_argument("--reuse-ppl", metavar="JSON", help="take the teacher's and the untrained student's perplexity from "
                    "an earlier result of this script with the same --source/--student/eval settings (sweeps)")
    args = ap.parse_args()

    init_context("graph")
    from youzhi_ms.checkpoint.mindspore_ckpt import load_model
    from youzhi_ms.data.tokenizer import Tokenizer
    from youzhi_ms.eval.ppl import perplexity, token_stream
    from youzhi_ms.train.run_config import load_run_config
    from youzhi_ms.train.loss_log import read_loss_log
    from youzhi_ms.train.trainer import Trainer

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config_path = args.config if os.path.isfile(args.config) else os.path.join(root, args.config)
    cfg = load_run_config(config_path, [f"model.student={args.student}", f"distill.teacher={args.source}",
                                        f"runner_config.max_steps={args.steps}", f"output_dir={args.work}"]
                          + args.overrides)
    stream = token_stream(args.eval_text, Tokenizer.from_dir(args.student), args.eval_tokens)
    res = {"meta": {"source": args.source, "student": args.student, "steps": args.steps, "config": config_path,
                    "overrides": args.overrides, "eval_text": args.eval_text, "eval_tokens": int(len(stream)),
                    "eval_seq_len": args.eval_seq_len, "machine": f"{os.cpu_count()} cores",
                    "date": time.strftime("%Y-%m-%d %H:%M")},
           "train_config": {k: cfg[k] for k in ("runner_config", "optimizer", "lr_schedule", "distill", "model")}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def ppl_of(model_dir):
        model, _ = load_model(model_dir, table_len=args.eval_seq_len)
        r = perplexity(model, stream, args.eval_seq_len, progress=False)
        del model
        return r

    if args.reuse_ppl:
        prev = json.load(open(args.reuse_ppl))
        pm = prev["meta"]
        if (pm["student"], pm["source"], pm["eval_tokens"], pm["eval_seq_len"], pm["eval_text"]) != (
                args.student, args.source, res["meta"]["eval_tokens"], args.eval_seq_len, args.eval_text):
            sys.exit(f"error: {args.reuse_ppl} was measured on other models or eval settings; drop --reuse-ppl")
        res["ppl_before"] = prev["ppl_before"]
        if "ppl_teacher" in prev:
            res["ppl_teacher"] = prev["ppl_teacher"]
        res["meta"]["ppl_reused_from"] = args.reuse_ppl
    else:
        if not args.skip_teacher:
            res["ppl_teacher"] = ppl_of(args.source)
            print(f"teacher ppl {res['ppl_teacher']['ppl']:.4f}", flush=True)
        res["ppl_before"] = ppl_of(args.student)
    print(f"student ppl before GKD {res['ppl_before']['ppl']:.4f}", flush=True)
    res["peak_rss_mib_after_eval"] = peak_rss_mib()

    if os.path.isdir(args.work):
        shutil.rmtree(args.work)
    t0 = time.time()
    reset_phase_peak()
    load0 = os.getloadavg()
    out = Trainer(cfg).run()
    res["train_seconds"] = round(time.time() - t0, 2)
    res["peak_rss_mib_train_phase"] = phase_peak_mib()  # training alone (models, compile, steps)
    res["loadavg_train"] = {"before": [round(x, 2) for x in load0], "after": [round(x, 2) for x in os.getloadavg()]}
    res["peak_rss_mib_after_train"] = peak_rss_mib()
    rows = read_loss_log(out["loss_log"])
    secs = [r["seconds"] for r in rows]
    tokens = [r["tokens"] for r in rows]
    steady = secs[1:] or secs
    res["time_per_step"] = {"first_step_s (includes graph compile)": secs[0],
                            "mean_s": round(statistics.mean(steady), 4),
                            "median_s": round(statistics.median(steady), 4), "max_s": round(max(steady), 4),
                            "on_policy_steps": sum(1 for r in rows if any(r["on_policy"]))}
    # steps whose loss came out above the JSD maximum (corrupted computation): recomputed, or skipped if it persisted
    res["corrupted_steps"] = {"recomputed": [r["step"] for r in rows if r.get("retries") and not r.get("skipped")],
                              "skipped": [r["step"] for r in rows if r.get("skipped")]}
    rows = [r for r in rows if not r.get("skipped")]
    res["scored_tokens_per_s"] = round(sum(tokens[1:] or tokens) / max(sum(steady), 1e-9), 1)
    res["loss"] = {"first": rows[0]["loss"], "last": rows[-1]["loss"],
                   "mean_first_10pct": statistics.mean(r["loss"] for r in rows[:max(1, len(rows) // 10)]),
                   "mean_last_10pct": statistics.mean(r["loss"] for r in rows[-max(1, len(rows) // 10):])}
    res["ppl_at_step"] = {}
    for s in [int(x) for x in args.eval_steps.split(",") if x.strip()]:
        ckpt = os.path.join(args.work, "checkpoint", f"step_{s:08d}")
        if s < args.steps and os.path.isdir(ckpt):
            from youzhi_ms.eval.ppl import evaluate_dir
            r = evaluate_dir(args.student, args.eval_text, args.eval_seq_len, args.eval_tokens, progress=False,
                             train_checkpoint=ckpt)
            res["ppl_at_step"][str(s)] = r["ppl"]
            print(f"step {s}: ppl {r['ppl']:.4f}", flush=True)
    res["ppl_after"] = ppl_of(out["hf_model"])
    res["ppl_at_step"][str(args.steps)] = res["ppl_after"]["ppl"]
    res["peak_rss_mib"] = peak_rss_mib()
    b, a = res["ppl_before"]["ppl"], res["ppl_after"]["ppl"]
    res["ppl_change"] = {"before": b, "after": a, "relative": round((a - b) / b, 5)}
    if "ppl_teacher" in res and b != res["ppl_teacher"]["ppl"]:
        res["ppl_change"]["recovered"] = round((b - a) / (b - res["ppl_teacher"]["ppl"]), 4)
    png = os.path.splitext(args.out)[0] + "_loss.png"
    shutil.copy2(os.path.join(args.work, "loss_curve.png"), png)
    res["loss_curve_png"] = png
    res["trained_model"] = out["hf_model"]
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, args.out)
    print(f"ppl {b:.4f} -> {a:.4f} (teacher {res.get('ppl_teacher', {}).get('ppl', float('nan')):.4f}); "
          f"{res['time_per_step']['mean_s']} s/step, peak RSS {res['peak_rss_mib']} MiB; wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
