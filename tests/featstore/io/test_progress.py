"""Progress: tqdm only on a terminal; a log gets a few plain lines, never carriage-return frames."""
from __future__ import annotations

import io

import pytest

from featstore.io.progress import PlainProgress, SilentProgress, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_start_quarters_and_end_and_no_carriage_returns() -> None:
    log = io.StringIO()
    bar = progress_bar(total=100, desc="build", unit="seg", stream=log)
    assert isinstance(bar, PlainProgress)
    for _ in range(100):
        bar.update(1)
    bar.set_postfix(loss=0.5)
    bar.close()
    bar.close()  # closing twice prints once
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert [line.split(":")[1].split()[0] for line in lines] == ["0/100", "25/100", "50/100", "75/100", "100/100"]
    assert lines[-1].startswith("build: 100/100 done seg") and lines[-1].endswith("(loss=0.5)")
    assert "seg/s" in lines[1]


def test_end_only_for_repeated_loops_and_a_resumed_count() -> None:
    log = io.StringIO()
    bar = progress_bar(total=10, desc="epoch 2/5", unit="step", plain="end", initial=4, stream=log)
    bar.update(6)
    bar.close()
    assert log.getvalue().splitlines() == [log.getvalue().splitlines()[0]]
    assert log.getvalue().startswith("epoch 2/5: 10/10 done step")


def test_unknown_total_prints_start_and_end() -> None:
    log = io.StringIO()
    bar = progress_bar(total=None, desc="copy", unit="seg", stream=log)
    bar.update(3)
    bar.close()
    assert [line.split(": ")[1].split(" seg")[0] for line in log.getvalue().splitlines()] == ["started", "3 done"]


def test_a_terminal_gets_tqdm_and_disabled_or_none_gets_nothing() -> None:
    from tqdm import tqdm

    bar = progress_bar(total=3, desc="build", stream=Terminal())
    assert isinstance(bar, tqdm)
    bar.close()
    log = io.StringIO()
    assert isinstance(progress_bar(total=3, desc="x", enabled=False, stream=log), SilentProgress)
    assert isinstance(progress_bar(total=3, desc="x", plain="none", stream=log), SilentProgress)
    assert log.getvalue() == ""
    with pytest.raises(ValueError, match="quarters"):
        progress_bar(total=3, desc="x", plain="sometimes", stream=log)


def test_slow_loops_get_quarter_lines_only_when_the_last_line_is_old(monkeypatch: pytest.MonkeyPatch) -> None:
    from featstore.io import progress

    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    log = io.StringIO()
    bar = progress_bar(total=8, desc="epoch 1/2", unit="step", plain="slow", stream=log)
    bar.update(2)  # a quarter, 0 s in: too soon
    now[0] += progress.SLOW_SECONDS
    bar.update(2)  # half-way, 30 s after the start: a line
    bar.update(2)  # three quarters, 0 s after that line: too soon
    bar.update(2)
    bar.close()  # no end line: the epoch logs its own
    assert [line.split(": ")[1].split()[0] for line in log.getvalue().splitlines()] == ["4/8"]
