#!/usr/bin/env bash
# Creates .venv and installs tideq with its dev extra, once; later runs only check.
# torch is installed first and on its own: an unpinned resolve would fetch a multi-GB CUDA
# build. TIDEQ_TORCH_SPEC overrides what is installed (e.g. "torch==2.13.0 --index-url
# https://download.pytorch.org/whl/cpu" on a machine without a local CPU wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
torch_spec=${TIDEQ_TORCH_SPEC:-torch==2.13.0}

# redis-server: the demo starts one when none answers, and the tests start their own.
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis-server is not installed; install it (apt-get install redis-server)" >&2
  fi
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=.venv/.tideq-installed
want=$(cat pyproject.toml; echo "$torch_spec")
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python -m pip install -q --disable-pip-version-check --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q --disable-pip-version-check $torch_spec
python -m pip install -q --disable-pip-version-check -e ".[dev]"
echo "$want" > "$stamp"
