#!/usr/bin/env bash
# Creates .venv (seeing the system's packages, so an installed CUDA torch is reused),
# installs the CPU build of torch only when no torch is importable, then lora_graph with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv --system-site-packages .venv
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[test]"
