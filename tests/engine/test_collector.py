"""engine/core/collector.py: a rank process's full garbage collections run after steps without
high work, at most every `every_steps`, and at the latest after `at_most_steps`."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from engine.core.collector import GC_ENV, FullCollections


class Cyclic:
    """Garbage only a collection frees: it refers to itself."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture(autouse=True)
def restore_thresholds() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


def cyclic_garbage() -> weakref.ref[Cyclic]:
    obj = Cyclic()
    ref = weakref.ref(obj)
    del obj
    return ref


def full_collections_during(run) -> int:  # type: ignore[no-untyped-def]
    seen: list[int] = []

    def note(phase: str, info: dict[str, int]) -> None:
        if phase == "stop" and info["generation"] == 2:
            seen.append(1)

    gc.callbacks.append(note)
    try:
        run()
    finally:
        gc.callbacks.remove(note)
    return len(seen)


def test_install_takes_the_oldest_generation_off_cpythons_schedule() -> None:
    gc.set_threshold(700, 10, 10)
    collector = FullCollections.install({})
    assert collector is not None
    young, middle, oldest = gc.get_threshold()
    assert (young, middle) == (700, 10) and oldest >= 1 << 30
    # Young collections still run on their own: a burst of allocations triggers no full one.
    assert full_collections_during(lambda: [[] for _ in range(200_000)]) == 0


def test_auto_leaves_cpythons_schedule_as_it_is() -> None:
    gc.set_threshold(700, 10, 10)
    assert FullCollections.install({GC_ENV: "auto"}) is None
    assert gc.get_threshold() == (700, 10, 10)


def test_a_full_collection_waits_for_its_steps_and_for_high_work_to_leave() -> None:
    collector = FullCollections(every_steps=3, at_most_steps=10)
    gc.disable()  # only the collector collects here, so the cycle shows when it ran
    try:
        ref = cyclic_garbage()
        assert not collector.after_step(high_work=False)
        assert not collector.after_step(high_work=False)
        # Due, but high work is in the batch: it waits.
        for _ in range(4):
            assert not collector.after_step(high_work=True)
        assert ref() is not None
        # High work gone: the next step collects, and the cycle is freed.
        assert collector.after_step(high_work=False)
        assert ref() is None
    finally:
        gc.enable()
    assert collector.collections == 1
    # The count starts again.
    assert not collector.after_step(high_work=False)


def test_a_core_that_never_leaves_the_lane_still_collects_at_most_steps_apart() -> None:
    collector = FullCollections(every_steps=3, at_most_steps=10)
    results = [collector.after_step(high_work=True) for _ in range(25)]
    assert [i for i, collected in enumerate(results) if collected] == [9, 19]


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="every_steps"):
        FullCollections(every_steps=0)
    with pytest.raises(ValueError, match="every_steps"):
        FullCollections(every_steps=10, at_most_steps=5)
