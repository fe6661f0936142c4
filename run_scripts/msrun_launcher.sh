#!/usr/bin/env bash
# Launch a python script on several MindSpore workers with msrun, with MindFormers' positional contract
# (scripts/msrun_launcher.sh): the same four forms, the same argument order and the same defaults.
#
#   1 argument   "CMD"                                   8 workers on this node
#   2 arguments  "CMD" WORKER_NUM                        WORKER_NUM workers on this node
#   6 arguments  "CMD" WORKER_NUM MASTER_PORT LOG_DIR JOIN CLUSTER_TIME_OUT              (one node)
#   9 arguments  "CMD" WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK LOG_DIR JOIN CLUSTER_TIME_OUT
#                (several nodes: run it on every node with its NODE_RANK; MASTER_ADDR = node 0)
#
# Defaults: WORKER_NUM 8, LOCAL_WORKER = WORKER_NUM, MASTER_ADDR 127.0.0.1, MASTER_PORT 8118, NODE_RANK 0,
# LOG_DIR output/msrun_log, JOIN False, CLUSTER_TIME_OUT 7200 s. With JOIN False (the default, as in MindFormers)
# msrun returns as soon as the workers are started and they keep running in the background; pass JOIN True (6- or
# 9-argument form) to wait for them and get their exit status. Worker logs: LOG_DIR/worker_<rank>.log.
# CMD is the python script and its arguments; msrun starts it with `python` from PATH.
#
# Example (2 data-parallel CPU workers, wait for them):
#   bash run_scripts/msrun_launcher.sh "tools/train.py --config yaml_configs/distill_smollm2_mla.yaml" 2 8118 \
#        output/msrun_log True 7200
#
# Differences from MindFormers' script: a wrong argument count or value prints one `error:` line and exits 2 (not a
# usage text and exit 1); JOIN also accepts true/false; the repository's .venv/bin (when present) is put first on PATH
# and the repository root on PYTHONPATH; MF_LOG_SUFFIX and PLOG_REDICT_TO_OUTPUT are not read and `ulimit -u` is
# left as it is.
set -euo pipefail

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
}

fail() {
  echo "error: $*" >&2
  exit 2
}

case $# in
  1|2|6|9) ;;
  *) echo "error: expected 1, 2, 6 or 9 arguments (MindFormers' msrun_launcher.sh forms), got $#" >&2
     usage
     exit 2 ;;
esac

EXECUTE_ORDER="$1"
WORKER_NUM=8
LOCAL_WORKER=8
MASTER_ADDR="127.0.0.1"
MASTER_PORT=8118
NODE_RANK=0
LOG_DIR="output/msrun_log"
JOIN="False"
CLUSTER_TIME_OUT=7200
SINGLE_NODE=true

[ -n "${EXECUTE_ORDER// /}" ] || fail "the first argument (the python script and its arguments) is empty"
case $# in
  2)
    WORKER_NUM="$2"; LOCAL_WORKER="$2" ;;
  6)
    WORKER_NUM="$2"; LOCAL_WORKER="$2"; MASTER_PORT="$3"; LOG_DIR="$4"; JOIN="$5"; CLUSTER_TIME_OUT="$6" ;;
  9)
    WORKER_NUM="$2"; LOCAL_WORKER="$3"; MASTER_ADDR="$4"; MASTER_PORT="$5"; NODE_RANK="$6"; LOG_DIR="$7"
    JOIN="$8"; CLUSTER_TIME_OUT="$9" ;;
esac

for v in WORKER_NUM LOCAL_WORKER MASTER_PORT NODE_RANK; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || fail "$v must be a non-negative integer, got '${!v}'"
done
# msrun: a negative time-out waits forever
[[ "$CLUSTER_TIME_OUT" =~ ^-?[0-9]+$ ]] || fail "CLUSTER_TIME_OUT must be an integer (seconds), got '$CLUSTER_TIME_OUT'"
[ "$WORKER_NUM" -ge 1 ] || fail "WORKER_NUM must be at least 1, got $WORKER_NUM"
if [ "$LOCAL_WORKER" -lt 1 ] || [ "$LOCAL_WORKER" -gt "$WORKER_NUM" ]; then
  fail "need 1 <= LOCAL_WORKER ($LOCAL_WORKER) <= WORKER_NUM ($WORKER_NUM)"
fi
case "$JOIN" in
  True|False) ;;
  true) JOIN=True ;;
  false) JOIN=False ;;
  *) fail "JOIN must be True or False, got '$JOIN'" ;;
esac
[ -n "$LOG_DIR" ] || fail "LOG_DIR is empty"
if [ $# -eq 9 ] && [ "$WORKER_NUM" -ne "$LOCAL_WORKER" ]; then
  SINGLE_NODE=false
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$ROOT/.venv/bin/python" ]; then
  export PATH="$ROOT/.venv/bin:$PATH"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
MSRUN_BIN="${YOUZHI_MSRUN:-msrun}"  # YOUZHI_MSRUN: another msrun executable (the tests record the command line)
command -v "$MSRUN_BIN" >/dev/null 2>&1 || \
  fail "msrun not found on PATH; install mindspore (bash run_scripts/setup_env.sh) or activate its venv"

MSRUN=("$MSRUN_BIN" --worker_num="$WORKER_NUM" --local_worker_num="$LOCAL_WORKER")
if [ "$SINGLE_NODE" = true ]; then
  echo "msrun: $WORKER_NUM worker(s) on this node, port $MASTER_PORT, logs in $LOG_DIR, join $JOIN"
else
  MSRUN+=(--master_addr="$MASTER_ADDR" --node_rank="$NODE_RANK")
  echo "msrun: $WORKER_NUM worker(s), $LOCAL_WORKER on this node (node rank $NODE_RANK), master" \
       "$MASTER_ADDR:$MASTER_PORT, logs in $LOG_DIR, join $JOIN; start the other nodes with their NODE_RANK"
fi
MSRUN+=(--master_port="$MASTER_PORT" --log_dir="$LOG_DIR" --join="$JOIN" --cluster_time_out="$CLUSTER_TIME_OUT")
mkdir -p "$LOG_DIR"
# shellcheck disable=SC2086  # EXECUTE_ORDER is a command line: split it into the script and its arguments
exec "${MSRUN[@]}" $EXECUTE_ORDER
