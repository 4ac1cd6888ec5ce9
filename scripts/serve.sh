#!/usr/bin/env bash
# Set up the serving environment (no torch) and serve the committed models on 127.0.0.1:8000.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh serve
exec .venv/bin/python -m service "$@"
