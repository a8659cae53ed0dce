"""The options several commands share, the same on each: ``-o``, ``--json [FILE|-]``
(checked before any work, written all or nothing after), ``--worst N`` and ``--all``."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ..errors import OutputError, located
from ..storage.writer import check_output_path, write_file
from .documents import dump_json

F = TypeVar("F", bound=Callable[..., Any])


#: On a terminal, a report of more tensors than this shows only the worst ones.
MANY_TENSORS = 50


#: How many of the worst tensors it shows then.
WORST_SHOWN = 20


def output_option(suffix: str) -> Callable[[F], F]:
    """``-o/--output``, naming the default output ``NAME.<suffix>``."""
    return click.option(
        "-o", "--output", type=click.Path(),  # a str: "DIR/" keeps its slash
        help=f"Output file or folder (DIR/ or an existing folder means a folder). Default: "
             f"beside INPUT; a model folder gives NAME.{suffix}/, a file "
             f"NAME.{suffix}.safetensors.")


def json_option(command: F) -> F:
    """``--json [FILE|-]``, the same on every command."""
    return click.option(
        "--json", "json_target", metavar="FILE|-", is_flag=False, flag_value="-",
        help="Also write the report as JSON to FILE; with '-' or no value, print the JSON "
             "to stdout instead of the table. An existing FILE needs --force.")(command)


def table_options(command: F) -> F:
    """``--worst N`` and ``--all``, on the commands whose tables list tensors' errors."""
    command = click.option("--all", "show_all", is_flag=True,
                           help="Show every tensor (the default, except on a terminal "
                                f"with more than {MANY_TENSORS} tensors).")(command)
    return click.option("--worst", type=click.IntRange(min=0), metavar="N",
                        help="Show only the N tensors of lowest SQNR (0: only the summary); "
                             f"on a terminal, {WORST_SHOWN} when there are more than "
                             f"{MANY_TENSORS}.")(command)


def shown_worst(worst: int | None, show_all: bool, count: int) -> int | None:
    """How many of the worst tensors a table shows (None: every tensor)."""
    if show_all:
        return None
    if worst is not None:
        return worst
    return WORST_SHOWN if sys.stdout.isatty() and count > MANY_TENSORS else None


def _is_report(path: Path) -> bool:
    """Whether ``path`` holds a JSON report of qz (``schema_version`` and ``command``)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(document, dict) and {"schema_version", "command"} <= set(document)


def number(allow: Callable[[float], bool], rule: str) -> Callable[..., float | None]:
    """A click callback refusing a number that breaks ``rule`` (NaN breaks every rule):
    an invalid value is bad usage, exit status 2."""

    def check(context: click.Context, parameter: click.Parameter,
              value: float | None) -> float | None:
        if value is not None and (math.isnan(value) or not allow(value)):
            raise click.BadParameter(f"{value:g} is not {rule}")
        return value

    return check


class JsonReport:
    """Where ``--json`` goes: checked before any work, written (all or nothing) after."""

    def __init__(self, target: str | None, force: bool, inputs: list[Path]) -> None:
        self.to_stdout = target == "-"
        self.path = None if target is None or self.to_stdout else Path(target)
        self.existed = False
        if self.path is not None:
            check_output_path(self.path, inputs, force, option="--json")
            for source in inputs:
                if source.is_dir() and self.path.resolve().is_relative_to(source.resolve()):
                    raise OutputError(located(self.path, None, "is inside the input folder, "
                                              "which qz never writes to"),
                                      hint="write the report elsewhere with --json")
            self.existed = self.path.exists()
            if self.existed and not _is_report(self.path):
                raise OutputError(located(self.path, None, "is not a report qz wrote; --force "
                                          "replaces only qz's own reports"),
                                  hint="write the report elsewhere with --json")

    def write(self, document: dict[str, Any]) -> None:
        text = dump_json(document)
        if self.to_stdout:
            click.echo(text)
        elif self.path is not None:
            if self.path.exists() and not self.existed:
                raise OutputError(located(self.path, None, "was created while qz ran (is it "
                                          "one of the outputs?); the report was not written"),
                                  hint="write the report elsewhere with --json")
            write_file(self.path, (text + "\n").encode("utf-8"))
