#!/usr/bin/env bash
# Smoke tests (`pytest -m smoke`, ~1 min) against the LOWEST transformers that pyproject.toml allows.
# It is installed with `pip install --target` into .venv/transformers-lowest (a few MB; torch and every
# other package come from .venv) and put first on PYTHONPATH. Run after scripts/setup.sh --test.
set -euo pipefail
cd "$(dirname "$0")/.."
LOW=$(sed -n 's/^ *"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
# transformers 5.0-5.10 pin tokenizers <=0.23.0 and huggingface-hub <2 (newer releases take the venv's).
DEPS=("transformers==$LOW" "tokenizers==0.22.2" "huggingface-hub>=1.5,<2")
VENV=${VENV:-.venv}
DIR=$VENV/transformers-$LOW
[ -f "$DIR/.done" ] || { rm -rf "$DIR"; "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --target "$DIR" "${DEPS[@]}" && touch "$DIR/.done"; }
PYTHONPATH="$(realpath "$DIR"):$PWD" "$VENV/bin/python" - <<PY
import transformers; assert transformers.__version__ == "$LOW", transformers.__version__
print("smoke tests against transformers", transformers.__version__)
PY
PYTHONPATH="$(realpath "$DIR"):$PWD" exec "$VENV/bin/python" -m pytest -q -m smoke "$@"
