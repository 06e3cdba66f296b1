"""The progress display of ``pgrepl-bench``: a rich progress bar on stderr, or plain lines.

rich is optional (the ``bench`` extra): without it, or with ``--no-progress``, every step is
one line on stderr and the tables are printed as plain text.
"""

from __future__ import annotations

import sys
from typing import Any, Optional


class Ui:
    """A progress bar on stderr (rich), or plain log lines when rich is missing or disabled."""

    def __init__(self, enabled: bool, total_steps: int) -> None:
        self._progress: Any = None
        self._overall: Any = None
        self._task: Any = None
        if enabled:
            try:
                from rich.console import Console
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                           TimeElapsedColumn)
            except ImportError:
                pass
            else:
                self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                          MofNCompleteColumn(), TimeElapsedColumn(),
                                          console=Console(stderr=True), transient=True)
                self._overall = self._progress.add_task("pgrepl-bench", total=total_steps)

    def __enter__(self) -> "Ui":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()

    def step(self, description: str, total: Optional[int]) -> None:
        """A new step (one reader run, one generation) with ``total`` rows, or unknown."""
        if self._progress is None:
            sys.stderr.write(f"pgrepl-bench: {description}\n")
            sys.stderr.flush()
            return
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(description, total=total)

    def advance_rows(self, rows: int) -> None:
        """Rows done so far in the current step (absolute)."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=rows)

    def add_rows(self, rows: int) -> None:
        """Rows done in the current step (increment)."""
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, rows)

    def done_step(self) -> None:
        """The current step is over (advances the overall bar)."""
        if self._progress is not None:
            if self._task is not None:
                self._progress.remove_task(self._task)
                self._task = None
            self._progress.advance(self._overall)

    def note(self, text: str) -> None:
        """A line that stays above the bar."""
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            sys.stderr.write(text + "\n")
