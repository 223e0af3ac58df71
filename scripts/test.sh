#!/usr/bin/env bash
# Installs what is missing and runs the test suite (CPU).
#   bash scripts/test.sh [pytest args]
# The suite starts its own redis-server on a free port (tests/redis_proc.py); it never touches
# a Redis it did not start.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pytest "$@"
