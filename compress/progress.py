"""rich progress for the long loops: one bar over decoder blocks, with the current phase in its description."""
from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as _RichProgress


class Progress:
    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        self._rich = None
        self._task = None
        self._block = ""
        if enabled:
            self._rich = _RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), console=console or Console(file=sys.stderr), transient=True)
            self._rich.start()
            self._task = self._rich.add_task("preparing", total=None)

    def phase(self, text: str) -> None:
        if self._rich:
            self._rich.update(self._task, description=f"{self._block}{text}")

    def start_blocks(self, n: int, done: int) -> None:
        if self._rich:
            self._rich.update(self._task, total=n, completed=done)

    def block(self, i: int) -> None:
        if self._rich:
            total = self._rich.tasks[0].total
            self._block = f"block {i + 1}/{total} · "
            self._rich.update(self._task, completed=i)

    def done(self) -> None:
        if self._rich:
            self._block = ""
            self._rich.update(self._task, completed=self._rich.tasks[0].total, description="done")
            self._rich.stop()
            self._rich = None

    def close(self) -> None:
        if self._rich:
            self._rich.stop()
            self._rich = None
