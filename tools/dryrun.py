#!/usr/bin/env python
"""Compile a model / pipeline parallel training plan with MindSpore's own parallel compiler (DryRun, no device) and
print the memory per rank against the 64 GB of an Ascend 910B card, before anyone books a cluster.

  python tools/dryrun.py --config yaml_configs/distill_qwen2_5_7b_mla.yaml [--json OUT.json]
  python tools/dryrun.py --config yaml_configs/distill_qwen2_5_14b_mla_16npu.yaml --rank 8
  python tools/dryrun.py --config X.yaml --layers-per-stage 1      # the cheaper check CI runs (real widths)

One rank per pipeline stage is compiled (the ranks of a stage hold equal slices), each in a child process under
DryRun level 0 (MS_SIMULATION_LEVEL=0, RANK_ID, RANK_SIZE): strategy checks, redistribution, communication operators,
pipeline split, at the real shapes; weights are never materialised. Parameters, gradients and optimizer states per
rank come from the compiled slices; activations are an estimate (youzhi_ms/dryrun/memory.py). Without CANN the
children load a compile-only stand-in built once from the installed MindSpore wheel into ~/.cache/youzhi_ms_dryrun
(YOUZHI_DRYRUN_CACHE); with CANN installed it is used, and --level 1 adds MindSpore's own memory statistics.

Model shapes: --student-config / --teacher-config (a config.json or its directory), else the yaml's model.student /
distill.teacher directories if they are on this machine, else the yaml's dry_run section. Exit 2 with one `error:`
line if the plan is refused (heads not divisible by model_parallel, ...), rejected by the compiler, or does not fit.
--json writes {world_size, data_parallel, model_parallel, pipeline_stage, unsharded_param_bytes, ranks: [{rank, stage,
param_bytes, grad_bytes, optimizer_bytes, activation_bytes, total_bytes}], ...}, bytes per rank.
"""

import _bootstrap  # noqa: F401

from youzhi_ms.cli import NONNEGATIVE, POSITIVE, yaml_config_parser
from youzhi_ms.errors import YouzhiError, cli_main
from youzhi_ms.fsutil import OVERWRITE_HELP, check_output_dir, check_output_file, write_json_output


@cli_main
def main(argv=None):
    ap = yaml_config_parser(__doc__, "training yaml (yaml_configs/*.yaml)")
    ap.add_argument("--rank", type=NONNEGATIVE, default=None,
                    help="compile only this rank (default: one rank per stage)")
    ap.add_argument("--json", default=None, help="write the per-rank figures as json")
    ap.add_argument("--student-config", default=None, help="student config.json or model directory")
    ap.add_argument("--teacher-config", default=None, help="teacher config.json or model directory")
    ap.add_argument("--layers-per-stage", type=POSITIVE, default=None,
                    help="compile with this many layers per stage at the real widths and scale the per-layer slices "
                         "to the full depth (a cheaper check; the default compiles the full depth)")
    ap.add_argument("--level", type=int, default=0, choices=(0, 1),
                    help="DryRun level: 0 compile only (default); 1 adds MindSpore's memory statistics (needs CANN)")
    ap.add_argument("--strategy-dir", default=None,
                    help="also save MindSpore's parameter strategy file of every compiled rank here "
                         "(strategy_rank_R.ckpt)")
    ap.add_argument("--jobs", type=POSITIVE, default=1,
                    help="compile this many ranks at once (each child needs 1-5 GB of host memory; default 1)")
    ap.add_argument("--keep-workdir", action="store_true", help="keep the children's jobs and logs")
    ap.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    args = ap.parse_args(argv)
    from youzhi_ms.dryrun.driver import dry_run
    from youzhi_ms.train.run_config import load_run_config
    inputs = [("--config", args.config), ("--student-config", args.student_config),
              ("--teacher-config", args.teacher_config)]
    if args.json is not None:  # now, not after minutes of compiling
        check_output_file(args.json, args.overwrite, inputs)
    if args.strategy_dir is not None:
        check_output_dir(args.strategy_dir, args.overwrite, inputs, "--strategy-dir")
    cfg = load_run_config(args.config, args.overrides)
    res = dry_run(cfg, args.student_config, args.teacher_config, rank=args.rank, level=args.level,
                  layers_per_stage=args.layers_per_stage, strategy_dir=args.strategy_dir,
                  keep_workdir=args.keep_workdir, jobs_at_once=args.jobs, overwrite=args.overwrite)
    rep = res.report
    batch = (f"{rep['batch_size']} x {rep['micro_batch_num']} micro-batches" if rep["pipeline_stage"] > 1
             else f"{rep['batch_size']}")
    print(f"\n{args.config}: dp {rep['data_parallel']} x mp {rep['model_parallel']} x pp {rep['pipeline_stage']} = "
          f"{rep['world_size']} NPUs, batch {batch} x seq {rep['seq_length']} per data-parallel rank, recompute "
          f"{rep['recompute']}, parallel optimizer {rep['parallel_optimizer']} (compile only, DryRun level "
          f"{rep['dryrun_level']}, {rep['cann']}; {rep['strategy_table_checked']} weight slices match the strategy "
          "table)")
    print(res.table)
    if args.json is not None:
        write_json_output(args.json, rep, args.overwrite, inputs)
    if not res.fits:
        from youzhi_ms.dryrun.memory import human
        w = res.worst
        raise YouzhiError(f"the plan does not fit: rank {w['rank']} (stage {w['stage']}) needs "
                          f"{human(w['total_bytes'])} of {human(res.limit_bytes)}; enable "
                          "recompute_config.recompute, parallel.enable_parallel_optimizer, or raise model_parallel / "
                          "pipeline_stage")


if __name__ == "__main__":
    main()
