#!/usr/bin/env python
"""What a user waits for: wall time to the first generated token and to the end of `tools/generate.py` (or the end of
`tools/eval_ppl.py`), run after run, with the compile cache cold, then warm. Prints a table and appends JSON records.

  python benchmarks/bench_startup.py [--tool generate|ppl] [--runs 3] [--code CHECKOUT] [--cache DIR]
      [--model DIR] [--label NAME] [--out benchmarks/results/startup.json]

Each run is a fresh process, as a user's second call is. `--code` runs the tool of another checkout (e.g. the
commit before the compile cache, for the 'before' figures); `--cache` is the compile cache directory
(YOUZHI_COMPILE_CACHE), emptied first unless --keep-cache. The first token is the first byte of standard output past
the echoed prompt. The load average is recorded before and after every run (`os.getloadavg`): timings taken next to
other jobs are upper bounds.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "The capital of France is"


def one_run(cmd, cwd, env, echo_len):
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err, first = bytearray(), [], [None]

    def read_out():
        while True:
            b = proc.stdout.read(1)
            if not b:
                return
            out.extend(b)
            if first[0] is None and len(out) > echo_len:
                first[0] = time.time() - t0

    def read_err():
        for line in proc.stderr:
            err.append((round(time.time() - t0, 2), line.decode(errors="replace").rstrip()))

    threads = [threading.Thread(target=read_out), threading.Thread(target=read_err)]
    for t in threads:
        t.start()
    proc.wait()
    for t in threads:
        t.join()
    wall = time.time() - t0
    steps = {m.group(1): float(m.group(2)) for _, line in err
             for m in [re.match(r"(.+): done in ([0-9.]+) s$", line)] if m}
    return {"exit": proc.returncode, "wall_s": round(wall, 2),
            "first_token_s": round(first[0], 2) if first[0] is not None else None,
            "steps_s": steps, "stdout": out.decode(errors="replace"), "stderr_tail": [ln for _, ln in err][-5:]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tool", choices=("generate", "ppl"), default="generate")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--code", default=ROOT, help="checkout whose tools/ to run (default: this one)")
    ap.add_argument("--cache", default=None, help="compile cache dir (default: a fresh one under /tmp)")
    ap.add_argument("--keep-cache", action="store_true", help="do not empty --cache first")
    ap.add_argument("--model", default=None, help="model dir (default: the cached SmolLM2 HF dir)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=1024, help="--tool ppl: tokens of wiki-eval")
    ap.add_argument("--label", default=None)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "startup.json"))
    args = ap.parse_args()
    model = args.model or os.path.join(os.path.expanduser("~"), ".cache", "youzhi_ms", "smollm2-135m-instruct-hf")
    cache = args.cache or f"/tmp/youzhi-bench-startup-cache-{os.getpid()}"
    if not args.keep_cache:
        shutil.rmtree(cache, ignore_errors=True)
    env = dict(os.environ, YOUZHI_COMPILE_CACHE=cache, PYTHONUNBUFFERED="1")
    python = sys.executable
    if args.tool == "generate":
        cmd = [python, "tools/generate.py", "--model", model, "--prompt", PROMPT,
               "--max-new-tokens", str(args.max_new_tokens)]
        echo_len = len(PROMPT.encode())
    else:
        cmd = [python, "tools/eval_ppl.py", "--model", model, "--text", "wiki-eval", "--max-tokens",
               str(args.max_tokens)]
        echo_len = 0
    label = args.label or os.path.basename(os.path.abspath(args.code))
    records = []
    for i in range(args.runs):
        load_before = os.getloadavg()[0]
        rec = one_run(cmd, args.code, env, echo_len)
        rec.update(run=i + 1, label=label, tool=args.tool, load_before=round(load_before, 2),
                   load_after=round(os.getloadavg()[0], 2), date=time.strftime("%Y-%m-%d %H:%M"),
                   command=" ".join(cmd[1:]))
        records.append(rec)
        first = rec["first_token_s"] if args.tool == "generate" else "-"
        print(f"{label} run {i + 1}: first token {first} s, wall {rec['wall_s']} s, load {rec['load_before']} -> "
              f"{rec['load_after']}, steps {rec['steps_s']}", flush=True)
        if rec["exit"] != 0:
            print("\n".join(rec["stderr_tail"]), file=sys.stderr)
            break
    old = []
    if os.path.isfile(args.out):
        with open(args.out) as f:
            old = json.load(f)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(old + records, f, indent=1)


if __name__ == "__main__":
    main()
