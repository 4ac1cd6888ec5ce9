#!/usr/bin/env bash
# Create .venv and install the project with the given extras (e.g. "serve" or "train,serve,dev").
# torch is pinned to the CPU build; a GPU user installs the CUDA build of the same version first.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-serve}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [[ "$extras" == *train* ]]; then
    .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[${extras}]"
