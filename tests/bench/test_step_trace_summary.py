"""bench/step_trace_summary.py splits each high job's time at the engine's edges."""

from __future__ import annotations

from bench.step_trace_summary import high_jobs_in_engine


def step(t: float, high: int) -> dict[str, float]:
    return {"t": t, "ms": 1.0, "high": high, "decode": 1, "prefill": 0}


def test_each_high_job_is_split_into_before_inside_and_after_the_engine() -> None:
    # Two high jobs submitted 0.2 s apart from t=100: the first enters the engine at 100.010
    # and leaves at 100.110; the second enters at 100.250 and leaves at 100.350.
    steps = [step(100.000, 0), step(100.010, 1), step(100.110, 0), step(100.250, 1),
             step(100.300, 1), step(100.350, 0)]
    flood = {"window": [100.0, 101.0], "latencies": [0.2, 0.160],
             "queue_waits": [0.004, 0.030]}
    first, second = high_jobs_in_engine(flood, 0.2, steps)
    assert round(first["to_engine_ms"]) == 6  # started at 100.004, first step at 100.010
    assert round(first["in_engine_ms"]) == 100
    assert round(first["after_ms"]) == 90  # stored at 100.200, 90 ms after its last step
    assert round(second["to_engine_ms"]) == 20  # started at 100.230
    assert round(second["in_engine_ms"]) == 100 and round(second["after_ms"]) == 10


def test_records_without_queue_waits_give_nothing() -> None:
    assert high_jobs_in_engine({"window": [0.0, 1.0], "latencies": [0.1]}, 0.2,
                               [step(0.0, 1), step(0.1, 0)]) == []
