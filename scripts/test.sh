#!/usr/bin/env bash
# Set up everything (training, serving, Ray, test tools) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "train,serve,dev,distributed"
exec .venv/bin/python -m pytest -q "$@"
