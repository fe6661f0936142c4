#!/usr/bin/env python
"""Train a converted MLA student: GKD recovery from its GQA teacher (run_mode distill) or SFT on chat data (run_mode
sft), configured by a MindFormers-style yaml.

  python tools/train.py --config yaml_configs/distill_smollm2_mla.yaml \\
      --set model.student=output/smollm2_mla --set distill.teacher=output/smollm2_hf \\
      --set runner_config.max_steps=200 --set output_dir=output/gkd_smollm2 [--resume]

  data parallel on CPU (2 workers; msrun starts `python` from PATH, the launcher puts .venv/bin first):
  bash run_scripts/msrun_launcher.sh "tools/train.py --config yaml_configs/distill_smollm2_mla.yaml" 2 8118 \\
      output/msrun_log True 7200
  (MindFormers' 6-argument form; JOIN True waits for the workers, the default False returns at once)

--set section.key=value overrides one yaml key (repeatable; values parsed as yaml scalars; callbacks as
callbacks.CheckpointMonitor.save_checkpoint_steps=50). Unknown keys are refused. --resume continues from the newest
checkpoint in output_dir exactly (weights, AdamW moments, data position, RNG). Outputs in output_dir: loss_log.jsonl,
loss_curve.png, checkpoint/step_N/, hf_model/ (Hugging Face DeepSeek-V3 directory, read by tools/eval_ppl.py).
"""
import json

import _bootstrap  # noqa: F401

from youzhi_ms.cli import add_run_dir_options, yaml_config_parser
from youzhi_ms.errors import YouzhiError, cli_main


@cli_main
def main(argv=None):
    ap = yaml_config_parser(__doc__, "yaml file (yaml_configs/*.yaml)")
    add_run_dir_options(ap, "continue from the newest checkpoint in output_dir")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (LossMonitor lines only)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config as json and exit")
    args = ap.parse_args(argv)
    if args.resume and args.overwrite:
        raise YouzhiError("pass either --resume (continue the run in output_dir) or --overwrite (start it over)")
    from youzhi_ms.train.run_config import load_run_config
    cfg = load_run_config(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(cfg, indent=1))
        return
    import logging
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from youzhi_ms.train.trainer import train
    res = train(cfg, resume=args.resume, progress=False if args.no_progress else None, overwrite=args.overwrite)
    if res["rank"] == 0:
        losses = res["losses"]
        tail = f", loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else ""
        print(f"trained steps {res['start_step']}..{res['end_step']} on {res['world']} worker(s){tail} "
              f"[{res['seconds']} s, peak memory {res['peak_rss_mib'] / 1024:.1f} GB]; log {res['loss_log']}" + (f"; model {res['hf_model']}" if res.get("hf_model")
                                                                  else ""))


if __name__ == "__main__":
    main()
