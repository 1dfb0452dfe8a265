"""A phase's progress: a rich bar on a terminal, plain lines in a log (nohup, SLURM, CI).

A bar redraws itself in place, which a log file cannot show: under nohup a run's log said nothing
between "scoring 4 hand recipe(s)" and the end, while 164 of 240 candidates were done. Without a
terminal the phase therefore writes one plain line at a steady interval (``EVOMERGE_PROGRESS_EVERY``
seconds, default 60) with the same facts: candidates done / total, generation, best so far, rate
and time left.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Protocol

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class PhaseProgress(Protocol):
    def update(self, done: int, generation: int, best: str) -> None: ...


def every_seconds() -> float:
    """The interval between plain progress lines (``EVOMERGE_PROGRESS_EVERY``, default 60 s)."""
    text = os.environ.get("EVOMERGE_PROGRESS_EVERY", "60")
    try:
        return max(float(text), 0.0)
    except ValueError:
        raise ValueError(f"EVOMERGE_PROGRESS_EVERY={text!r}: give seconds between progress lines, e.g. 60") from None


def duration(s: Optional[float]) -> str:
    """Seconds as a person reads them in a progress line or a status: 4m05s, 2h07m, 1d 3h20m."""
    if s is None:
        return "unknown"
    s = int(round(s))
    d, rest = divmod(s, 86400)
    h, rest = divmod(rest, 3600)
    m, sec = divmod(rest, 60)
    return (f"{d}d " if d else "") + (f"{h}h{m:02d}m" if d or h else f"{m}m{sec:02d}s")


class PlainLines:
    """Progress as plain lines: the first update, then at most one line per ``every`` seconds, and the
    last (``close``). The rate counts this process's candidates only, so a resumed run's time left
    follows its current speed."""

    def __init__(self, say: Callable[[str], None], label: str, total: int, done: int, every: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.say, self.label, self.total, self.every, self.clock = say, label, total, every, clock
        self.start_done, self.start = done, clock()
        self.last_line: float | None = None
        self.state = (done, 0, "-")

    def update(self, done: int, generation: int, best: str) -> None:
        self.state = (done, generation, best)
        now = self.clock()
        if self.last_line is None or now - self.last_line >= self.every:
            self.last_line = now
            self.say(self.line(now))

    def line(self, now: float) -> str:
        done, generation, best = self.state
        text = f"{self.label}: {done}/{self.total} candidates, generation {generation}, best {best}"
        elapsed, new = now - self.start, done - self.start_done
        if elapsed > 0 and new > 0:
            rate = new / elapsed
            text += f", {60 * rate:.1f} candidates/min, ~{duration(max(self.total - done, 0) / rate)} left"
        return text

    def close(self) -> None:
        if self.last_line is None or self.state[0] != self.start_done:
            self.say(self.line(self.clock()))


class _Bar:
    def __init__(self, progress: Progress, task: object) -> None:
        self.progress, self.task = progress, task

    def update(self, done: int, generation: int, best: str) -> None:
        self.progress.update(self.task, completed=done, gen=generation, best=best)  # type: ignore[arg-type]


@contextmanager
def phase_progress(console: Console, label: str, total: int, done: int, generation: int,
                   best: str) -> Iterator[PhaseProgress]:
    """The progress display of one phase: a bar when ``console`` is a terminal, plain lines otherwise."""
    if not console.is_terminal:
        lines = PlainLines(lambda text: console.print(text, soft_wrap=True), label, total, done, every_seconds())
        lines.update(done, generation, best)
        yield lines
        lines.close()
        return
    columns = [TextColumn(label), BarColumn(), TextColumn("{task.completed}/{task.total} evals"),
               TextColumn("gen {task.fields[gen]}"), TextColumn("best {task.fields[best]}"), TimeElapsedColumn(),
               TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        yield _Bar(progress, progress.add_task("search", total=total, completed=done, gen=generation, best=best))
