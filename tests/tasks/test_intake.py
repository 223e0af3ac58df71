"""A full worker stops taking `low` messages and takes them again once a quarter of its limit is
free, and stops taking `high` ones at twice the limit: the hysteresis alone, then driven by a
real admission gate against a stand-in for Celery's consumer that records what it is asked to
do and runs it only when the test says (the consumer's own thread, in a worker)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tasks.admission import AdmissionGate
from tasks.intake import IntakeSwitch, QueueIntake, high_pause_at, queue_intakes, resume_at


@pytest.mark.parametrize(("limit", "expected"), [(1, 0), (2, 1), (4, 3), (8, 6), (512, 384)])
def test_a_paused_worker_resumes_a_quarter_below_its_limit(limit, expected):
    assert resume_at(limit) == expected


def test_the_switch_pauses_at_the_limit_and_resumes_only_below_the_gap():
    switch = IntakeSwitch.for_queue("low", limit=8)
    assert (switch.pause_at, switch.resume_at) == (8, 6)
    # (jobs in flight, messages waiting) -> paused afterwards, and whether it changed.
    steps = [
        ((7, 0), False, False),
        ((8, 0), True, True),    # full
        ((9, 0), True, False),
        ((7, 0), True, False),   # one outcome stored: not yet
        ((6, 0), False, True),   # a quarter free: resume
        ((7, 0), False, False),  # filling again, still below the limit
        ((8, 0), True, True),
    ]
    for (in_flight, waiting), paused, changed in steps:
        assert switch.update(in_flight, waiting) is changed, (in_flight, waiting)
        assert switch.paused is paused, (in_flight, waiting)


def test_a_waiting_message_pauses_and_holds_the_pause_whatever_the_count():
    switch = IntakeSwitch.for_queue("low", limit=8)
    assert switch.update(3, 1) and switch.paused  # a message waits: a low one taken would too
    assert not switch.update(0, 1) and switch.paused
    assert switch.update(0, 0) and not switch.paused


def test_a_limit_of_one_resumes_only_when_the_worker_is_empty():
    switch = IntakeSwitch.for_queue("low", limit=1)
    assert switch.update(1, 0) and switch.paused
    assert not switch.update(1, 0) and switch.paused
    assert switch.update(0, 0) and not switch.paused


class TaskConsumer:
    def __init__(self, queues: set[str]) -> None:
        self.queues = queues

    def consuming_from(self, queue: str) -> bool:
        return queue in self.queues


class Consumer:
    """Stands in for celery.worker.consumer.Consumer: call_soon only queues the callback, as
    the event loop's thread would run it later; run_loop() runs what is queued."""

    def __init__(self, queues: str = "high,low") -> None:
        self.task_consumer: TaskConsumer | None = TaskConsumer(set(queues.split(",")))
        self.soon: list[Callable[[], Any]] = []
        self.calls: list[str] = []

    def call_soon(self, callback: Callable[[], Any]) -> None:
        self.soon.append(callback)

    def run_loop(self) -> None:
        soon, self.soon = self.soon, []
        for callback in soon:
            callback()

    def cancel_task_queue(self, queue: str) -> None:
        assert self.task_consumer is not None
        self.calls.append(f"cancel {queue}")
        self.task_consumer.queues.discard(queue)

    def add_task_queue(self, queue: str) -> None:
        assert self.task_consumer is not None
        self.calls.append(f"add {queue}")
        self.task_consumer.queues.add(queue)

    def consuming(self) -> set[str]:
        assert self.task_consumer is not None
        return self.task_consumer.queues


def attached(limit: int, queues: str = "high,low") -> tuple[AdmissionGate, QueueIntake, Consumer]:
    gate = AdmissionGate(limit)
    intake = QueueIntake(gate, "w@test", "low")
    consumer = Consumer(queues)
    intake.attach(consumer)
    return gate, intake, consumer


