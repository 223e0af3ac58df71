"""A full worker stops taking `low` messages, and takes them again once it has room; a worker
far beyond full stops taking `high` messages too.

A `low` message taken while the worker's admission gate is full waits there in a task thread
(tasks/admission.py). Under a low flood every thread ends up holding one between bursts of
stored outcomes: a `high` message that arrives then waits in Redis for a thread, and the low
messages held unstarted are ones an idle worker could have run. So while the gate is full the
worker cancels its consumer of the `low` queue (Celery's own cancel_task_queue, as the
`cancel_consumer` remote command does) and adds it back (add_task_queue) once a quarter of the
limit is free again. Messages taken before the pause keep waiting at the gate and run as
before.

A `high` message never waits at the gate, and it is acknowledged once its jobs start, so a
worker whose threads kept taking `high` would pile them into its engine's waiting queue however
many it already holds, while other workers could run them (and a worker killed then leaves them
all to their leases). So `high` is paused the same way, at a higher bound (high_pause_at):
messages waiting at the gate do not matter for it, only the count.

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
    """Jobs in flight at or below which a paused worker takes the queue's messages again: a
    quarter of the pause bound below it (at least one job). The gap keeps one stored outcome
    from resuming a worker that the next message fills again, and a worker at the default limit
    (twice its engine's batch) still has a quarter of it queued inside its engine when it
    resumes `low`, enough to keep the batch full until the next messages are started."""
    return limit - max(1, limit // 4)


def high_pause_at(limit: int) -> int:
    """Jobs in flight at or above which a worker stops taking `high` messages: twice the gate's
    limit (four times the engine's batch at the default limit). `high` must still reach a busy
    worker's engine ahead of the low work it holds, which the engine runs after it, so it is
    paused only far beyond where `low` is: enough to stop one worker hoarding a high flood,
    never in the way of high work on a worker merely full of low. Derived from
    max_jobs_in_flight rather than a setting of its own."""
    return 2 * limit


class IntakeSwitch:
    """Whether a worker should take one queue's messages, from its gate's count, with
    hysteresis: paused once `pause_at` jobs are in flight (or, if `mind_waiting`, a message
    waits for room), resumed once `resume_at(pause_at)` or fewer are in flight (and, if
    `mind_waiting`, no message waits). Pure logic: the caller serialises update() (the gate's
    lock does)."""

    def __init__(self, pause_at: int, mind_waiting: bool) -> None:
        self.pause_at = pause_at
        self.resume_at = resume_at(pause_at)
        self.mind_waiting = mind_waiting
        self.paused = False

    @classmethod
    def for_queue(cls, queue: str, limit: int) -> IntakeSwitch:
        """`low`: paused at the gate's limit, or while a message waits at the gate (a low
        message taken now would wait too). `high`: paused at high_pause_at(limit); the line at
        the gate is none of its business, since a high message passes it at once."""
        if queue == keys.QUEUE_HIGH:
            return cls(high_pause_at(limit), mind_waiting=False)
        return cls(limit, mind_waiting=True)

    def update(self, in_flight: int, waiting: int) -> bool:
        """Take the gate's new state; returns whether `paused` changed."""
        waiting = waiting if self.mind_waiting else 0
        if self.paused:
            resume = not waiting and in_flight <= self.resume_at
            if resume:
                self.paused = False
            return resume
        pause = waiting > 0 or in_flight >= self.pause_at
        if pause:
            self.paused = True
        return pause


class QueueIntake:
    """Pauses and resumes one worker's consumption of one queue as its gate fills and empties
    (see the module docstring).

    Args:
        gate: the worker's admission gate, watched from now on.
        worker_name: for the log lines.
        queue: the queue paused (`low` or `high`); its thresholds: IntakeSwitch.for_queue.
    """

    def __init__(self, gate: AdmissionGate, worker_name: str, queue: str) -> None:
        self.switch = IntakeSwitch.for_queue(queue, gate.limit)
        self._gate = gate
        self._worker_name = worker_name
        self.queue = queue
        self._consumer: Any = None
        # Set only once this worker cancelled its own consumer of the queue, and only then is
        # it added back: a worker started without the queue (-Q high, -Q low) never takes it,
        # nor one whose consumer an operator cancelled while it had room.
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
        consuming = consumer.task_consumer.consuming_from(self.queue)
        if self.switch.paused and consuming:
            log.info("worker %s: full (%d jobs in flight, %s pauses at %d, %d messages"
                     " waiting): stops taking %s messages until %d or fewer are in flight",
                     self._worker_name, self._gate.in_flight, self.queue, self.switch.pause_at,
                     self._gate.waiting, self.queue, self.switch.resume_at)
            # Marked first: should the cancel fail half-way (the connection lost), the queue
            # is still added back on resuming, after the reconnection.
            self._paused = True
            consumer.cancel_task_queue(self.queue)
        elif not self.switch.paused and self._paused:
            log.info("worker %s: room again (%d jobs in flight): takes %s messages again",
                     self._worker_name, self._gate.in_flight, self.queue)
            if not consuming:
                consumer.add_task_queue(self.queue)
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
                          self.queue)


def queue_intakes(gate: AdmissionGate, worker_name: str) -> tuple[QueueIntake, ...]:
    """A worker's intakes: one per queue, both watching its gate."""
    return (QueueIntake(gate, worker_name, keys.QUEUE_HIGH),
            QueueIntake(gate, worker_name, keys.QUEUE_LOW))


class FollowIntakes(bootsteps.StartStopStep):
    """A consumer step: hands the consumer to the worker's intakes once the task consumer
    exists (this step requires Tasks, and the event loop starts after it), again after every
    reconnection, and takes it back when the consumer stops, so that a stopping worker does
    not start taking a paused queue again."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, parent: Any) -> None:
        for intake in _intakes_of(parent):
            intake.attach(parent)

    def stop(self, parent: Any) -> None:
        for intake in _intakes_of(parent):
            intake.detach()

    def shutdown(self, parent: Any) -> None:
        self.stop(parent)


def _intakes_of(consumer: Any) -> tuple[QueueIntake, ...]:
    runtime = getattr(consumer.app, "tideq_runtime", None)
    return tuple(getattr(runtime, "intakes", ()))
