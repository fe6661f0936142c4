#!/usr/bin/env python
"""Decode throughput and resident KV cache: GQA decode vs absorbed MLA decode, MindSpore graph mode on CPU.

Shapes are SmolLM2-135M's (30 layers, hidden 576, 9 heads, vocab 49152, tied head): the source uses GQA with 3 kv heads
x 64; the MLA model is what the converter makes of it at kv_lora_rank 112 + qk_rope_head_dim 32 (nope 64, v 64, no
latent norm), i.e. 4320 instead of 11520 cached values per token (2.67x smaller). Weights are random: speed does not
depend on their values. For every (context T, batch B) both models run the same one-token step
(`youzhi_ms.models.base.DecodeCell`) over a cache preallocated at T and treated as full (pos = T - few); the static
shapes make every step cost the same as at the last position. Reported: median seconds per step over several steps
after the compiling call and a warm-up (GQA and MLA steps alternate when run together, so both see the same machine
load); tokens/s = B / step; resident cache bytes; peak RSS of the process that ran the configuration.

  python benchmarks/bench_decode.py [--contexts 512,2048,8192] [--batches 1,4,16] \
      [--out benchmarks/results/decode.json] [--png docs/decode_benchmark.png]

Each (T, B) pair runs in a fresh child process (both models together, timed in alternation, when the estimate allows,
else one at a time), so compiled graphs and MindSpore's memory pool never accumulate across configurations. A group
whose estimated peak exceeds --mem-fraction of the memory available at that moment is skipped and listed, and a
running one is killed if the machine's available memory falls below --min-free-gb. The estimate is measured, not
theoretical: MindSpore 2.10 on CPU keeps every per-layer intermediate of the step (cache slices, where/broadcast
outputs, transposed keys, for MLA the latent broadcast over the heads) alive, so a step's peak RSS grew by about 11x
(GQA) and 17x (MLA) the cache bytes in fresh processes (SmolLM2 shapes, T=512, B=1..16); the defaults
--mem-coef gqa=12,mla=18 plus 0.8 GB per model encode that.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from youzhi_ms.runtime import init_context  # noqa: E402

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
               rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)


def configs(max_len, rank, rope):
    from youzhi_ms.config import MLAConfig, SourceConfig
    gqa = SourceConfig(arch="llama", num_kv_heads=3, head_dim=64, max_position_embeddings=max_len, **SMOLLM2)
    mla = MLAConfig(kv_lora_rank=rank, qk_nope_head_dim=64, qk_rope_head_dim=rope, v_head_dim=64,
                    max_position_embeddings=max_len, kv_layernorm=False, **SMOLLM2)
    return gqa, mla


def per_token_values(cfg):
    from youzhi_ms.infer.mindir import cache_values_per_token
    return cache_values_per_token(cfg)


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def machine_info():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    import mindspore as ms
    with open("/proc/meminfo") as f:
        total = int(next(ln for ln in f if ln.startswith("MemTotal:")).split()[1]) * 1024
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_total_bytes": total, "platform": platform.platform(),
            "python": platform.python_version(), "mindspore": ms.__version__}


class Stepper:
    """One model's decode step over its own zero-filled cache treated as full (positions ctx - few ... ctx - 1)."""

    def __init__(self, cell, cfg, batch, ctx, n_calls):
        import numpy as np
        import mindspore as ms
        from mindspore import ops
        from youzhi_ms.infer.generate import cache_shapes
        (sa, sb), _ = cache_shapes(cfg, batch, ctx)
        self.cell, self.batch, self.ctx = cell, batch, ctx
        self.ca, self.cb = ops.zeros(sa, ms.float32), ops.zeros(sb, ms.float32)
        self.ids = ms.Tensor(np.ones((batch, 1), np.int32))
        self.pos = max(0, ctx - n_calls)
        self.times = []

    def step(self):
        import numpy as np
        import mindspore as ms
        pos = ms.Tensor(np.full(self.batch, min(self.pos, self.ctx - 1), np.int32))
        self.pos += 1
        t0 = time.perf_counter()
        logits, self.ca, self.cb = self.cell(self.ids, pos, self.ca, self.cb)
        logits.asnumpy()
        return time.perf_counter() - t0


