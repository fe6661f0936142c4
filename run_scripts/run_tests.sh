#!/usr/bin/env bash
# Set up the environment (with the test extra) and run the test suite; the 15 slowest tests are listed at the end.
# Extra arguments go to pytest (instead of the default `tests`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash run_scripts/setup_env.sh --test
. .venv/bin/activate
export PATH="$PWD/.venv/bin:$PATH"   # msrun-launched workers start `python` from PATH
python -m pytest -q -p no:cacheprovider --durations=15 "${@:-tests}"  # the 15 slowest at the end
