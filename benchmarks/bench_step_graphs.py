#!/usr/bin/env python
"""Peak memory of each compiled graph of a GKD training step: the micro-step graph (forward + backward of one
micro-batch, run once per accumulated micro-batch) and the apply graph (clip + AdamW), on the real pair.

  python benchmarks/bench_step_graphs.py --source SMOLLM2_HF --student MLA_DIR --name NAME [--steps 3] [--set ...] \
      [--out benchmarks/results/gkd_step_graphs.jsonl]

MindSpore 2.10 on CPU keeps each compiled graph's working memory after the call, so the graphs' peaks add up: the
process peak RSS after `models` grows by what the micro-step graph holds, then by what the apply graph holds. For each
call: the peak RSS (GiB) since the previous call (the kernel's high-water mark, reset through /proc/self/clear_refs)
and the seconds it took (the first call of each graph includes its compile). One json line per run in --out.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from youzhi_ms.errors import cli_main  # noqa: E402

from bench_gkd_memory import _status, append_record, memory_parser, ready_trainer, reset_peak  # noqa: E402


def peak_gib() -> float:
    return round(_status("VmHWM") / 1024.0, 2)


@cli_main
def main():
    args = memory_parser(__doc__, 3, "output/bench_step_graphs", "benchmarks/results/gkd_step_graphs.jsonl").parse_args()
    import numpy as np
    from youzhi_ms.runtime import init_context
    init_context("graph")
    import mindspore as ms
    reset_peak()
    tr = ready_trainer(args)
    if tr.fused is not None:
        sys.exit("error: this run compiles one fused step graph (no accumulation, no loss bound); nothing to split")
    calls = {"models": [peak_gib(), 0.0]}
    losses = []
    b1, b2 = tr.run_config.optimizer.betas
    for step in range(args.steps):
        batches = [tr.next_micro_batch(step, m) for m in range(tr.accum)]
        scale = ms.Tensor(1.0 / float(sum(b["loss_mask"].sum() for b in batches)), ms.float32)
        hyper = (ms.Tensor(np.asarray(tr.lrs(step), np.float32)), ms.Tensor(1.0 - b1 ** (step + 1), ms.float32),
                 ms.Tensor(1.0 - b2 ** (step + 1), ms.float32))
        loss = 0.0
        for i, b in enumerate(batches):
            reset_peak()
            t = time.time()
            loss += float(tr.micro(ms.mutable(tr._net_inputs(b, scale))).asnumpy())
            calls[f"step{step + 1}_micro{i + 1}"] = [peak_gib(), round(time.time() - t, 2)]
        reset_peak()
        t = time.time()
        tr.apply(*hyper).asnumpy()
        calls[f"step{step + 1}_apply"] = [peak_gib(), round(time.time() - t, 2)]
        losses.append(loss)
        print(f"{args.name} step {step + 1}: loss {loss:.6f}, peak {peak_gib()} GiB", flush=True)
    rec = {"name": args.name, "overrides": args.overrides, "date": time.strftime("%Y-%m-%d %H:%M"),
           "peak_gib": max(v[0] for v in calls.values()), "calls_peak_gib_seconds": calls, "losses": losses,
           "loadavg": [round(x, 2) for x in os.getloadavg()], "machine": f"{os.cpu_count()} cores"}
    append_record(args.out, rec)


if __name__ == "__main__":
    main()
