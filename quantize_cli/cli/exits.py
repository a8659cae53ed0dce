"""How the command line ends: exit codes, one line for a user's error, one line (and
the traceback on request) for a bug, Ctrl-C and SIGTERM.

Exit codes: 0 success; 1 bad data or a failed run (one ``Error:`` line on stderr, no
traceback); 2 bad usage (click); 3 ``qz diff --fail-under``: the checkpoints compared but
failed the test; 130 interrupted (Ctrl-C); 143 terminated (SIGTERM). A closed stdout
(``qz … | head``) is not a failure: the work is done, and the exit code is 0.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..errors import QzError
from .console import leave_on_closed_output
from .text import display_text

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_BELOW_THRESHOLD = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

F = TypeVar("F", bound=Callable[..., Any])


class BadUsage(QzError):
    """Options that cannot work, found before any input is read: exit status 2."""


def reports_errors(command: F) -> F:
    """Turn qz's own errors into one line on stderr and exit 1 (2 for bad usage); Ctrl-C
    into exit 130."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except QzError as error:
            click.echo(f"Error: {display_text(error.message)}", err=True)
            if error.hint:
                click.echo(f"Hint: {display_text(error.hint)}", err=True)
            sys.exit(EXIT_USAGE if isinstance(error, BadUsage) else EXIT_FAILURE)
        except KeyboardInterrupt:
            click.echo("Interrupted; nothing was written.", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except OSError as error:
            if error.errno == errno.EPIPE:  # `qz … | head`: the job is done
                leave_on_closed_output(sys.stdout)
            _internal_error(error)
        except Exception as error:  # a bug: one line, and the traceback on request
            _internal_error(error)

    return wrapper  # type: ignore[return-value]


def _internal_error(error: Exception) -> None:
    if os.environ.get("QZ_TRACEBACK"):
        raise error
    click.echo(f"Error: internal error: {type(error).__name__}: "
               f"{display_text(str(error))}", err=True)
    click.echo("Hint: this is a bug in qz; QZ_TRACEBACK=1 shows the traceback for a report",
               err=True)
    sys.exit(EXIT_FAILURE)


def terminate(signum: int, frame: Any) -> None:
    # Python's default for SIGTERM kills the process without running cleanup; raising
    # SystemExit instead unwinds the writers, which remove their temporary files.
    raise SystemExit(EXIT_TERMINATED)
