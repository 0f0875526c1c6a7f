# Sourced by quickstart.sh and test.sh: sets PYTHON to the Python the project runs in, with torch installed.
# Inside an active virtual or conda environment, that one; otherwise .venv in the checkout, made from python3
# on first use, because a stock Debian or Ubuntu refuses pip outside a virtual environment (PEP 668).
# torch goes in first, and only if absent: a bare `torch` requirement would fetch a multi-GB CUDA build;
# 2.13.0 is the CPU wheel these machines carry (any build >= 2.5 works; see pytorch.org for yours).
if [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]; then
  PYTHON=$(command -v python || command -v python3)
else
  if [ ! -x .venv/bin/python ]; then
    command -v python3 >/dev/null || { echo "no python3 found: install Python 3.10 or newer" >&2; exit 1; }
    python3 -m venv .venv || { echo "python3 -m venv failed: install your system's venv package (Debian and" \
                                    "Ubuntu: apt install python3-venv)" >&2; exit 1; }
    echo "made a virtual environment in $(pwd)/.venv; use it later with: source .venv/bin/activate" >&2
  fi
  PYTHON=.venv/bin/python
fi
"$PYTHON" -c "import torch" 2>/dev/null || "$PYTHON" -m pip install --quiet torch==2.13.0
