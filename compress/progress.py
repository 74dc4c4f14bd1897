"""Progress for the long loops (the block loop, the allocation pre-pass, evaluation).

On a terminal: one rich bar over the decoder blocks, the current phase in its description. Elsewhere (a batch job,
``nohup``, CI: stderr is a file or a pipe) a bar draws nothing, so a ten-minute run would look dead; there ``plain``
mode prints lines instead: one per finished block (its time, the time of each phase in it, the running mean of the
modules' relative errors), one per finished phase outside the blocks (calibration tokens, capture, allocation, each
evaluation set and task), and a heartbeat when one phase runs long without a line. A line is printed when a phase
ENDS, with its time, so a run that fails inside a phase shows nothing but its one-line error.
"""
from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as _RichProgress

from .checkpoint.module_types import report_types

# first word of a phase text -> the phase it belongs to (its line's label): the allocation pre-pass alternates
# "spectra for allocation, block i/n" and "sensitivity <matrix>", selfgen runs inside "calibration tokens", and the
# gradient pass counts its blocks; each is one phase with one line, not a line per step
FAMILIES = {"calibration": "calibration tokens", "selfgen": "calibration tokens", "capture": "capture",
            "gradients": "gradients", "spectra": "allocation", "sensitivity": "allocation", "finetune": "finetune"}


def error_types(summary: bool = False) -> set[str]:
    """The report row types whose ``rel_error`` measures a change, ‖ΔY‖/‖Y‖ of the module's or unit's output (a dense
    row's is 0): ``ReportType.measured`` of the registered module types (``checkpoint/module_types.py``). ``summary``:
    the compression's error only, not what is left after a repair (``ReportType.repair``)."""
    return {t.word for t in report_types() if t.measured and not (summary and t.repair)}


def measured_errors(rows: list[dict], types=None) -> list[float]:
    """The ``rel_error`` of the rows of ``types`` (default: ``error_types()``) that changed something and measured
    it: not a unit kept whole (``kept_dim == dense_dim``, like a dense row), not a row whose error is not measured
    (None: MoDeGPT's q/k units, which report ``dropped_score_share`` instead)."""
    types = error_types() if types is None else types
    return [r["rel_error"] for r in rows if r.get("type") in types and r.get("rel_error") is not None
            and not (r.get("kept_dim") is not None and r.get("kept_dim") == r.get("dense_dim"))]

_active: Progress | None = None


def active() -> Progress:
    """The progress of the run under way (a silent one when none): for a deep loop that has no handle to it."""
    return _active if _active is not None else Progress(enabled=False)


class Progress:
    """``mode``: ``rich`` (a bar), ``plain`` (log lines) or ``off``; ``auto`` picks rich on a terminal (or in
    Jupyter) and plain elsewhere. ``clock`` and ``heartbeat`` (seconds without a line before one is printed) are
    there for tests."""

    def __init__(self, enabled: bool = True, console: Console | None = None, mode: str = "auto",
                 clock=time.perf_counter, heartbeat: float = 60.0):
        global _active
        self.console = console or Console(stderr=True)  # resolves sys.stderr when it writes (CliRunner swaps it)
        if not enabled:
            mode = "off"
        elif mode == "auto":
            mode = "rich" if self.console.is_terminal or self.console.is_jupyter else "plain"
        self.mode = mode
        self._clock, self._heartbeat = clock, heartbeat
        self._rich = self._task = None
        self._block = ""
        self._group: tuple[str, float] | None = None  # (label, start) of the phase running outside the blocks
        self._in_block: tuple[int, float] | None = None  # (index, start) of the block running
        self._step: tuple[str, float] | None = None  # (kind, start) of the phase running inside that block
        self._times: dict[str, float] = {}
        self.profile: dict[str, float] = {}  # seconds per kind of phase inside the blocks, summed over the blocks
        self._n: int | None = None
        self._errors: list[float] = []
        self._last_line = clock()
        if mode == "rich":
            self._rich = _RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), console=self.console, transient=True)
            self._rich.start()
            self._task = self._rich.add_task("preparing", total=None)
        if mode != "off":
            _active = self

    def phase(self, text: str) -> None:
        if self._rich:
            self._rich.update(self._task, description=f"{self._block}{text}")
        now = self._clock()
        if self._in_block is not None:  # timed in every mode: the report's profile of the block loop
            self._end_step(now)
            self._step = (text.split()[0] if text.strip() else text, now)
        if self.mode != "plain":
            return
        if self._in_block is not None:
            where, since = f"block {self._in_block[0] + 1}/{self._n}", self._in_block[1]
        else:
            label = FAMILIES.get(text.split()[0] if text.strip() else text, text)
            if self._group is not None and self._group[0] != label:
                self._end_group(now)
            if self._group is None:
                self._group = (label, now)
            where, since = self._group
        if now - self._last_line >= self._heartbeat:
            said = text if text.startswith(where) else f"{where}: {text}"
            self._line(f"{said} ({now - since:.0f} s so far)", now)

    def start_blocks(self, n: int, done: int) -> None:
        if self._rich:
            self._rich.update(self._task, total=n, completed=done)
        if self.mode == "plain":
            self._end_group(self._clock())
            self._n = n
            if done:
                self._line(f"resumed: {done} of {n} blocks restored from the run cache", self._clock())

    def block(self, i: int) -> None:
        if self._rich:
            total = self._rich.tasks[0].total
            self._block = f"block {i + 1}/{total} · "
            self._rich.update(self._task, completed=i)
        now = self._clock()
        if self.mode == "plain":
            self._end_group(now)
        self._in_block, self._step, self._times = (i, now), None, {}

    def block_done(self, i: int, rows: list[dict]) -> None:
        """Block ``i`` is finished; ``rows`` are its report rows (their ``rel_error`` feed the running mean)."""
        if self._rich:
            self._rich.update(self._task, completed=i + 1)
        if self._in_block is None:
            return
        now = self._clock()
        self._end_step(now)
        if self.mode != "plain":
            self._in_block = None
            return
        self._errors += measured_errors(rows)
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in self._times.items())
        err = f", mean rel. error {sum(self._errors) / len(self._errors):.4f}" if self._errors else ""
        self._line(f"block {i + 1}/{self._n}: {now - self._in_block[1]:.1f} s"
                   + (f" ({phases})" if phases else "") + err, now)
        self._in_block = None

    def done(self) -> None:
        if self._rich:
            self._block = ""
            self._rich.update(self._task, completed=self._rich.tasks[0].total, description="done")
        if self.mode == "plain":
            self._end_group(self._clock())
        self.close()

    def close(self) -> None:
        """Stop without a line for the phase under way (after an error, the error is the only line)."""
        global _active
        if self._rich:
            self._rich.stop()
            self._rich = None
        self._group = None
        if _active is self:
            _active = None

    def _end_step(self, now: float) -> None:
        if self._step is not None:
            kind, start = self._step
            self._times[kind] = self._times.get(kind, 0.0) + now - start
            self.profile[kind] = self.profile.get(kind, 0.0) + now - start
            self._step = None

    def _end_group(self, now: float) -> None:
        if self._group is not None:
            label, start = self._group
            self._group = None
            self._line(f"{label}: {now - start:.1f} s", now)

    def _line(self, text: str, now: float) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        self._last_line = now
