#!/usr/bin/env bash
# The whole YouZhi pipeline on SmolLM2 with the news domain, set-up included (tools/pipeline.py does the work):
#   bash run_scripts/youzhi_pipeline.sh                     # yaml_configs/youzhi_pipeline_smollm2.yaml
#   bash run_scripts/youzhi_pipeline.sh --resume            # continue after an interruption (finished stages kept)
#   CONFIG=my_pipeline.yaml bash run_scripts/youzhi_pipeline.sh --set domain.corpus=my_docs.jsonl
# Every argument goes to tools/pipeline.py (--set, --resume, --overwrite, --stop-after).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-yaml_configs/youzhi_pipeline_smollm2.yaml}
bash run_scripts/setup_env.sh
. .venv/bin/activate
exec python tools/pipeline.py --config "$CONFIG" "$@"
