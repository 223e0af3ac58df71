"""`producer bench` against a real (echo) worker, and the CLI's polish: --version,
status --json, 80-column rendering, the resubmission message."""

from __future__ import annotations

import importlib.metadata
import io
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console

from producer import Producer
from producer.bench import percentile, report_table
from producer.cli import main, progress_fields, status_table, wait_progress

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_bench_reports_per_priority(echo_worker: subprocess.Popen[bytes], cli_env: str,
                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    assert main(["bench", "--jobs", "20", "--high-fraction", "0.25", "--prompt-words", "5",
                 "--max-tokens", "8", "--timeout", "30", "--json", str(out_json),
                 "--plot", str(out_png)]) == 0
    report = json.loads(out_json.read_text())
    rows = report["by_priority"]
    assert rows["high"]["count"] == 5 and rows["low"]["count"] == 15
    assert rows["high"]["count"] + rows["low"]["count"] == rows["all"]["count"] == 20
    assert rows["all"]["done"] == 20 and report["all_done"]
    for name in ("high", "low", "all"):
        for metric in ("latency_s", "ttft_s"):
            p = rows[name][metric]
            assert 0 <= p["p50"] <= p["p95"] <= p["p99"]
        assert rows[name]["jobs_per_s"] > 0 and rows[name]["tokens_per_s"] > 0
    assert len(report["submissions"]) == 2  # all at once: one submit per priority
    assert out_png.read_bytes().startswith(PNG_SIGNATURE)
    out = capsys.readouterr().out
    assert report["batch_id"] in out and "p99" in out
    narrow = Console(width=80, file=io.StringIO(), color_system=None)
    narrow.print(report_table(report))
    table = narrow.file.getvalue()  # type: ignore[attr-defined]
    assert "…" not in table and "tok/s" in table, table


def test_bench_at_a_rate_submits_in_chunks(echo_worker: subprocess.Popen[bytes], cli_env: str,
                                           tmp_path: Path) -> None:
    out_json = tmp_path / "r.json"
    # 12 jobs at 40/s: chunks of 4, 0.1 s apart; all low priority.
    assert main(["bench", "--jobs", "12", "--rate", "40", "--high-fraction", "0",
                 "--timeout", "30", "--json", str(out_json),
                 "--plot", str(tmp_path / "r.png")]) == 0
    report = json.loads(out_json.read_text())
    subs = report["submissions"]
    assert [s["jobs"] for s in subs] == [4, 4, 4] and [s["new"] for s in subs] == [4, 4, 4]
    assert subs[2]["at"] >= 0.15  # paced, not all at once
    assert report["by_priority"]["all"]["done"] == 12


def test_bench_rejects_bad_options(cli_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--jobs", "0"]) == 2
    assert main(["bench", "--jobs", "3", "--high-fraction", "2"]) == 2
    assert "--high-fraction" in capsys.readouterr().err


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 95) == pytest.approx(9.5)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == (
        f"producer {importlib.metadata.version('tideq')}")


def test_status_json(cli_env: str, write_jsonl: Callable[..., Path],
                     capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl([{"prompt": f"p{i}"} for i in range(3)])
    assert main(["submit", str(path), "--batch-id", "sj", "--priority", "high"]) == 0
    capsys.readouterr()
    assert main(["status", "sj", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["batch_id"] == "sj" and data["total"] == 3 and not data["finished"]
    assert data["by_state"]["queued"] == 3
    assert data["by_priority"]["high"]["queued"] == 3


def test_batch_id_stays_on_one_line_at_80_columns(producer: Producer,
                                                  write_jsonl: Callable[..., Path]) -> None:
    batch_id = "b-0123456789ab"
    producer.submit(write_jsonl([{"prompt": "x"}] * 1), batch_id=batch_id)
    status = producer.status(batch_id)

    console = Console(width=80, file=io.StringIO(), force_terminal=False, color_system=None)
    console.print(status_table(status))
    progress, task = wait_progress(console, batch_id)
    progress.update(task, total=12345, completed=12000, rate="123456.7 tok/s",
                    **progress_fields(status))
    console.print(progress.get_renderable())
    text = console.file.getvalue()  # type: ignore[attr-defined]
    lines = text.splitlines()
    assert sum(batch_id in line for line in lines) == 2, text
    assert all(len(line) <= 80 for line in lines), text
    bar = next(line for line in lines if batch_id in line and "tok/s" in line)
    assert "12000/12345" in bar and "123456.7 tok/s" in bar and "0 done" in bar, text


def test_resubmit_with_another_priority_says_old_jobs_keep_theirs(
        cli_env: str, write_jsonl: Callable[..., Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl([{"prompt": f"p{i}"} for i in range(3)])
    assert main(["submit", str(path), "--batch-id", "rs"]) == 0
    assert "3 new, priority low" in capsys.readouterr().err
    assert main(["submit", str(path), "--batch-id", "rs", "--priority", "high"]) == 0
    err = capsys.readouterr().err
    assert "0 new, 3 already in the batch" in err
    assert "priority high" not in err.replace("--priority high", "")
    assert "--priority high applies only to new jobs" in err
    assert "keep their priority (batch: 3 low)" in err
    assert main(["status", "rs", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["by_priority"]["low"]["queued"] == 3


def test_wait_on_a_finished_batch_shows_no_zero_rate(
        echo_worker: subprocess.Popen[bytes], cli_env: str, write_jsonl: Callable[..., Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl([{"prompt": f"p{i}"} for i in range(3)])
    assert main(["submit", str(path), "--batch-id", "fw", "--wait", "--timeout", "30"]) == 0
    capsys.readouterr()
    assert main(["wait", "fw"]) == 0
    err = capsys.readouterr().err
    assert "0.0 tok/s" not in err
    assert "3 done" in err
