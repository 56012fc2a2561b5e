#!/usr/bin/env bash
# The whole test suite on a fresh machine: builds the CPU stack if needed, then runs every test
# (unit tests first, then the real vLLM engine, Dynamo and store tests). Extra args go to pytest:
# paths or test ids run just those (e.g. `bash scripts/test.sh tests/unit`, the fast lane), options
# alone apply to the whole suite (pyproject's testpaths).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