def run_group(steppers, warmup, steps, budget):
    """Compile + warm up each stepper, then time them in alternation (round robin) so that they see the same machine
    load; stops after `steps` rounds, or after 3 rounds once the timed total exceeds budget x len(steppers)."""
    first = [s.step() for s in steppers]
    for _ in range(warmup):
        for s in steppers:
            s.step()
    total = 0.0
    for r in range(steps):
        for s in steppers:
            dt = s.step()
            s.times.append(dt)
            total += dt
        if r + 1 >= 3 and total > budget * len(steppers):
            break
    return first


def worker(args):
    """One group (same T and B, one or two models) in this process; prints one JSON line with the records."""
    init_context("graph")
    from youzhi_ms.checkpoint.mindspore_ckpt import build_model
    from youzhi_ms.models.base import DecodeCell
    ctx, batch = args.worker_ctx, args.worker_batch
    runs = args.worker_runs.split(",")
    gqa_cfg, mla_cfg = configs(ctx, args.kv_lora_rank, args.qk_rope_dim)
    cfgs = {"gqa": gqa_cfg, "mla": mla_cfg}
    n_calls = 1 + args.warmup + max(3, args.steps)
    steppers = []
    for name in runs:
        m = build_model(cfgs[name])
        m.set_train(False)
        steppers.append(Stepper(DecodeCell(m), cfgs[name], batch, ctx, n_calls))
    firsts = run_group(steppers, args.warmup, max(3, args.steps), args.budget)
    recs = []
    for name, st, first in zip(runs, steppers, firsts):
        cache = per_token_values(cfgs[name]) * 4 * batch * ctx
        med = statistics.median(st.times)
        recs.append({"model": name, "context": ctx, "batch": batch, "cache_bytes_fp32": cache,
                     "cache_bytes_bf16": cache // 2, "step_s_median": med, "step_s": st.times,
                     "tokens_per_s": batch / med, "compile_and_first_s": first, "together": len(runs) > 1})
    print("RESULT " + json.dumps({"records": recs, "peak_rss_bytes": peak_rss()}), flush=True)


