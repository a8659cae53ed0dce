"""The progress bar: rich, over bytes, on stderr, on one line at any width; only on a
terminal and never with ``--quiet``."""

from __future__ import annotations

import sys
from typing import Any

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Column

from .console import make_console
from .text import display_text


class BarProgress:
    """A rich progress bar over bytes on stderr, one phase at a time."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.task: TaskID | None = None

    def start(self, total_bytes: int, phase: str) -> None:
        if self.task is not None:  # one bar at a time: the finished phase goes
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task(phase, total=total_bytes, tensor="")

    def advance(self, nbytes: int, tensor: str) -> None:
        assert self.task is not None
        self.bar.update(self.task, advance=nbytes, tensor=display_text(tensor))


class progress_for:
    """Context manager giving a progress reporter: a bar on a terminal, else nothing."""

    def __init__(self, quiet: bool) -> None:
        stderr = sys.stderr
        self.enabled = not quiet and stderr.isatty()
        self.bar: Progress | None = None
        if self.enabled:
            console = make_console(stderr, terminal=True)
            # One line at any width: the tensor's name takes what the rest leaves and is
            # cut with an ellipsis; on a narrow terminal speed and time remaining go.
            wide = console.width >= 90
            self.bar = Progress(
                TextColumn("{task.description}"),
                TextColumn("{task.fields[tensor]}", markup=False, table_column=Column(
                    no_wrap=True, overflow="ellipsis", ratio=1, min_width=0)),
                BarColumn(bar_width=20 if wide else 10),
                DownloadColumn(),
                *((TransferSpeedColumn(), TimeRemainingColumn()) if wide else ()),
                console=console,
                transient=True,
                expand=True,
            )

    def __enter__(self) -> BarProgress | None:
        if self.bar is None:
            return None
        self.bar.__enter__()
        return BarProgress(self.bar)

    def __exit__(self, *exc_info: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc_info)
