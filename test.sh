#!/usr/bin/env bash
# The test suite in one command: install what the tests need, then run them (CI's .ci/run calls this).
# torch first, and only if absent: a bare `torch` requirement with no torch installed would fetch a
# multi-GB CUDA build; 2.13.0 is the CPU wheel these machines carry (any build >= 2.5 works).
set -euo pipefail
cd "$(dirname "$0")"
python -c "import torch" 2>/dev/null || python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[test]"
# two workers (tests/conftest.py gives each one thread): most tests wait on subprocesses, files and sockets
python -m pytest -q -n 2 --dist loadscope tests "$@"
