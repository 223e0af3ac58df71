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


def run_in_interpreter(test_file: str, *calls: str, timeout: float = 240) -> None:
    """Import `test_file` as `t` (with torch imported) and run each of `calls` under the
    interpreter, each in a process of its own, all at once (the interpreter is single-threaded
    and CPU-bound: two checks take the time of one on two cores); fail with the output of any
    that does not complete."""
    test_path = Path(test_file)
    paths = [str(REPO_ROOT), str(test_path.parent)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c",
             f"import sys, torch; sys.path[:0] = {paths!r};"
             f"import {test_path.stem} as t;"
             f"{call}; print('ok')"],
            env={**os.environ, "TRITON_INTERPRET": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for call in calls
    ]
    try:
        outputs = [proc.communicate(timeout=timeout) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for call, proc, (out, err) in zip(calls, procs, outputs, strict=True):
        assert proc.returncode == 0 and "ok" in out, f"{call}:\n" + out[-3000:] + err[-5000:]
