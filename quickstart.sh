#!/usr/bin/env bash
# The offline quickstart in one command: install the project, then run the whole pipeline on the tiny preset
# with the bundled data (stage 1, stage 2 for two targets, side-by-side rewrites). A few minutes on a CPU.
# Runs in the active virtual environment, else in .venv (support/env.sh makes it).
set -euo pipefail
cd "$(dirname "$0")"
source support/env.sh
"$PYTHON" -m pip install --quiet -e .
"$PYTHON" quickstart.py "$@"
