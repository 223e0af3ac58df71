#!/usr/bin/env bash
# Installs what is missing, makes sure a Redis answers, runs the test suite (CPU).
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python -m tasks.redis_server "redis://${TIDEQ_TEST_REDIS_HOST:-127.0.0.1}:${TIDEQ_TEST_REDIS_PORT:-6379}/0"
python -m pytest "$@"
