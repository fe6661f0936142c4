#!/usr/bin/env python
"""The adaptive FreqFold search's cost as a ratio: whole conversions one after the other on the same machine, the
first variant (uniform F = 4 by default) the reference. Each runs tools/convert_gqa_to_mla.py in a child process;
wall time, CPU seconds (the child and its forked scoring workers) and peak memory come from wait4 and /proc. Prints a
table and writes JSON (with the load average before and after every run: a ratio is only worth what the load lets it).

  python benchmarks/bench_search_ratio.py --hf-dir SMOLLM2_HF --kv-lora-rank 112 --qk-rope-dim 32 \\
      --variants "4;adaptive;adaptive --search-workers 1" --out benchmarks/results/search_ratio.json

A variant is the value of --freqfold followed by any other converter options. The converted models are written under
--work and removed after each run (their conversion reports are kept in the JSON: each layer's choice).
"""
import argparse
import json
import os
import shlex
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_stream_7b import ROOT, run_measured  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--kv-lora-rank", type=int, required=True)
    ap.add_argument("--qk-rope-dim", type=int, required=True)
    ap.add_argument("--variants", default="4;adaptive", help="';'-separated: --freqfold value, then more options")
    ap.add_argument("--work", default="output/bench_search_ratio")
    ap.add_argument("--out", default="benchmarks/results/search_ratio.json")
    args = ap.parse_args()
    rows = []
    for i, variant in enumerate(v.strip() for v in args.variants.split(";")):
        freqfold, *extra = shlex.split(variant)
        dst = os.path.join(args.work, f"variant_{i}")
        if os.path.exists(dst):
            sys.exit(f"error: {dst} exists (left by an earlier run of this benchmark?): remove it or give another "
                     "--work")
        cmd = [sys.executable, os.path.join(ROOT, "tools/convert_gqa_to_mla.py"), "--hf-dir", args.hf_dir,
               "--output-dir", dst, "--kv-lora-rank", str(args.kv_lora_rank), "--qk-rope-dim", str(args.qk_rope_dim),
               "--freqfold", freqfold, "--quiet"] + extra
        load0 = os.getloadavg()[0]
        rc, stderr, wall, peak_gb, _, cpu, pss_gb = run_measured(cmd)
        if rc != 0:
            sys.exit(f"error: variant {variant!r} failed:\n{stderr[-3000:]}")
        rep = json.load(open(os.path.join(dst, "conversion_report.json")))
        rows.append({"variant": variant, "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
                     "peak_rss_gb": round(peak_gb, 2), "peak_pss_with_workers_gb": round(pss_gb, 2),
                     "load_before": load0, "load_after": os.getloadavg()[0],
                     "choices": [(L["choice"], L["beta"]) for L in rep["layers"]], "command": shlex.join(cmd[1:])})
        shutil.rmtree(dst)
        print(f"{variant}: {wall:.1f} s wall, {cpu:.1f} CPU s (load {load0:.2f} -> {rows[-1]['load_after']:.2f})",
              flush=True)
    ref = rows[0]
    print("\n| variant | wall s | x first | CPU s | x first | peak RSS GB | peak Pss with workers GB | load before/after |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['wall_seconds']} | {r['wall_seconds'] / ref['wall_seconds']:.2f} | "
              f"{r['cpu_seconds']} | {r['cpu_seconds'] / ref['cpu_seconds']:.2f} | {r['peak_rss_gb']} | "
              f"{r['peak_pss_with_workers_gb']} | {r['load_before']:.2f} / {r['load_after']:.2f} |")
    out = {"hf_dir": args.hf_dir, "kv_lora_rank": args.kv_lora_rank, "qk_rope_dim": args.qk_rope_dim,
           "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} cores", "runs": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
