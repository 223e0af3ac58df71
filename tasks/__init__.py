"""tideq's Celery side: `celery -A tasks worker -Q high,low` finds the app here.

The app is created on first access so that the producer can import tasks.keys / tasks.config /
tasks.store without configuring Celery or reading a deployment file.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Celery's app finder looks for `app`, then `celery`, on the module it is given.
    if name in ("app", "celery"):
        from tasks.app import app

        return app
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")
