"""Progress on long work: a redrawn bar on a terminal, a few plain lines in a log.

A tqdm bar redraws itself with carriage returns many times a second. That is what a person at a
terminal wants, but a log file or a pipe keeps every frame (a demo piped to a file held thousands of
them). :func:`progress_bar` therefore gives tqdm only when the stream is a terminal, and otherwise a
:class:`PlainProgress` that prints one line when the work starts, one at each quarter and one at
the end, each with the count, the rate and the time so far.

Every long loop of the project (builds, copies, derives, imports, training epochs, validation)
takes its bar from here, so the choice is made once.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Protocol, TextIO

PLAIN_MARKS = (0.25, 0.5, 0.75)  # shares of the total at which a plain log gets a line
PLAIN_LINES = ("quarters", "end", "slow", "none")  # what progress_bar(plain=...) gives a log
SLOW_SECONDS = 30.0  # plain="slow": a quarter gets a line only this long after the last line


class ProgressDisplay(Protocol):
    """What the callers use of a bar (tqdm's names, so a tqdm bar is one)."""

    def update(self, n: int = 1) -> Any: ...

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> Any: ...

    def close(self) -> Any: ...


class SilentProgress:
    """A bar that shows nothing (``enabled=False``)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


class PlainProgress:
    """Plain lines for a log: at the start, at each of ``marks`` (shares of ``total``) and at the end.

    ``marks=None`` gives the end line only. Without a total (unknown length) it prints the start
    and the end. The last postfix (``set_postfix``, e.g. the running loss) ends each line.
    ``quiet_seconds`` (plain="slow"): no start or end line, and a mark's line only when that many
    seconds passed since the last line.
    """

    def __init__(self, *, total: int | None, desc: str, unit: str, stream: TextIO, initial: int = 0,
                 marks: tuple[float, ...] | None = PLAIN_MARKS, quiet_seconds: float | None = None):
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.count = self.started_at = initial
        self.start = time.monotonic()
        self.postfix = ""
        self.marks = [m for m in marks or () if total and initial < m * total]
        self.quiet_seconds = quiet_seconds
        self.last_line = self.start
        self.closed = False
        if marks is not None and quiet_seconds is None:
            self.print(f"{initial}/{total}" if total else "started")

    def print(self, state: str) -> None:
        rate = ""
        elapsed = time.monotonic() - self.start
        done = self.count - self.started_at
        if done and elapsed > 0:
            rate = f", {done / elapsed:.1f} {self.unit}/s"
        postfix = f" ({self.postfix})" if self.postfix else ""
        print(f"{self.desc}: {state} {self.unit}{rate}, {elapsed:.0f} s{postfix}", file=self.stream, flush=True)
        self.last_line = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.count += n
        passed = [m for m in self.marks if self.count >= m * self.total]  # type: ignore[operator]
        if passed:
            self.marks = self.marks[len(passed):]
            if self.quiet_seconds is None or time.monotonic() - self.last_line >= self.quiet_seconds:
                self.print(f"{self.count}/{self.total}")

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        values = {**(dict(ordered_dict) if ordered_dict else {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.quiet_seconds is None:  # a slow loop's end is a line of its own (the epoch's)
            self.print(f"{self.count}/{self.total} done" if self.total else f"{self.count} done")


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal (a closed or unusual stream counts as not one)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(*, total: int | None, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0,
                 leave: bool = True, plain: str = "quarters", position: int | None = None,
                 stream: TextIO | None = None) -> ProgressDisplay:
    """The bar for a loop of ``total`` items: tqdm on a terminal, plain lines otherwise.

    Args:
        total: items the loop will count (None when unknown).
        desc: what the work is (``build``, ``epoch 2/5``).
        unit: what one item is (``seg``, ``clip``, ``step``).
        enabled: False gives a bar that shows nothing.
        initial: items already done (a resumed run).
        leave: keep tqdm's finished bar on the terminal (plain lines always stay).
        plain: the lines a log (``stream`` not a terminal) gets: ``quarters`` (start, each
            quarter, end), ``end`` (one line when done: for loops repeated many times, such as
            training epochs), ``slow`` (a quarter's line only for a loop slow enough that the last
            line is ``SLOW_SECONDS`` old, no start or end line: a training epoch, which logs its
            own line when done) or ``none``.
        position: tqdm's line for this bar (one per rank of a multi-process build).
        stream: where to write; stderr by default.
    """
    stream = sys.stderr if stream is None else stream
    if not enabled:
        return SilentProgress()
    if is_terminal(stream):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave, position=position,
                    dynamic_ncols=True, file=stream)
    if plain not in PLAIN_LINES:
        raise ValueError(f"plain={plain!r}: expected one of {', '.join(PLAIN_LINES)}")
    if plain == "none":
        return SilentProgress()
    return PlainProgress(total=total, desc=desc, unit=unit, stream=stream, initial=initial,
                         marks=None if plain == "end" else PLAIN_MARKS,
                         quiet_seconds=SLOW_SECONDS if plain == "slow" else None)
