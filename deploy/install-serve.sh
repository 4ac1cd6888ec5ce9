#!/bin/sh
# The serving environment, as the Dockerfile builds it (tests/deploy build it the same way):
# a fresh virtualenv at VENV holding this project with one serving extra, `serve` (onnxruntime)
# or `serve-gpu` (onnxruntime-gpu), and no torch.
#
# Run it from a source tree that holds pyproject.toml, README.md, gsa_contract/ and service/ only (the Docker
# build copies just these), so that the installed package holds no training code.
#
# Usage: sh deploy/install-serve.sh VENV [EXTRA]
set -eu
venv="$1"
extra="${2:-serve}"

python3 -m venv "$venv"
"$venv/bin/python" -m pip install --disable-pip-version-check --no-input ".[$extra]"

# Refuse an environment that breaks the image's promises: no torch, no training code, and exactly
# one ONNX Runtime package (onnxruntime and onnxruntime-gpu install the same module over each other).
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import importlib.util
import sys

names = {d.metadata["Name"].lower().replace("_", "-") for d in md.distributions()}
runtimes = sorted(names & {"onnxruntime", "onnxruntime-gpu"})
problems = []
if "torch" in names:
    problems.append("torch is installed")
if importlib.util.find_spec("training") is not None:
    problems.append("the training package is installed")
if len(runtimes) != 1:
    problems.append(f"expected one ONNX Runtime package, found {runtimes or 'none'}")
if problems:
    sys.exit("install-serve.sh: " + "; ".join(problems))
print(f"install-serve.sh: serving environment ready ({runtimes[0]}, no torch)")
PY
