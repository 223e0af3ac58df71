"""The admission gate's logic, with plain threads: low messages wait in arrival order while the
worker is full, high ones never wait, a stored outcome lets the next one in, and shutdown lets
everyone through. No timing is asserted: each step waits for the state it needs."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from tasks.admission import AdmissionGate
from tasks.finishers import Finishers
from tests.conftest import eventually

PATIENCE_S = 10.0  # how long a step may take before the test gives up (not a measurement)


class Messages:
    """Task threads, each admitting one message of `jobs` jobs and recording when it passed."""

    def __init__(self, gate: AdmissionGate) -> None:
        self.gate = gate
        self.passed: list[str] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def arrive(self, name: str, jobs: int = 1) -> None:
        """Start a message and return once it waits at the gate (or has passed). Each message
        counts once in waiting + passed from then on (for a moment between leaving the line
        and being recorded, zero), so the sum grows only when this one has arrived."""
        before = self.gate.waiting + len(self.passed)

        def run() -> None:
            self.gate.admit(jobs)
            with self._lock:
                self.passed.append(name)

        thread = threading.Thread(target=run, name=f"message-{name}", daemon=True)
        self._threads.append(thread)
        thread.start()
        eventually(lambda: self.gate.waiting + len(self.passed) > before,
                   f"{name} to wait or pass")

    def wait_passed(self, count: int) -> list[str]:
        eventually(lambda: len(self.passed) >= count, f"{count} messages to pass")
        return list(self.passed)

    def join(self) -> None:
        for thread in self._threads:
            thread.join(PATIENCE_S)


def test_a_message_passes_at_once_below_the_limit_and_waits_at_it():
    gate = AdmissionGate(limit=2)
    messages = Messages(gate)
    messages.arrive("a")
    messages.arrive("b")
    assert messages.wait_passed(2) == ["a", "b"] and gate.in_flight == 2
    messages.arrive("c")
    assert gate.waiting == 1 and messages.passed == ["a", "b"]
    gate.release()
    assert messages.wait_passed(3) == ["a", "b", "c"]
    assert gate.in_flight == 2 and gate.waiting == 0
    messages.join()


def test_waiters_pass_in_arrival_order_one_outcome_at_a_time():
    gate = AdmissionGate(limit=1)
    gate.admit(1)
    messages = Messages(gate)
    for name in "abcd":
        messages.arrive(name)
    assert gate.waiting == 4
    for count in range(1, 5):
        gate.release()  # one job's outcome stored: room for exactly one message
        assert messages.wait_passed(count) == list("abcd"[:count])
        # The others stay: the one let in filled the room again.
        assert gate.waiting == 4 - count and gate.in_flight == 1
    messages.join()


def test_a_late_arrival_queues_behind_the_waiters_even_when_there_is_room():
    """FIFO: a message arriving while others wait does not overtake them, even if an outcome
    was stored in between."""
    gate = AdmissionGate(limit=1)
    gate.admit(1)
    messages = Messages(gate)
    messages.arrive("first")
    gate.release()
    messages.arrive("second")
    assert messages.wait_passed(1)[0] == "first"
    gate.release()
    assert messages.wait_passed(2) == ["first", "second"]
    messages.join()


def test_a_high_message_never_waits():
    gate = AdmissionGate(limit=2)
    gate.admit(2)
    messages = Messages(gate)
    messages.arrive("low")
    gate.admit(3, wait=False)  # in this thread: it would hang here if it waited
    assert gate.in_flight == 5 and gate.waiting == 1
    # The high jobs count: the low message waits until the count is below the limit again.
    gate.release(3)
    assert gate.waiting == 1
    gate.release(2)
    assert messages.wait_passed(1) == ["low"]
    messages.join()


def test_the_count_overshoots_by_at_most_the_message_let_in():
    """A stored outcome wakes only the first in line, which wakes the next once it has passed:
    with room for one job, one message of four jobs passes and the others keep waiting."""
    gate = AdmissionGate(limit=4)
    gate.admit(4)
    messages = Messages(gate)
    for name in "abc":
        messages.arrive(name, jobs=4)
    gate.release()
    assert messages.wait_passed(1) == ["a"]
    assert gate.in_flight == 7 and gate.waiting == 2
    gate.release(4)  # 3 in flight: room again, for one message
    assert messages.wait_passed(2) == ["a", "b"]
    assert gate.in_flight == 7 and gate.waiting == 1
    gate.close()
    messages.join()


def test_shutdown_lets_every_waiter_and_later_arrival_through():
    gate = AdmissionGate(limit=1)
    gate.admit(1)
    messages = Messages(gate)
    for name in "abc":
        messages.arrive(name)
    gate.close()
    assert sorted(messages.wait_passed(3)) == ["a", "b", "c"]
    gate.admit(2)  # closed: at once, in this thread
    assert gate.in_flight == 6 and gate.waiting == 0
    messages.join()


def test_wait_empty_returns_when_the_last_job_leaves():
    gate = AdmissionGate(limit=4)
    gate.admit(2)
    assert not gate.wait_empty(timeout=0)
    done = threading.Event()
    waiter = threading.Thread(target=lambda: done.set() if gate.wait_empty(PATIENCE_S) else None)
    waiter.start()
    gate.release()
    assert not done.is_set()  # one job is still in flight
    gate.release()
    waiter.join(PATIENCE_S)
    assert done.is_set() and gate.in_flight == 0


def test_the_worker_metrics_show_the_gate():
    """/metrics reads the gate at scrape time: jobs in flight, the limit, messages waiting."""
    from tasks.metrics import WorkerMetrics

    class IdleEngine:
        def stats(self) -> dict[str, int]:
            return {}

    gate = AdmissionGate(limit=2)
    metrics = WorkerMetrics(IdleEngine(), gate=gate)

    def sample(name: str) -> float | None:
        return metrics.registry.get_sample_value(name)

    assert (sample("tideq_jobs_in_flight"), sample("tideq_jobs_in_flight_limit"),
            sample("tideq_messages_waiting")) == (0, 2, 0)
    messages = Messages(gate)
    messages.arrive("a", jobs=2)
    messages.arrive("b")
    assert (sample("tideq_jobs_in_flight"), sample("tideq_messages_waiting")) == (2, 1)
    gate.release(2)
    messages.wait_passed(2)
    assert (sample("tideq_jobs_in_flight"), sample("tideq_messages_waiting")) == (1, 0)
    messages.join()


def test_a_limit_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        AdmissionGate(limit=0)


def test_finishers_run_work_and_refuse_it_once_stopped():
    finishers = Finishers(threads=2)
    ran: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> Callable[[], None]:
        def run() -> None:
            with lock:
                ran.append(i)
        return run

    for i in range(20):
        assert finishers.submit(work(i))
    assert finishers.submit(lambda: 1 / 0)  # logged; the finisher goes on
    assert finishers.wait_idle(PATIENCE_S)
    assert sorted(ran) == list(range(20))
    finishers.stop(PATIENCE_S)
    assert not finishers.submit(work(99))
    assert 99 not in ran


def test_urgent_finisher_work_runs_before_work_handed_over_earlier():
    """A high job's outcome is stored before the low ones already waiting for a finisher."""
    finishers = Finishers(threads=1)
    release = threading.Event()
    ran: list[str] = []
    assert finishers.submit(release.wait)  # holds the only finisher
    for i in range(5):
        assert finishers.submit(lambda i=i: ran.append(f"low{i}"))
    assert finishers.submit(lambda: ran.append("high0"), urgent=True)
    assert finishers.submit(lambda: ran.append("high1"), urgent=True)
    release.set()
    assert finishers.wait_idle(PATIENCE_S)
    assert ran == ["high0", "high1", "low0", "low1", "low2", "low3", "low4"]
    finishers.stop(PATIENCE_S)
