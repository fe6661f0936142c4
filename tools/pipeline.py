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
import argparse

import _bootstrap  # noqa: F401

from youzhi_ms.cli import ArgumentParser
from youzhi_ms.errors import YouzhiError, cli_main


@cli_main
def main(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="pipeline yaml (yaml_configs/youzhi_pipeline_smollm2.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one config key (repeatable), e.g. --set gkd.max_steps=100")
    ap.add_argument("--resume", action="store_true", help="continue the pipeline in output_dir")
    ap.add_argument("--overwrite", action="store_true",
                    help="start over in an output_dir that holds an earlier pipeline run (it is replaced; a "
                         "directory youzhi_ms did not create never is)")
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
