#!/usr/bin/env bash
# The test suite in one command: install what the tests need, lint, then run them (CI's .ci/run calls this).
# Runs in the active virtual environment, else in .venv (support/env.sh makes it).
set -euo pipefail
cd "$(dirname "$0")"
source support/env.sh
"$PYTHON" -m pip install --quiet -e ".[test]"
"$PYTHON" -m ruff check .
# two workers (tests/conftest.py gives each one thread): most tests wait on subprocesses, files and sockets
"$PYTHON" -m pytest -q -n 2 --dist loadscope tests "$@"
