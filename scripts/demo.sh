#!/usr/bin/env bash
# Installs what is missing, then runs the whole path end to end on the CPU demo: builds the
# small model, starts Redis if none answers, starts a worker, submits examples/prompts.jsonl,
# waits, prints the results, stops what it started.
#   bash scripts/demo.sh [--config configs/default.yaml] [--prompts FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
exec python -m tasks.demo "$@"
