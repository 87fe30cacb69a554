#!/usr/bin/env bash
# Creates the LiteRT converter venv for hardware=tflite: ./.venv-litert (or $BENCH_LITERT_VENV) with the exact pins
# of pyproject.toml's `tflite` extra. It is separate from ./.venv because litert-torch brings its own stack
# (jax, torchao, litert-converter, transformers); torch stays the CPU 2.13.0 build. ~2.1 GB, ~4 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=${BENCH_LITERT_VENV:-.venv-litert}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip==25.3
PINS=$("$PY" -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["tflite"]))')
"$VENV/bin/pip" install --quiet $PINS
"$VENV/bin/python" -c 'import litert_torch, ai_edge_quantizer, torch; print("litert venv ok: torch", torch.__version__)'
