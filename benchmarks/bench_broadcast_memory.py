#!/usr/bin/env python
"""MindSpore 2.10 CPU: peak memory of 8 chained element-wise ops on a 100 MB tensor whose other operand is broadcast
implicitly (as numpy would) or explicitly first (ops.broadcast_to, what youzhi_ms.models.layers.spread does).

  python benchmarks/bench_broadcast_memory.py [--out benchmarks/results/broadcast_memory.json]

Each case runs in its own process (a compiled graph's memory stays with the process). Prints a table: the peak RSS
above the inputs, and what stays allocated after the graph returned.
"""
import argparse
import json
import os
import subprocess
import sys

CASES = {  # name: (operation, shape of the broadcast operand)
    "column [N,D] * [N,1] (RMSNorm's rsqrt)": "col",
    "middle [B,H,S,d] * [B,1,S,d] (RoPE's cos)": "mid",
    "masked_fill [B,H,S,d] with a [B,H,S,1] mask": "mask",
    "0-d tensor [B,H,S,d] * [] (a scalar)": "scalar",
}


def child(case: str, explicit: bool) -> dict:
    import numpy as np
    import mindspore as ms
    from mindspore import nn, ops
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")

    def gib(key):
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith(key + ":")) / 2 ** 20

    def full(a, like):
        return ops.broadcast_to(a, like.shape) if explicit else a

    class Chain(nn.Cell):
        def construct(self, x, y):
            for _ in range(8):
                if case == "col":
                    x = x * full(ops.rsqrt(ops.mean(x * x, -1, keep_dims=True) + 1.0), x)
                elif case == "mask":
                    x = ops.masked_fill(x, full(y, x), 0.0) + 1.0
                else:
                    x = x * full(y, x)
            return x.sum()

    shape = (5000, 5000) if case == "col" else (4, 25, 1000, 250)
    other = {"col": None, "mid": (4, 1, 1000, 250), "mask": (4, 25, 1000, 1), "scalar": ()}[case]
    x = ms.Tensor(np.ones(shape, np.float32))
    y = ms.Tensor(np.zeros(other, bool) if case == "mask" else np.ones(other or (), np.float32))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = gib("VmRSS")
    Chain()(x, y).asnumpy()
    return {"peak_above_inputs_gib": round(gib("VmHWM") - before, 2), "kept_after_gib": round(gib("VmRSS") - before, 2)}


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3] == "1")))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/broadcast_memory.json")
    args = ap.parse_args()
    rows = []
    print(f"{'case (8 ops, 100 MB output each)':48s} {'implicit: peak / kept GiB':>26s} {'explicit: peak / kept GiB':>26s}")
    for name, case in CASES.items():
        r = {"case": name}
        for explicit in (False, True):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", case, str(int(explicit))],
                                 capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            r["explicit" if explicit else "implicit"] = json.loads(out)
        rows.append(r)
        i, e = r["implicit"], r["explicit"]
        print(f"{name:48s} {i['peak_above_inputs_gib']:>12.2f} / {i['kept_after_gib']:<11.2f} "
              f"{e['peak_above_inputs_gib']:>12.2f} / {e['kept_after_gib']:<11.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
