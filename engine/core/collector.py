"""When an engine rank process collects its oldest generation of garbage: at a step where no
high job pays for it.

CPython collects its oldest generation (in a rank process: every tracked object made since
start-up was frozen, the live requests, their sequences and token lists) once enough objects
have survived into it. On a busy core that came every few seconds and held the step loop
13-15 ms (W-priority, H200, `TIDEQ_STEP_TRACE`): one high job in ten lived through one, which
put 6 % on its latency, and that is the p99. So a rank process takes the oldest generation
off the automatic schedule and collects it here, after a step, when no high work is running
or waiting (the scheduler's fast lane is off), at most once every `every_steps` steps; a core
that never leaves the lane collects anyway every `at_most_steps`. The young generations are
still collected automatically (they hold only recent objects, and cost microseconds), and
reference counting frees acyclic garbage at once whatever this does: only cycles among
long-lived objects wait for it. Counted in steps, not time, so that a sharded group's ranks,
which run the same steps, collect at the same one.

$TIDEQ_CORE_GC=auto leaves CPython's own schedule in place (for comparison).
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Mapping

log = logging.getLogger(__name__)

GC_ENV = "TIDEQ_CORE_GC"
# Steps between full collections while the core serves only low work (a few seconds).
EVERY_STEPS = 2000
# Steps after which a core that stays in the fast lane collects anyway (minutes).
AT_MOST_STEPS = 100_000
# A threshold no count of the oldest generation reaches: only this module collects it.
_NEVER = 1 << 30


class FullCollections:
    """Collects the oldest generation after a step (see the module docstring). Install once
    per process, after its start-up heap is frozen."""

    def __init__(self, every_steps: int = EVERY_STEPS,
                 at_most_steps: int = AT_MOST_STEPS) -> None:
        if not 1 <= every_steps <= at_most_steps:
            raise ValueError("need 1 <= every_steps <= at_most_steps")
        self.every_steps = every_steps
        self.at_most_steps = at_most_steps
        self.collections = 0
        self._steps = 0

    @classmethod
    def install(cls, environ: Mapping[str, str] | None = None) -> FullCollections | None:
        """Take the oldest generation off CPython's schedule and return the collector that
        runs it; None (nothing changed) when $TIDEQ_CORE_GC is "auto"."""
        mode = (os.environ if environ is None else environ).get(GC_ENV, "").strip().lower()
        if mode == "auto":
            return None
        if mode not in ("", "steps"):
            # A rank process has no one to raise this to before it reports ready: say it.
            log.warning("$%s=%r is not one of steps (the default), auto: using steps",
                        GC_ENV, mode)
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, _NEVER)
        return cls()

    def after_step(self, high_work: bool) -> bool:
        """Count a step; collect in full if one is due. Returns whether it collected."""
        self._steps += 1
        if self._steps < self.every_steps or (high_work and self._steps < self.at_most_steps):
            return False
        gc.collect()
        self._steps = 0
        self.collections += 1
        return True
