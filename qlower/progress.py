"""Progress of long conversions and verifications, shown on stderr.

The pipeline and the verifier report stages ("lowering 25,000 quantizers", "verifying
16 batches") to a :class:`Progress`; the default one shows nothing. The CLI passes a
:class:`TerminalProgress`, which draws a rich progress bar on stderr only once a run has
taken more than ``delay`` seconds (short runs print nothing extra), and only when stderr is
a terminal and ``-q`` was not given, so logs and pipes never see it.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rich.progress costs ~20-60 ms to import: only a bar actually drawn pays it
    from rich.console import Console
    from rich.progress import Progress as RichProgress, TaskID

SHOW_AFTER_SECONDS = 1.0


class Progress:
    """Where stages are reported; this base shows nothing. A context manager, so a display
    is always taken down when the run ends, however it ends."""

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        """Nothing drawn, nothing to take down."""

    def stage(self, description: str, total: int | None = None) -> None:
        """A new stage begins; ``total`` steps when it is counted."""

    def advance(self, steps: int = 1) -> None:
        """``steps`` more steps of the current stage are done."""


class TerminalProgress(Progress):
    """A rich progress bar on ``console`` (stderr), drawn once the run outlasts ``delay``."""

    def __init__(self, console: Console, delay: float = SHOW_AFTER_SECONDS) -> None:
        self._console = console
        self._delay = delay
        self._started = time.monotonic()
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None
        self._description = ""
        self._total: int | None = None
        self._completed = 0

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()

    def stage(self, description: str, total: int | None = None) -> None:
        self._description, self._total, self._completed = description, total, 0
        self._refresh()

    def advance(self, steps: int = 1) -> None:
        self._completed += steps
        self._refresh()

    def _refresh(self) -> None:
        if self._bar is None:
            if time.monotonic() - self._started < self._delay:
                return
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

            self._bar = RichProgress(
                TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), console=self._console, transient=True,
            )
            self._bar.start()
        if self._task is None or self._bar.tasks[0].description != self._description:
            if self._task is not None:  # a new stage gets a counter of its own
                self._bar.remove_task(self._task)
            self._task = self._bar.add_task(self._description, total=self._total)
        self._bar.update(self._task, completed=self._completed)


def for_terminal(console: Console, quiet: bool) -> Progress:
    """The progress display the CLI uses: a TerminalProgress unless quiet or not a terminal."""
    if quiet or not console.is_terminal:
        return Progress()
    return TerminalProgress(console)
