"""A full worker stops taking `low` messages, and takes them again once it has room.

A `low` message taken while the worker's admission gate is full waits there in a task thread
(tasks/admission.py). Under a low flood every thread ends up holding one between bursts of
stored outcomes: a `high` message that arrives then waits in Redis for a thread, and the low
messages held unstarted are ones an idle worker could have run. So while the gate is full the
worker cancels its consumer of the `low` queue (Celery's own cancel_task_queue, as the
`cancel_consumer` remote command does) and adds it back (add_task_queue) once a quarter of the
limit is free again. `high` is never paused. Messages taken before the pause keep waiting at
the gate and run as before.

The decision is taken wherever the gate changes (task and finisher threads); the consumer is
changed only on its own thread, the one that runs its event loop, since kombu's channels are
not thread-safe: Consumer.call_soon hands the change over and wakes the loop.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from tasks import keys
from tasks.admission import AdmissionGate

log = logging.getLogger(__name__)


def resume_at(limit: int) -> int:
    """Jobs in flight at or below which a paused worker takes low messages again: a quarter of
    the limit below it (at least one job). The gap keeps one stored outcome from resuming a
    worker that the next message fills again, and a worker at the default limit (twice its
    engine's batch) still has a quarter of it queued inside its engine when it resumes, enough
    to keep the batch full until the next messages are started."""
    return limit - max(1, limit // 4)


class LowIntakeSwitch:
    """Whether a worker should take `low` messages, from its gate's count, with hysteresis:
    paused once `limit` jobs are in flight or a message waits for room (a low message taken now
    would wait too), resumed once no message waits and `resume_at(limit)` or fewer are in
    flight. Pure logic: the caller serialises update() (the gate's lock does)."""

    def __init__(self, limit: int) -> None:
        self.pause_at = limit
        self.resume_at = resume_at(limit)
        self.paused = False

    def update(self, in_flight: int, waiting: int) -> bool:
        """Take the gate's new state; returns whether `paused` changed."""
        if self.paused:
            resume = not waiting and in_flight <= self.resume_at
            if resume:
                self.paused = False
            return resume
        pause = waiting > 0 or in_flight >= self.pause_at
        if pause:
            self.paused = True
        return pause


class LowIntake:
    """Pauses and resumes one worker's consumption of the `low` queue as its gate fills and
    empties (see the module docstring).

    Args:
        gate: the worker's admission gate, watched from now on.
        worker_name: for the log lines.
        queue: the queue paused (`low`).
    """

    def __init__(self, gate: AdmissionGate, worker_name: str,
                 queue: str = keys.QUEUE_LOW) -> None:
        self.switch = LowIntakeSwitch(gate.limit)
        self._gate = gate
        self._worker_name = worker_name
        self._queue = queue
        self._consumer: Any = None
        # Set only once this worker cancelled its own consumer of the queue, and only then is
        # it added back: a worker started without the queue (-Q high) never takes it, nor one
        # whose consumer an operator cancelled while it had room.
        self._paused = False
        gate.watch(self._on_gate_change)

    @property
    def paused(self) -> bool:
        """Whether the worker has stopped taking messages from the queue because it is full."""
        return self._paused

    def attach(self, consumer: Any) -> None:
        """On the consumer's thread, once its task consumer exists (at start and after each
        reconnection, which builds a new one): follow the switch from now on."""
        self._consumer = consumer
        self.apply()

    def detach(self) -> None:
        """The consumer is stopping or restarting: change nothing on it until attached again."""
        self._consumer = None

    def apply(self) -> None:
        """On the consumer's thread: consume the queue or not, as the switch says now. Reads
        the switch when it runs, not when it was asked for, so calls that arrive late, twice
        or out of order still leave the consumer as the latest state wants it."""
        consumer = self._consumer
        if consumer is None or consumer.task_consumer is None:
            return
        consuming = consumer.task_consumer.consuming_from(self._queue)
        if self.switch.paused and consuming:
            log.info("worker %s: full (%d jobs in flight, limit %d, %d messages waiting): stops"
                     " taking %s messages until %d or fewer are in flight", self._worker_name,
                     self._gate.in_flight, self.switch.pause_at, self._gate.waiting,
                     self._queue, self.switch.resume_at)
            # Marked first: should the cancel fail half-way (the connection lost), the queue
            # is still added back on resuming, after the reconnection.
            self._paused = True
            consumer.cancel_task_queue(self._queue)
        elif not self.switch.paused and self._paused:
            log.info("worker %s: room again (%d jobs in flight): takes %s messages again",
                     self._worker_name, self._gate.in_flight, self._queue)
            if not consuming:
                consumer.add_task_queue(self._queue)
            self._paused = False

    def _on_gate_change(self, in_flight: int, waiting: int) -> None:
        # Under the gate's lock, in a task or finisher thread: decide here, in the order the
        # changes happened, and leave the consumer to its own thread.
        if not self.switch.update(in_flight, waiting):
            return
        consumer = self._consumer
        if consumer is None:
            return  # attach() applies the switch when the consumer (re)starts
        try:
            consumer.call_soon(self.apply)
        except Exception:  # noqa: BLE001 - the gate's count must not fail with it
            log.exception("worker %s: could not ask the consumer to %s the %s queue",
                          self._worker_name, "pause" if self.switch.paused else "resume",
                          self._queue)


class FollowLowIntake(bootsteps.StartStopStep):
    """A consumer step: hands the consumer to the worker's LowIntake once the task consumer
    exists (this step requires Tasks, and the event loop starts after it), again after every
    reconnection, and takes it back when the consumer stops, so that a stopping worker does
    not start taking `low` again."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, parent: Any) -> None:
        intake = _intake_of(parent)
        if intake is not None:
            intake.attach(parent)

    def stop(self, parent: Any) -> None:
        intake = _intake_of(parent)
        if intake is not None:
            intake.detach()

    def shutdown(self, parent: Any) -> None:
        self.stop(parent)


def _intake_of(consumer: Any) -> LowIntake | None:
    runtime = getattr(consumer.app, "tideq_runtime", None)
    return getattr(runtime, "low_intake", None)