def spawn(args, ctx, batch, runs, min_free):
    """Run one group in a child process; kill it if the machine's available memory drops below min_free."""
    import subprocess
    cmd = [sys.executable, os.path.abspath(__file__), "--worker-ctx", str(ctx), "--worker-batch", str(batch),
           "--worker-runs", ",".join(runs), "--warmup", str(args.warmup), "--steps",
           str(args.steps), "--budget", str(args.budget), "--kv-lora-rank", str(args.kv_lora_rank),
           "--qk-rope-dim", str(args.qk_rope_dim)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, GLOG_v=os.environ.get("GLOG_v", "3")))
    aborted = False
    while proc.poll() is None:
        time.sleep(0.5)
        if mem_available() < min_free:
            proc.kill()
            aborted = True
    out, err = proc.communicate()
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        errs = [ln for ln in err.splitlines() if "Error" in ln or "error" in ln]
        why = "aborted: available memory fell below the safety floor" if aborted else \
            f"worker failed (exit {proc.returncode}): {errs[-1].strip() if errs else '?'}"
        with open(os.path.join(os.path.dirname(os.path.abspath(args.out)), "decode_worker_errors.log"), "a") as f:
            f.write(f"--- T={ctx} B={batch} runs={runs} exit={proc.returncode}\n{err[-20000:]}\n")
        return None, why
    return json.loads(line[len("RESULT "):]), None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="512,2048,8192")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--kv-lora-rank", type=int, default=112)
    ap.add_argument("--qk-rope-dim", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after the compiling call")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (at least 3; fewer than this when one "
                                                          "configuration exceeds --budget seconds)")
    ap.add_argument("--budget", type=float, default=30.0, help="seconds of timed steps per model and configuration")
    ap.add_argument("--mem-fraction", type=float, default=0.6)
    ap.add_argument("--mem-coef", default="gqa=12,mla=18", help="estimated peak = 0.8 GB per model + coef x cache")
    ap.add_argument("--min-free-gb", type=float, default=1.5, help="kill a configuration when the machine's "
                                                                    "available memory falls below this")
    ap.add_argument("--pairs", default=None, help="BxT,... to run instead of the contexts x batches grid")
    ap.add_argument("--merge", action="store_true", help="update --out: replace the entries of the configurations "
                                                         "run now, keep the others (a second pass for skipped ones)")
    ap.add_argument("--out", default="benchmarks/results/decode.json")
    ap.add_argument("--png", default="docs/decode_benchmark.png")
    ap.add_argument("--replot", action="store_true", help="only print the summary and redraw the PNG from --out")
    ap.add_argument("--worker-ctx", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-batch", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-runs", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_runs:
        return worker(args)
    if args.replot:
        with open(args.out) as f:
            out = json.load(f)
        print_summary(out)
        plot(out, args.png)
        return None
    contexts = [int(x) for x in args.contexts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    coef = {k: float(v) for k, v in (kv.split("=") for kv in args.mem_coef.split(","))}
    gqa_cfg, mla_cfg = configs(max(contexts), args.kv_lora_rank, args.qk_rope_dim)
    per_tok = {"gqa": per_token_values(gqa_cfg) * 4, "mla": per_token_values(mla_cfg) * 4}
    t_start = time.time()
    load_before = os.getloadavg()
    results, skipped, attempted = [], [], set()
    print(f"{'model':<9} {'T':>5} {'B':>3} {'cache MB':>9} {'step ms':>9} {'tok/s':>8} {'compile s':>9} "
          f"{'peak RSS GB':>11}  (peak RSS of the process that ran the group)", flush=True)
    grid = [(c, b) for c in contexts for b in batches]
    if args.pairs:
        grid = sorted((int(t), int(b)) for b, t in (p.split("x") for p in args.pairs.split(",")))
    for ctx, batch in grid:
        group = ["gqa", "mla"]
        attempted.add((ctx, batch))
        limit = args.mem_fraction * mem_available()  # checked now: other jobs come and go

        def est(runs):
            return sum(0.8 * 2**30 + coef[n] * per_tok[n] * batch * ctx for n in runs)

        plans = [group] if est(group) <= limit else [[r] for r in group]  # together, else one by one
        for runs in plans:
            label = ",".join(runs)
            if est(runs) > limit:
                skipped.append({"runs": label, "context": ctx, "batch": batch,
                                "cache_bytes": per_tok[runs[0]] * batch * ctx,
                                "estimated_peak_bytes": est(runs), "limit_bytes": int(limit)})
                print(f"{label:<9} {ctx:>5} {batch:>3} {per_tok[runs[0]] * batch * ctx / 2**20:>9.1f}  "
                      f"skipped: estimated peak {est(runs) / 2**30:.1f} GB > {limit / 2**30:.1f} GB "
                      f"({args.mem_fraction:.0%} of the memory available now)", flush=True)
                continue
            res, why = spawn(args, ctx, batch, runs, args.min_free_gb * 2**30)
            if res is None:
                skipped.append({"runs": label, "context": ctx, "batch": batch, "reason": why})
                print(f"{label:<9} {ctx:>5} {batch:>3}  {why}", flush=True)
                continue
            for rec in res["records"]:
                rec["group_peak_rss_bytes"] = res["peak_rss_bytes"]
                results.append(rec)
                print(f"{rec['model']:<9} {ctx:>5} {batch:>3} {rec['cache_bytes_fp32'] / 2**20:>9.1f} "
                      f"{rec['step_s_median'] * 1e3:>9.1f} {rec['tokens_per_s']:>8.2f} "
                      f"{rec['compile_and_first_s']:>9.1f} {res['peak_rss_bytes'] / 2**30:>11.2f}"
                      + ("" if rec["together"] else "  (run alone)"), flush=True)
    load_after = os.getloadavg()
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine_info(),
        "loadavg_before": load_before, "loadavg_after": load_after, "seconds": round(time.time() - t_start, 1),
        "command": " ".join(["python"] + sys.argv),
        "shapes": {"layers": 30, "hidden": 576, "heads": 9, "vocab": 49152, "gqa_kv_heads": 3, "head_dim": 64,
                   "kv_lora_rank": args.kv_lora_rank, "qk_rope_head_dim": args.qk_rope_dim},
        "cache_bytes_per_token_fp32": per_tok,
        "cache_ratio": per_tok["gqa"] / per_tok["mla"],
        "protocol": {"warmup": args.warmup, "steps": args.steps, "budget_s": args.budget,
                     "mem_fraction": args.mem_fraction, "mem_coef": coef},
        "results": results, "skipped": skipped,
    }
    if args.merge and os.path.isfile(args.out):
        with open(args.out) as f:
            old = json.load(f)
        out["results"] = [r for r in old["results"] if (r["context"], r["batch"]) not in attempted]
        out["results"] = sorted(out["results"] + results, key=lambda r: (r["context"], r["batch"], r["model"]))
        out["skipped"] = [r for r in old["skipped"] if (r["context"], r["batch"]) not in attempted]
        out["skipped"] += skipped
        out["passes"] = old.get("passes", [{k: old[k] for k in ("date", "command", "loadavg_before",
                                                                  "loadavg_after", "seconds")}])
        out["passes"].append({k: out[k] for k in ("date", "command", "loadavg_before", "loadavg_after", "seconds")})
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print_summary(out)
    if args.png:
        plot(out, args.png)
    print(f"wrote {args.out}" + (f" and {args.png}" if args.png else ""))


def _pairs(out):
    by = {(r["model"], r["context"], r["batch"]): r for r in out["results"]}
    keys = sorted({(c, b) for (_, c, b) in by})
    return by, keys


def print_summary(out):
    by, keys = _pairs(out)
    print(f"\ncache ratio GQA/MLA = {out['cache_ratio']:.2f}; load average before {out['loadavg_before'][0]:.2f}, "
          f"after {out['loadavg_after'][0]:.2f}")
    print(f"{'T':>5} {'B':>3} | {'GQA tok/s':>9} {'MLA tok/s':>9} {'speed-up':>8} | {'GQA cache MB':>12} "
          f"{'MLA cache MB':>12}")
    for c, b in keys:
        g, m = by.get(("gqa", c, b)), by.get(("mla", c, b))
        gt = f"{g['tokens_per_s']:>9.2f}" if g else f"{'skipped':>9}"
        mt = f"{m['tokens_per_s']:>9.2f}" if m else f"{'skipped':>9}"
        su = f"{m['tokens_per_s'] / g['tokens_per_s']:>7.2f}x" if g and m else f"{'-':>8}"
        gc_ = out["cache_bytes_per_token_fp32"]["gqa"] * b * c / 2**20
        mc = out["cache_bytes_per_token_fp32"]["mla"] * b * c / 2**20
        print(f"{c:>5} {b:>3} | {gt} {mt} {su} | {gc_:>12.1f} {mc:>12.1f}")


def plot(out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    by, keys = _pairs(out)
    batches = sorted({b for _, b in keys})
    contexts = sorted({c for c, _ in keys})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, b in enumerate(batches):
        for name, style in (("gqa", "-o"), ("mla", "--s")):
            pts = [(c, by[(name, c, b)]["tokens_per_s"]) for c in contexts if (name, c, b) in by]
            if pts:
                ax1.plot(*zip(*pts), style, color=colors[i % len(colors)], label=f"{name.upper()} B={b}")
        pts = [(c, by[("mla", c, b)]["tokens_per_s"] / by[("gqa", c, b)]["tokens_per_s"]) for c in contexts
               if ("mla", c, b) in by and ("gqa", c, b) in by]
        if pts:
            ax2.plot(*zip(*pts), "-o", color=colors[i % len(colors)], label=f"B={b}")
    ax2.axhline(out["cache_ratio"], color="gray", ls=":", label=f"cache ratio {out['cache_ratio']:.2f}")
    ax2.axhline(1.0, color="black", lw=0.6)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts)
        ax.set_xticklabels([str(c) for c in contexts])
        ax.set_xlabel("context (cached tokens)")
        ax.grid(alpha=0.3)
    ax1.set_yscale("log")
    ax1.set_ylabel("decode tokens/s")
    ax1.set_title("GQA (solid) vs absorbed MLA (dashed)")
    ax1.legend(fontsize=7, ncol=2)
    ax2.set_ylabel("MLA / GQA tokens/s")
    ax2.set_title("speed-up vs KV-cache ratio")
    ax2.legend(fontsize=8)
    m = out["machine"]
    loads = [out["loadavg_before"][0], out["loadavg_after"][0]] + \
        [x for p in out.get("passes", []) for x in (p["loadavg_before"][0], p["loadavg_after"][0])]
    fig.suptitle(f"SmolLM2-135M shapes, MindSpore {m['mindspore']} graph mode, CPU ({m['cores']} cores, "
                 f"load average {min(loads):.1f}-{max(loads):.1f}), {out['date'][:10]}; missing points: skipped "
                 "for memory", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
