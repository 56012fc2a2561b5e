#!/usr/bin/env bash
# The dynamo-flexkv demo, from a bare machine: installs the CPU stack (scripts/setup.sh, idempotent),
# then runs a Dynamo deployment — KV-routing frontend + two vLLM workers serving a model whose prefill
# dominates (built offline on first use) — with and without FlexKV, replays a chat workload several
# times per pass, and prints tokens by source, router events and TTFT (median and min-max); the PNG
# and JSON go to demo-results/. Extra arguments go to the demo (python -m dynamo_flexkv.demo --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m dynamo_flexkv.demo "$@"
