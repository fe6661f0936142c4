#!/usr/bin/env python
"""The whole YouZhi pipeline in one command, configured by a MindFormers-style yaml:

  source eval -> GQA->MLA conversion (adaptive FreqFold, stock DeepSeek-V3 export) -> eval -> GKD against the source
  -> eval -> domain step (continued pre-training on the domain corpus) -> eval -> MindIR export -> GGUF export (when
  tools/export_gguf.py is in the checkout) -> concurrency plan -> summary table (also summary.json / summary.png)

  python tools/pipeline.py --config yaml_configs/youzhi_pipeline_smollm2.yaml
  python tools/pipeline.py --config yaml_configs/youzhi_pipeline_smollm2.yaml --resume     # continue after a stop
  python tools/pipeline.py --config ... --set domain.corpus=my_docs.jsonl --set eval.domain_text=my_heldout.txt \\
      --set eval.mcq=ceval/val --set eval.mcq_format=ceval

After every model-making stage: general and domain held-out perplexity (each also as x the source's), MCQ accuracy
when eval.mcq is given, the stage's time and peak memory. Each stage runs in its own process; the state file
output_dir/pipeline_state.json makes the pipeline resumable per stage (--resume skips finished stages whose config and
inputs are unchanged; an interrupted training stage continues from its newest checkpoint). youzhi_ms/pipeline/config.py
lists every yaml key.
"""

import _bootstrap  # noqa: F401

from youzhi_ms.cli import add_run_dir_options, yaml_config_parser
from youzhi_ms.errors import YouzhiError, cli_main


@cli_main
def main(argv=None):
    ap = yaml_config_parser(__doc__, "pipeline yaml (yaml_configs/youzhi_pipeline_smollm2.yaml)", "gkd.max_steps=100")
    add_run_dir_options(ap, "continue the pipeline in output_dir")
    ap.add_argument("--stop-after", default=None, metavar="STAGE",
                    help="end after this stage (source, eval_source, convert, eval_mla, gkd, eval_gkd, domain, "
                         "eval_domain, mindir, gguf, plan); --resume continues")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config as json and exit")
    args = ap.parse_args(argv)
    if args.resume and args.overwrite:
        raise YouzhiError("pass either --resume (continue the pipeline in output_dir) or --overwrite (start it over)")
    from youzhi_ms.pipeline.config import load_pipeline_config
    cfg = load_pipeline_config(args.config, args.overrides)
    if args.print_config:
        import json
        print(json.dumps(cfg, indent=1))
        return
    from youzhi_ms.pipeline.runner import run_pipeline
    run_pipeline(cfg, resume=args.resume, overwrite=args.overwrite, stop_after=args.stop_after)


if __name__ == "__main__":
    main()
