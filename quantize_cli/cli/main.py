"""The ``qz`` command line: parse options, call the library, render the result.

Exit codes: 0 success; 1 bad data or a failed run (one ``Error:`` line on stderr, no
traceback); 2 bad usage (click); 3 ``qz diff --fail-under``: the checkpoints compared but
failed the test; 130 interrupted (Ctrl-C); 143 terminated (SIGTERM). A closed stdout
(``qz … | head``) is not a failure: the work is done, and the exit code is 0.
"""

from __future__ import annotations

import errno
import functools
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
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

from .. import __version__
from ..core.explain import explain as explain_steps
from ..core.scheme import ACTIVATIONS, BITS, CLIP_CHOICES, INTEGER_METHODS, METHODS, Scheme
from ..errors import OutputError, QzError, located
from ..formats import DEFAULT_FORMAT, FORMATS, PRESETS, scheme_for
from ..jobs import dequantize_checkpoint, diff_checkpoints, inspect_checkpoint, quantize_checkpoint
from ..storage.dtypes import OUTPUT_DTYPES
from ..storage.writer import check_output_path, write_file
from . import render

EXIT_FAILURE = 1
EXIT_BELOW_THRESHOLD = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

F = TypeVar("F", bound=Callable[..., Any])


def reports_errors(command: F) -> F:
    """Turn qz's own errors into one line on stderr and exit 1; Ctrl-C into exit 130."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except QzError as error:
            click.echo(f"Error: {render.display_text(error.message)}", err=True)
            if error.hint:
                click.echo(f"Hint: {render.display_text(error.hint)}", err=True)
            sys.exit(EXIT_FAILURE)
        except KeyboardInterrupt:
            click.echo("Interrupted; nothing was written.", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except OSError as error:
            if error.errno == errno.EPIPE:  # `qz … | head`: the job is done
                render.leave_on_closed_output(sys.stdout)
            _internal_error(error)
        except Exception as error:  # a bug: one line, and the traceback on request
            _internal_error(error)

    return wrapper  # type: ignore[return-value]


def _internal_error(error: Exception) -> None:
    if os.environ.get("QZ_TRACEBACK"):
        raise error
    click.echo(f"Error: internal error: {type(error).__name__}: "
               f"{render.display_text(str(error))}", err=True)
    click.echo("Hint: this is a bug in qz; QZ_TRACEBACK=1 shows the traceback for a report",
               err=True)
    sys.exit(EXIT_FAILURE)


class _BarProgress:
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
        self.bar.update(self.task, advance=nbytes, tensor=render.display_text(tensor))


class _progress_for:
    """Context manager giving a progress reporter: a bar on a terminal, else nothing."""

    def __init__(self, quiet: bool) -> None:
        stderr = sys.stderr
        self.enabled = not quiet and stderr.isatty()
        self.bar: Progress | None = None
        if self.enabled:
            console = render.make_console(stderr, terminal=True)
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

    def __enter__(self) -> _BarProgress | None:
        if self.bar is None:
            return None
        self.bar.__enter__()
        return _BarProgress(self.bar)

    def __exit__(self, *exc_info: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc_info)


def _stdout_console() -> Any:
    stdout = sys.stdout
    return render.make_console(stdout, terminal=stdout.isatty())


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


def _shown_worst(worst: int | None, show_all: bool, count: int) -> int | None:
    """How many of the worst tensors a table shows (None: every tensor)."""
    if show_all:
        return None
    if worst is not None:
        return worst
    return WORST_SHOWN if sys.stdout.isatty() and count > MANY_TENSORS else None


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

    def write(self, document: dict[str, Any]) -> None:
        text = render.dump_json(document)
        if self.to_stdout:
            click.echo(text)
        elif self.path is not None:
            if self.path.exists() and not self.existed:
                raise OutputError(located(self.path, None, "was created while qz ran (is it "
                                          "one of the outputs?); the report was not written"),
                                  hint="write the report elsewhere with --json")
            write_file(self.path, (text + "\n").encode("utf-8"))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qz")
def qz() -> None:
    """Quantize safetensors checkpoints (INT8, 4-bit, FP8), inspect them, compare them
    and dequantize them.

    \b
    Example:
      qz quantize model.safetensors --method affine --block 128
      qz inspect model.int8.safetensors
      qz dequantize model.int8.safetensors
      qz diff model.safetensors model.int8.safetensors
      qz explain 1.6 -0.7 -3.4 1.7 -2.9 0.5 2.3 6.2
    """


@qz.command(short_help="Quantize a checkpoint or model folder.")
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@output_option("int8")
@click.option("--scheme", "preset_name", metavar="NAME",
              help="A preset by llm-compressor's name, for the method, bits, granularity "
                   f"and activations: {', '.join(PRESETS)}.")
@click.option("--method", type=click.Choice(METHODS), default=None,
              help="absmax: symmetric, s = max|x|/127 (/7 at 4 bits). affine: asymmetric, "
                   "with a zero point (a float offset in MLX). fp8: FP8 E4M3 values, "
                   "s = max|x|/448. nvfp4, mxfp4, mxfp8: microscaling floats in groups of "
                   "16 or 32 with E4M3 or power-of-two scales. [default: absmax; affine for mlx]")
@click.option("--bits", type=click.Choice([str(bits) for bits in BITS]), default=None,
              help="Bits per integer code (absmax, affine); below 8 they are packed. "
                   "[default: 8]")
@click.option("--activations", type=click.Choice(ACTIVATIONS), default=None,
              help="Declare that the runtime quantizes each layer's inputs dynamically (per "
                   "token) to INT8 or FP8 (compressed-tensors: W8A8, FP8_DYNAMIC).")
@click.option("--block", "block_size", type=click.IntRange(min=1), default=None,
              help="Block-wise: one scale per N consecutive values of the last axis "
                   "[default: 128; 64 for mlx].")
@click.option("--per-channel", is_flag=True, help="One scale per output channel (row).")
@click.option("--per-tensor", is_flag=True, help="One scale for the whole tensor.")
@click.option("--clip", type=click.Choice(CLIP_CHOICES), default="auto",
              show_default=True,
              help="How each group's scale is chosen. none: the full range (plain "
                   "rounding). mse: the scale (and zero point) of least squared error, "
                   "never worse than plain rounding. weighted (below 8 bits): the same, "
                   "weighting the largest values. auto: mse below 8 bits and per tensor, "
                   "none otherwise.")
@click.option("--target-sqnr", type=float, metavar="DB",
              help="Give each tensor the cheapest scheme (per tensor, per channel, block "
                   "128, 64, 32) whose SQNR reaches DB; tensors that cannot stay as they "
                   "are. Measures every candidate, so it reads the data more than once.")
@click.option("--target-bits", type=float, metavar="B",
              help="Give each tensor the scheme (4 or 8 bits, any granularity the format "
                   "stores, or its own dtype) so that the total squared error is least and "
                   "the selected tensors average at most B bits per weight, scales "
                   "included; with --target-sqnr, every tensor also reaches DB. Measures "
                   "every candidate.")
@click.option("--rule", "rules", multiple=True, metavar="GLOB=SCHEME",
              help="Quantize the selected tensors whose names match GLOB with SCHEME: "
                   "'keep', or comma-separated changes to the scheme: int4/int8, "
                   "absmax/affine/fp8, tensor/channel/blockN (e.g. '*.down_proj.*=int8'). "
                   "Repeatable; the last matching rule wins.")
@click.option("--include", multiple=True, metavar="GLOB",
              help="Quantize exactly the float tensors whose names match (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB",
              help="Never quantize tensors whose names match (repeatable; wins over "
                   "--include).")
@click.option("--dry-run", is_flag=True,
              help="Show what would be done and the output size; read headers only.")
@click.option("--format", "format_name", type=click.Choice(list(FORMATS)),
              default=DEFAULT_FORMAT, show_default=True,
              help="The on-disk format. " + " ".join(
                  f"{codec.summary}." for codec in FORMATS.values()))
@click.option("--tensor-parallel", type=click.IntRange(min=1), default=1, metavar="N",
              help="For formats vLLM runs: keep in float the layers whose slices on N "
                   "GPUs its kernels cannot run (--dry-run shows why).")
@click.option("--no-hash", is_flag=True,
              help="Do not record the input's SHA-256 (saves about 0.7 s of one core per GB).")
@click.option("--no-stats", is_flag=True,
              help="Do not measure the error (faster; the same file is written).")
@json_option
@table_options
@click.option("--force", is_flag=True, help="Replace an existing output (and JSON file).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no table.")
@reports_errors
def quantize(
    input_path: Path,
    output: str | None,
    preset_name: str | None,
    method: str | None,
    bits: str | None,
    activations: str | None,
    block_size: int | None,
    per_channel: bool,
    per_tensor: bool,
    clip: str,
    target_sqnr: float | None,
    target_bits: float | None,
    rules: tuple[str, ...],
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    dry_run: bool,
    format_name: str,
    tensor_parallel: int,
    no_hash: bool,
    no_stats: bool,
    json_target: str | None,
    worst: int | None,
    show_all: bool,
    force: bool,
    quiet: bool,
) -> None:
    """Quantize INPUT (a .safetensors file, an index, or a model folder).

    Float tensors with at least 2 dimensions and 1024 elements are quantized; everything
    else is copied unchanged. Prints the error of every tensor and the totals.

    \b
    Examples:
      qz quantize model.safetensors --method affine --block 128
      qz quantize llama-3-8b/ --per-channel -o llama-3-8b-int8/
      qz quantize llama-3-8b/ --bits 4 --block 64 --format mlx
      qz quantize model.safetensors --exclude 'lm_head.*' --dry-run
      qz quantize llama-3-8b/ --target-bits 4.5 --rule 'lm_head.weight=int8'
      qz quantize llama-3-8b/ --format compressed-tensors --method fp8 --per-channel
    """
    chosen = [name for name, given in (("--block", block_size is not None),
                                        ("--per-channel", per_channel),
                                        ("--per-tensor", per_tensor)) if given]
    if len(chosen) > 1:
        raise click.UsageError(f"choose one granularity, not {' and '.join(chosen)}")
    targets = [name for name, given in (("--target-sqnr", target_sqnr is not None),
                                        ("--target-bits", target_bits is not None)) if given]
    if chosen and targets:
        raise click.UsageError(f"{targets[0]} chooses the granularity itself; drop {chosen[0]}")
    if target_bits is not None and bits is not None:
        raise click.UsageError("--target-bits chooses the bits itself; drop --bits")
    given = [name for name, value in (("--method", method), ("--bits", bits),
                                      ("--activations", activations),
                                      (chosen[0] if chosen else "", chosen or None)) if value]
    if preset_name is not None and given:
        raise click.UsageError(f"--scheme {preset_name} sets the method, bits, granularity and "
                               f"activations; drop {given[0]}")
    report_file = JsonReport(json_target, force, [input_path])
    granularity = "channel" if per_channel else "tensor" if per_tensor else None
    scheme = scheme_for(FORMATS[format_name], preset_name=preset_name,
                        method=method,  # type: ignore[arg-type]
                        granularity=granularity,  # type: ignore[arg-type]
                        block_size=block_size,
                        bits=None if bits is None else int(bits),
                        clip=clip,  # type: ignore[arg-type]
                        activations=activations)  # type: ignore[arg-type]
    with _progress_for(quiet or dry_run) as progress:
        report = quantize_checkpoint(
            input_path, output, scheme, include=include, exclude=exclude, force=force,
            dry_run=dry_run, error_stats=not no_stats, target_sqnr=target_sqnr,
            target_bits=target_bits, rules=rules, format=format_name,
            tensor_parallel=tensor_parallel, hash_source=not no_hash,
            progress=progress,
        )
    report_file.write(render.quantize_json(report))
    if not quiet and not report_file.to_stdout:
        console = _stdout_console()
        shown = None if report.dry_run else _shown_worst(worst, show_all, len(report.tensors))
        console.print(render.quantize_table(report, console.width, shown))
        console.print(render.quantize_summary(report))


@qz.command(short_help="Show what a checkpoint holds, from its headers.")
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@json_option
@click.option("--force", is_flag=True, help="Replace an existing JSON file.")
@reports_errors
def inspect(input_path: Path, json_target: str | None, force: bool) -> None:
    """Show what INPUT holds, from its headers: tensors, dtypes, shapes, sizes, which
    tensors are quantized and how (in any format qz reads), metadata and totals.

    \b
    Example:
      qz inspect model.int8.safetensors
      qz inspect llama-3-8b-int8/ --json
    """
    report_file = JsonReport(json_target, force, [input_path])
    report = inspect_checkpoint(input_path)
    report_file.write(render.inspect_json(report))
    if not report_file.to_stdout:
        console = _stdout_console()
        console.print(render.inspect_table(report, console.width))


@qz.command(short_help="Turn a quantized checkpoint back into floats.")
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@output_option("dequant")
@click.option("--dtype", type=click.Choice(["original", *OUTPUT_DTYPES]), default="original",
              show_default=True,
              help="Dtype of the restored tensors. Tensors that were never quantized "
                   "(norms, biases, integers) keep their dtype and bytes.")
@json_option
@click.option("--force", is_flag=True, help="Replace an existing output (and JSON file).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
@reports_errors
def dequantize(input_path: Path, output: str | None, dtype: str, json_target: str | None,
               force: bool, quiet: bool) -> None:
    """Turn a quantized INPUT (in any format qz writes) back into a float checkpoint: the
    original tensor names, shapes and dtypes, a drop-in replacement.

    \b
    Example:
      qz dequantize model.int8.safetensors -o model.restored.safetensors
    """
    report_file = JsonReport(json_target, force, [input_path])
    with _progress_for(quiet) as progress:
        report = dequantize_checkpoint(input_path, output, dtype, force=force,
                                       progress=progress)
    report_file.write(render.dequantize_json(report))
    if not quiet and not report_file.to_stdout:
        _stdout_console().print(render.dequantize_summary(report))


@qz.command(short_help="Compare two checkpoints, tensor by tensor.")
@click.argument("a", metavar="A", type=click.Path(path_type=Path))
@click.argument("b", metavar="B", type=click.Path(path_type=Path))
@click.option("--fail-under", type=float, metavar="DB",
              help="Exit with status 3 if a floating tensor's SQNR is below DB, or if the "
                   "checkpoints differ otherwise (names, shapes, integer tensors). "
                   "'--fail-under inf' passes only identical checkpoints.")
@json_option
@table_options
@click.option("--force", is_flag=True, help="Replace an existing JSON file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no table.")
@reports_errors
def diff(a: Path, b: Path, fail_under: float | None, json_target: str | None,
         worst: int | None, show_all: bool, force: bool, quiet: bool) -> None:
    """Compare checkpoint B with checkpoint A, tensor by tensor.

    Either may be a float checkpoint or a quantized one (dequantized on the fly), a
    file, an index or a folder. Prints the error of B against A for every floating
    tensor both hold with the same shape, compares the others exactly, and lists the
    names and shapes that differ.

    \b
    Examples:
      qz diff model.safetensors model.int8.safetensors
      qz diff model.safetensors model.int8.safetensors --fail-under 40
      qz diff model.int8.safetensors model.affine.int8.safetensors --json
    """
    report_file = JsonReport(json_target, force, [a, b])
    with _progress_for(quiet) as progress:
        report = diff_checkpoints(a, b, progress=progress)
    failures = [] if fail_under is None else render.diff_failures(report, fail_under)
    report_file.write(render.diff_json(report, fail_under, failures))
    if not quiet and not report_file.to_stdout:
        console = _stdout_console()
        console.print(render.diff_view(report, console.width,
                                       _shown_worst(worst, show_all, len(report.compared))))
    if failures:
        click.echo(f"qz diff: {'; '.join(failures)}", err=True)
        sys.exit(EXIT_BELOW_THRESHOLD)


@qz.command(context_settings={"ignore_unknown_options": True},
            short_help="Show step by step how a few values are quantized.")
@click.argument("values", nargs=-1, required=True, metavar="VALUES...")
@click.option("--method", type=click.Choice(INTEGER_METHODS), default="absmax",
              show_default=True, help="absmax: symmetric. affine: with a zero point.")
@click.option("--bits", type=click.Choice(["8", "4"]), default="8", show_default=True,
              help="Bits per code.")
@click.option("--block", "block_size", type=click.IntRange(min=1), default=None,
              help="Groups of N values, each with its own scale [default: one group].")
@reports_errors
def explain(values: tuple[str, ...], method: str, bits: str, block_size: int | None) -> None:
    """Show, step by step, how VALUES are quantized to integer codes and back.

    VALUES are numbers, separated by spaces or commas (negative ones too).

    \b
    Examples:
      qz explain 1.6 -0.7 -3.4 1.7 -2.9 0.5 2.3 6.2
      qz explain 1.6,-0.7,-3.4,1.7,-2.9,0.5,2.3,6.2 --method affine
      qz explain 0.1 0.2 0.3 9.0 0.1 0.2 0.3 0.4 --block 4
      qz explain 1.6 -0.7 -3.4 1.7 -2.9 0.5 2.3 6.2 --bits 4
    """
    numbers = []
    for text in (part for value in values for part in value.split(",") if part):
        try:
            number = float(text)
        except ValueError:
            if text.startswith("-") and not text[1:2].isdigit():
                # Unknown options reach VALUES, so that negative numbers do too.
                raise click.NoSuchOption(text.split("=")[0], possibilities=[
                    "--method", "--bits", "--block"]) from None
            raise click.BadParameter(f"{text!r} is not a number", param_hint="VALUES") from None
        if not math.isfinite(number):
            raise click.BadParameter(f"{text!r} is not a finite number: qz refuses NaN and "
                                     "infinity (DESIGN §1)", param_hint="VALUES")
        numbers.append(number)
    # The tutorial's rule: the full range of each group, never clipped.
    scheme = Scheme(method, "block" if block_size else "tensor",  # type: ignore[arg-type]
                    block_size, clip="none", bits=int(bits))
    _stdout_console().print(render.explain_view(explain_steps(numbers, scheme)))


def _terminate(signum: int, frame: Any) -> None:
    # Python's default for SIGTERM kills the process without running cleanup; raising
    # SystemExit instead unwinds the writers, which remove their temporary files.
    raise SystemExit(EXIT_TERMINATED)


def main() -> None:
    """Console-script entry point."""
    signal.signal(signal.SIGTERM, _terminate)
    qz(prog_name="qz")
