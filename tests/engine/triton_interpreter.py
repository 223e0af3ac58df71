"""Run a test module's checks under Triton's CPU interpreter, in a fresh Python process.

TRITON_INTERPRET must be set before Triton compiles anything and would leak into every other
test of the session, so each file's interpreter check runs in a subprocess of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_in_interpreter(test_file: str, calls: str, timeout: float = 240) -> None:
    """Import `test_file` as `t` (with torch imported) and run `calls` under the interpreter;
    fail with the subprocess's output unless it completes."""
    test_path = Path(test_file)
    paths = [str(REPO_ROOT), str(test_path.parent)]
    code = (
        f"import sys, torch; sys.path[:0] = {paths!r};"
        f"import {test_path.stem} as t;"
        f"{calls}; print('ok')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
