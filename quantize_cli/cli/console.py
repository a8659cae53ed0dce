"""The rich consoles the commands print to, and leaving quietly when the reader of
stdout went away."""

from __future__ import annotations

import os
from typing import Any, NoReturn

from rich.console import Console


def leave_on_closed_output(file: Any) -> NoReturn:
    """The reader of ``file`` went away (``qz … | head``) after the job was done: that
    is no failure, so exit 0. Later writes (and the interpreter's final flush) go to
    /dev/null, so that nothing complains on the way out."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, file.fileno())
    raise SystemExit(0)


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich's own handler exits with status 1.
        leave_on_closed_output(self.file)


def make_console(file: Any, terminal: bool) -> Console:
    """A console for ``file``; off a terminal it is wide, so that tables stay readable
    in logs (COLUMNS still wins when set)."""
    width = None if terminal or "COLUMNS" in os.environ else 160
    return _Console(file=file, width=width, soft_wrap=False, highlight=False)