def test_the_consumer_is_changed_on_its_own_thread_and_only_low():
    gate, intake, consumer = attached(limit=4)
    gate.admit(3)
    assert consumer.soon == []
    gate.admit(1)  # full
    # Decided at once, in the thread that filled the gate; the consumer is left untouched
    # until its own loop runs the change.
    assert intake.switch.paused and consumer.soon and consumer.calls == []
    assert not intake.paused
    consumer.run_loop()
    assert consumer.calls == ["cancel low"] and consumer.consuming() == {"high"}
    assert intake.paused
    gate.admit(2, wait=False)  # a high message still goes in; nothing more to change
    gate.release(2)  # back at the limit: still full
    assert consumer.soon == [] and intake.paused
    gate.release(1)  # a quarter free
    consumer.run_loop()
    assert consumer.calls == ["cancel low", "add low"]
    assert consumer.consuming() == {"high", "low"} and not intake.paused


def test_changes_that_cross_before_the_loop_runs_leave_the_consumer_as_the_last_wants():
    gate, intake, consumer = attached(limit=4)
    gate.admit(4)
    gate.release(1)  # a quarter free again before the loop ran the pause
    assert len(consumer.soon) == 2
    consumer.run_loop()
    assert consumer.calls == [] and consumer.consuming() == {"high", "low"}
    gate.admit(1)
    gate.release(1)
    gate.admit(1)
    consumer.run_loop()
    assert consumer.calls == ["cancel low"] and intake.paused


def test_a_worker_started_without_low_never_takes_it():
    gate, intake, consumer = attached(limit=2, queues="high")
    gate.admit(2, wait=False)
    gate.release(2)
    consumer.run_loop()
    assert consumer.calls == [] and consumer.consuming() == {"high"} and not intake.paused


def test_a_detached_consumer_is_left_alone_and_attaching_catches_up():
    """A stopping consumer is not touched (a stopping worker must not take low again); one
    rebuilt after a reconnection gets the state of the moment when it is attached."""
    gate, intake, consumer = attached(limit=2)
    gate.admit(2)
    consumer.run_loop()
    assert intake.paused
    intake.detach()
    gate.release(2)
    assert consumer.soon == []
    assert intake.paused and consumer.consuming() == {"high"}
    # Reconnected: Celery builds a new task consumer from its selected queues, which the
    # pause left without low.
    consumer.task_consumer = TaskConsumer({"high"})
    intake.attach(consumer)
    assert consumer.calls == ["cancel low", "add low"] and not intake.paused


def test_the_worker_metrics_show_the_pause():
    from tasks.metrics import WorkerMetrics

    class IdleEngine:
        def stats(self) -> dict[str, int]:
            return {}

    gate, intake, consumer = attached(limit=2)
    metrics = WorkerMetrics(IdleEngine(), gate=gate, intakes=[intake])

    def paused() -> float | None:
        return metrics.registry.get_sample_value("tideq_low_consumption_paused")

    assert paused() == 0
    gate.admit(2)
    consumer.run_loop()
    assert paused() == 1
    gate.release(1)
    consumer.run_loop()
    assert paused() == 0


@pytest.mark.parametrize(("limit", "pause", "resume"),
                         [(1, 2, 1), (2, 4, 3), (4, 8, 6), (512, 1024, 768)])
def test_high_pauses_at_twice_the_limit_and_resumes_a_quarter_below(limit, pause, resume):
    assert high_pause_at(limit) == pause
    switch = IntakeSwitch.for_queue("high", limit)
    assert (switch.pause_at, switch.resume_at) == (pause, resume)


