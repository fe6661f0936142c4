"""One simulated rank of a model / pipeline parallel training step, compiled by MindSpore under DryRun level 0 (the
host side of `msrun --sim_level 0 --sim_rank_id R`): run as a child process by tools/dryrun.py, with RANK_ID,
RANK_SIZE and MS_SIMULATION_LEVEL set and, without CANN, the compile-only stand-in on its library path.

    python -m youzhi_ms.dryrun.compile_rank JOB.json

JOB.json (written by youzhi_ms.dryrun.plan): the resolved run config, the student / teacher config.json contents,
rank, world, and where to write the result. The models are built as shape-only parameters inside MindSpore's
`no_init_parameters` (nothing is materialised: a 7B pair compiles in ~4 GB of host memory). The result lists every
parameter this rank holds after compilation, with its slice shape, dtype and optimizer-shard group size, read from
MindSpore's `parameter_layout_dict`.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback

import numpy as np

from youzhi_ms.config import load_any_config
from youzhi_ms.train.parallel import build_semi_auto_step, local_rows, opt_shard_size, plan_parallel
from youzhi_ms.train.run_config import RunConfig


def run(job_path: str) -> int:
    with open(job_path) as f:
        job = json.load(f)
    out_path = job["out"]
    result = {"rank": job["rank"], "world": job["world"]}
    t0 = time.time()
    try:
        # MindSpore is imported here, inside the try: loading its Ascend plugin (on the CANN stand-in) is part of what
        # this rank checks, and a failure must come back as this rank's result, not as a crash without one
        import mindspore as ms
        from mindspore.communication import init
        ms.set_device("Ascend")
        ms.set_context(mode=ms.GRAPH_MODE)
        init()
        from mindspore.nn.utils import no_init_parameters
        run_config = RunConfig.parse(job["config"])
        scfg = load_any_config(job["student_config"])
        tcfg = load_any_config(job["teacher_config"]) if job.get("teacher_config") else None
        plan = plan_parallel(job["config"]["parallel_config"], job["student_config"], job.get("teacher_config"),
                             job["world"])
        with no_init_parameters():
            net, step, _, _ = build_semi_auto_step(run_config, plan, scfg, tcfg, job["rank"], job["world"],
                                                   strategy_file=job.get("strategy_file"))
        rows, seq = local_rows(run_config, plan), run_config.runner.seq_length
        ids = ms.Tensor(np.zeros((rows, seq), np.int32))
        mask = ms.Tensor(np.ones((rows, seq), np.float32))
        net.compile(ids, ids, mask)
        layout = net.parameter_layout_dict
        params = {p.name: p for p in step.get_parameters()}
        held = []
        for name, lay in layout.items():
            p = params.get(name)
            if p is None:  # graph inputs (args0..) and anything that is not a parameter
                continue
            held.append({"name": name, "full_shape": [int(x) for x in p.shape],
                         "slice_shape": [int(x) for x in lay[2]], "dtype": str(p.dtype).lower(),
                         "opt_shard": opt_shard_size(lay[5] if len(lay) > 5 else ""),
                         "dev_matrix": [int(x) for x in lay[0]], "tensor_map": [int(x) for x in lay[1]]})
        hyper = params.get("step_hyper")  # the step's scalars: on every rank, not in the layout dict
        if hyper is not None and "step_hyper" not in layout:
            held.append({"name": "step_hyper", "full_shape": [int(x) for x in hyper.shape],
                         "slice_shape": [int(x) for x in hyper.shape], "dtype": str(hyper.dtype).lower(),
                         "opt_shard": 1, "dev_matrix": [], "tensor_map": []})
        result.update(ok=True, parameters=held, rows=rows, seq_length=seq, mindspore_version=ms.__version__)
        code = 0
    except Exception as exc:  # reported by the parent as one line, with the log for the details
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        result.update(ok=False, error=f"{type(exc).__name__}: {first}", traceback=traceback.format_exc())
        code = 3
    result["seconds"] = round(time.time() - t0, 1)
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, out_path)
    return code


if __name__ == "__main__":
    sys.exit(run(sys.argv[1]))
