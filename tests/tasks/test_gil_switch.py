"""The worker process shortens CPython's GIL switch interval (tasks/worker.py says why), and
$TIDEQ_GIL_SWITCH_MS overrides it with a clear error for a value that is not one."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from tasks.config import ConfigError
from tasks.worker import GIL_SWITCH_ENV, GIL_SWITCH_INTERVAL_S, set_gil_switch_interval


@pytest.fixture(autouse=True)
def restore_interval() -> Iterator[None]:
    before = sys.getswitchinterval()
    yield
    sys.setswitchinterval(before)


def test_the_worker_default_is_shorter_than_cpythons() -> None:
    sys.setswitchinterval(0.005)
    assert set_gil_switch_interval({}) == GIL_SWITCH_INTERVAL_S
    assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_INTERVAL_S)
    assert GIL_SWITCH_INTERVAL_S < 0.005


def test_the_environment_sets_it_in_milliseconds() -> None:
    assert set_gil_switch_interval({GIL_SWITCH_ENV: "2.5"}) == pytest.approx(0.0025)
    assert sys.getswitchinterval() == pytest.approx(0.0025)
    # Empty means unset.
    assert set_gil_switch_interval({GIL_SWITCH_ENV: " "}) == GIL_SWITCH_INTERVAL_S


@pytest.mark.parametrize("raw", ["fast", "0", "-1", "nan", "inf", "5000"])
def test_a_bad_value_names_the_variable_and_changes_nothing(raw: str) -> None:
    sys.setswitchinterval(0.004)
    with pytest.raises(ConfigError, match=GIL_SWITCH_ENV):
        set_gil_switch_interval({GIL_SWITCH_ENV: raw})
    assert sys.getswitchinterval() == pytest.approx(0.004)
