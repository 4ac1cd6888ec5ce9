#!/usr/bin/env bash
# Set up everything (training, serving, test tools) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "train,serve,dev"
exec .venv/bin/python -m pytest -q "$@"
