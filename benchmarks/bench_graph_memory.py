#!/usr/bin/env python
"""Peak RSS of one compiled MindSpore graph over a model, without the trainer: how training memory scales with tokens.

  python benchmarks/bench_graph_memory.py --model MLA_DIR --mode grad_attention --batch 2 --seq-len 256 \
      [--out benchmarks/results/graph_memory.jsonl]

Modes: `forward` (final hidden states, no gradient), `grad_attention` (value_and_grad of sum(h^2) w.r.t. the
attention parameters, the trainer's trainable set), `grad_all`. Three calls; reported: the peak RSS after loading and
the peak of each call (high-water mark reset before it through /proc/self/clear_refs), and seconds per call.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_gkd_memory import _status, reset_peak  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--mode", choices=("forward", "grad_attention", "grad_all"), required=True)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results/graph_memory.jsonl")
    args = ap.parse_args()
    import mindspore as ms
    import numpy as np
    from mindspore import nn, ops
    from youzhi_ms.runtime import init_context
    init_context("graph")
    from youzhi_ms.checkpoint.mindspore_ckpt import load_model
    from youzhi_ms.train.chunked_loss import final_hidden
    model, cfg = load_model(args.model)
    ids = ms.Tensor(np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq_len)), ms.int32)
    loaded = _status("VmHWM")

    class SquareSum(nn.Cell):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def construct(self, x):
            return ops.sum(final_hidden(self.m, x) ** 2)

    net = SquareSum(model)
    if args.mode == "forward":
        fn = net
    else:
        for p in model.get_parameters():
            p.requires_grad = args.mode == "grad_all" or ".self_attention." in p.name
        fn = ms.value_and_grad(net, None, net.trainable_params())
    calls = []
    for _ in range(3):
        reset_peak()
        t0 = time.time()
        out = fn(ids)
        (out[0] if isinstance(out, tuple) else out).asnumpy()
        calls.append({"peak_rss_mib": _status("VmHWM"), "seconds": round(time.time() - t0, 2)})
    rec = {"model": args.model, "mode": args.mode, "batch": args.batch, "seq_len": args.seq_len,
           "peak_rss_mib_loaded": loaded, "calls": calls, "date": time.strftime("%Y-%m-%d %H:%M"),
           "loadavg": [round(x, 2) for x in os.getloadavg()]}
    with open(args.out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
