"""The process one pipeline stage runs in (started by runner.run_child, not by users):
python -m youzhi_ms.pipeline.worker --output-dir OUT --stage NAME [--resume]

Reads OUT/pipeline_config.json (written by the runner), runs the stage function, and writes its figures plus this
process's peak memory to OUT/stages/NAME.json (whole, then renamed) as its very last act, so a result file always
means a finished stage."""
import json
import os
import resource

from youzhi_ms.cli import ArgumentParser
from youzhi_ms.errors import cli_main


@cli_main
def main(argv=None):
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--stage", required=True)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)
    import logging
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from youzhi_ms.pipeline.runner import CONFIG, RESULTS, _write_json
    from youzhi_ms.pipeline.stages import BY_NAME, Context
    with open(os.path.join(args.output_dir, CONFIG), encoding="utf-8") as f:
        cfg = json.load(f)
    stage = BY_NAME[args.stage]
    ctx = Context(cfg, args.output_dir)
    res = stage.fn(ctx, resume=args.resume) if stage.resumable else stage.fn(ctx)
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,  # this process, or a tool it ran (GGUF export)
               resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    res["peak_rss_mib"] = round(peak / 1024.0, 1)  # KiB on Linux
    _write_json(os.path.join(args.output_dir, RESULTS, args.stage + ".json"), res)


if __name__ == "__main__":
    main()
