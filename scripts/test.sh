#!/usr/bin/env bash
# The whole test suite on a fresh machine: builds the CPU stack if needed, then runs every test
# (unit tests first, then the real vLLM engine, Dynamo and store tests). Extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
