#!/usr/bin/env bash
# The dynamo-flexkv demo, from a bare machine: installs the CPU stack (scripts/setup.sh, idempotent),
# then runs a Dynamo deployment — KV-routing frontend + two vLLM workers — with and without FlexKV,
# and prints cache hits per worker and tier, router events and TTFT. Extra arguments go to the demo
# (python -m dynamo_flexkv.demo --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m dynamo_flexkv.demo "$@"
