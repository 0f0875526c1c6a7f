#!/usr/bin/env bash
# The offline quickstart in one command: install the project, then run the whole pipeline on the tiny preset
# with the bundled data (stage 1, stage 2 for two targets, side-by-side rewrites). A few minutes on a CPU.
set -euo pipefail
cd "$(dirname "$0")"
# torch first: any build >= 2.5 works (see pytorch.org for yours); 2.13.0 is the CPU wheel these machines carry
python -c "import torch" 2>/dev/null || python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e .
python quickstart.py "$@"
