#!/usr/bin/env bash
# Launch a python script on several MindSpore workers with msrun (MindFormers' launcher contract).
#
#   bash run_scripts/msrun_launcher.sh "<python script and args>" [WORKER_NUM] [LOCAL_WORKER] [MASTER_ADDR] \
#        [MASTER_PORT] [NODE_RANK] [LOG_DIR] [JOIN] [CLUSTER_TIME_OUT]
#
# Give 1, 2, 6 or 9 arguments:
#   1: "<script args>"                               8 workers on this node
#   2: "<script args>" WORKER_NUM                    WORKER_NUM workers on this node
#   6: + LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK   (multi-node)
#   9: + LOG_DIR JOIN CLUSTER_TIME_OUT
# Defaults: WORKER_NUM 8, LOCAL_WORKER = WORKER_NUM, MASTER_ADDR 127.0.0.1, MASTER_PORT 8118, NODE_RANK 0,
# LOG_DIR output/msrun_log, JOIN True (wait for the workers and return their status), CLUSTER_TIME_OUT 7200 s.
# Worker logs: LOG_DIR/worker_<rank>.log (scheduler: LOG_DIR/scheduler.log).
#
# Example (2 data-parallel CPU workers):
#   bash run_scripts/msrun_launcher.sh "tools/train.py --config yaml_configs/distill_smollm2_mla.yaml" 2
#
# msrun starts `python` from PATH, so the repository's .venv/bin (when present) is put first on PATH.
set -euo pipefail

usage() {
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2
}

case $# in
  1|2|6|9) ;;
  *) echo "error: expected 1, 2, 6 or 9 arguments, got $#" >&2; usage; exit 2 ;;
esac

EXECUTE_ORDER="$1"
WORKER_NUM=8
LOCAL_WORKER=8
MASTER_ADDR="127.0.0.1"
MASTER_PORT=8118
NODE_RANK=0
LOG_DIR="output/msrun_log"
JOIN="True"
CLUSTER_TIME_OUT=7200

if [ $# -ge 2 ]; then
  WORKER_NUM="$2"
  LOCAL_WORKER="$2"
fi
if [ $# -ge 6 ]; then
  LOCAL_WORKER="$3"
  MASTER_ADDR="$4"
  MASTER_PORT="$5"
  NODE_RANK="$6"
fi
if [ $# -eq 9 ]; then
  LOG_DIR="$7"
  JOIN="$8"
  CLUSTER_TIME_OUT="$9"
fi

for v in WORKER_NUM LOCAL_WORKER MASTER_PORT NODE_RANK CLUSTER_TIME_OUT; do
  if ! [[ "${!v}" =~ ^[0-9]+$ ]]; then
    echo "error: $v must be a non-negative integer, got '${!v}'" >&2
    exit 2
  fi
done
if [ "$WORKER_NUM" -eq 1 ]; then
  echo "error: WORKER_NUM=1: msrun is for several workers; use python instead, e.g. python $EXECUTE_ORDER" >&2
  exit 2
fi
if [ "$WORKER_NUM" -lt 1 ] || [ "$LOCAL_WORKER" -lt 1 ] || [ "$LOCAL_WORKER" -gt "$WORKER_NUM" ]; then
  echo "error: need 1 <= LOCAL_WORKER ($LOCAL_WORKER) <= WORKER_NUM ($WORKER_NUM)" >&2
  exit 2
fi
case "$JOIN" in
  True|False) ;;
  true) JOIN=True ;;
  false) JOIN=False ;;
  *) echo "error: JOIN must be True or False, got '$JOIN'" >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$ROOT/.venv/bin/python" ]; then
  export PATH="$ROOT/.venv/bin:$PATH"
fi
if ! command -v msrun >/dev/null 2>&1; then
  echo "error: msrun not found on PATH; install mindspore (bash run_scripts/setup_env.sh) or activate its venv" >&2
  exit 2
fi

mkdir -p "$LOG_DIR"
echo "msrun: $WORKER_NUM worker(s) ($LOCAL_WORKER on this node, rank $NODE_RANK), master $MASTER_ADDR:$MASTER_PORT," \
     "logs in $LOG_DIR"
# shellcheck disable=SC2086  # EXECUTE_ORDER is a command line: split it into the script and its arguments
exec msrun --worker_num="$WORKER_NUM" \
  --local_worker_num="$LOCAL_WORKER" \
  --master_addr="$MASTER_ADDR" \
  --master_port="$MASTER_PORT" \
  --node_rank="$NODE_RANK" \
  --log_dir="$LOG_DIR" \
  --join="$JOIN" \
  --cluster_time_out="$CLUSTER_TIME_OUT" \
  $EXECUTE_ORDER