def test_the_high_switch_minds_only_the_count_not_the_line_at_the_gate():
    switch = IntakeSwitch.for_queue("high", limit=4)  # pauses at 8, resumes at 6
    steps = [
        ((4, 3), False, False),  # full for low, messages waiting: high still taken
        ((7, 5), False, False),
        ((8, 0), True, True),    # twice the limit
        ((7, 0), True, False),
        ((6, 9), False, True),   # a quarter free: resumes whoever waits at the gate
        ((8, 2), True, True),
    ]
    for (in_flight, waiting), paused, changed in steps:
        assert switch.update(in_flight, waiting) is changed, (in_flight, waiting)
        assert switch.paused is paused, (in_flight, waiting)


def both_attached(limit: int, queues: str = "high,low"
                  ) -> tuple[AdmissionGate, dict[str, QueueIntake], Consumer]:
    gate = AdmissionGate(limit)
    intakes = {intake.queue: intake for intake in queue_intakes(gate, "w@test")}
    consumer = Consumer(queues)
    for intake in intakes.values():
        intake.attach(consumer)
    return gate, intakes, consumer


def test_one_gate_pauses_low_at_its_limit_and_high_at_twice_it_and_resumes_each():
    gate, intakes, consumer = both_attached(limit=4)
    gate.admit(4)  # full: low pauses, high still taken
    consumer.run_loop()
    assert consumer.calls == ["cancel low"] and consumer.consuming() == {"high"}
    assert intakes["low"].paused and not intakes["high"].paused
    gate.admit(3, wait=False)
    consumer.run_loop()
    assert consumer.calls == ["cancel low"] and not intakes["high"].paused
    gate.admit(1, wait=False)  # 8 in flight: twice the limit
    assert consumer.calls == ["cancel low"]  # only on the consumer's thread
    consumer.run_loop()
    assert consumer.calls == ["cancel low", "cancel high"] and consumer.consuming() == set()
    assert intakes["high"].paused and intakes["low"].paused
    gate.release(1)  # 7: not yet
    assert consumer.soon == []
    gate.release(1)  # 6: high resumes; low (paused at 4) stays paused
    consumer.run_loop()
    assert consumer.calls == ["cancel low", "cancel high", "add high"]
    assert consumer.consuming() == {"high"} and not intakes["high"].paused
    assert intakes["low"].paused
    gate.release(3)  # 3: a quarter of the limit free, low resumes
    consumer.run_loop()
    assert consumer.calls == ["cancel low", "cancel high", "add high", "add low"]
    assert consumer.consuming() == {"high", "low"}
    assert not intakes["low"].paused and not intakes["high"].paused


@pytest.mark.parametrize("queues", ["high", "low"])
def test_a_worker_started_with_one_queue_never_takes_the_other(queues):
    gate, intakes, consumer = both_attached(limit=2, queues=queues)
    gate.admit(4, wait=False)  # both paused
    consumer.run_loop()
    assert consumer.calls == [f"cancel {queues}"] and consumer.consuming() == set()
    gate.release(4)
    consumer.run_loop()
    assert consumer.calls == [f"cancel {queues}", f"add {queues}"]
    assert consumer.consuming() == {queues}
    assert not any(intake.paused for intake in intakes.values())


def test_the_worker_metrics_show_each_queue_paused():
    from tasks.metrics import WorkerMetrics

    class IdleEngine:
        def stats(self) -> dict[str, int]:
            return {}

    gate, intakes, consumer = both_attached(limit=2)
    metrics = WorkerMetrics(IdleEngine(), gate=gate, intakes=intakes.values())

    def paused() -> tuple[float | None, float | None]:
        return tuple(metrics.registry.get_sample_value(f"tideq_{queue}_consumption_paused")
                     for queue in ("low", "high"))

    assert paused() == (0, 0)
    gate.admit(2)
    consumer.run_loop()
    assert paused() == (1, 0)
    gate.admit(2, wait=False)
    consumer.run_loop()
    assert paused() == (1, 1)
    gate.release(1)
    consumer.run_loop()
    assert paused() == (1, 0)
    gate.release(2)
    consumer.run_loop()
    assert paused() == (0, 0)
