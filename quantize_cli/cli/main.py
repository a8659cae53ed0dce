"""The ``qz`` command line: parse options, call the library, render the result.

Exit codes: 0 success; 1 bad data or a failed run (one ``Error:`` line on stderr, no
traceback); 2 bad usage (click); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM).
"""

from __future__ import annotations

import errno
import functools
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

from .. import __version__
from ..core.explain import explain as explain_steps
from ..core.scheme import CLIP_CHOICES, INTEGER_METHODS, METHODS, Scheme
from ..errors import QzError
from ..formats import DEFAULT_FORMAT, FORMATS
from ..jobs import dequantize_checkpoint, diff_checkpoints, inspect_checkpoint, quantize_checkpoint
from ..storage.dtypes import OUTPUT_DTYPES
from . import render

EXIT_FAILURE = 1
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
            if error.errno == errno.EPIPE:  # stdout closed early (`| head`): click's job
                raise
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
    """A rich progress bar over bytes on stderr."""

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
            self.bar = Progress(
                TextColumn("{task.description}"),
                TextColumn("{task.fields[tensor]}", markup=False),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=render.make_console(stderr, terminal=True),
                transient=True,
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qz")
def qz() -> None:
    """Quantize safetensors checkpoints to INT8, inspect them and dequantize them.

    \b
    Example:
      qz quantize model.safetensors --method affine --block 128
      qz inspect model.int8.safetensors
      qz dequantize model.int8.safetensors
      qz explain 1.6 -0.7 -3.4 1.7 -2.9 0.5 2.3 6.2
    """


@qz.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(),  # a str: "DIR/" keeps its slash
              help="Output file or folder (DIR/ or an existing folder means a folder). "
                   "Default: beside INPUT; a model folder gives NAME.int8/, a file "
                   "NAME.int8.safetensors.")
@click.option("--method", type=click.Choice(METHODS), default=None,
              help="absmax: symmetric, s = max|x|/127 (/7 at 4 bits). affine: asymmetric, "
                   "with a zero point (a float offset in MLX). fp8: FP8 E4M3 values, "
                   "s = max|x|/448. [default: absmax; affine for mlx]")
@click.option("--bits", type=click.Choice(["8", "4"]), default="8", show_default=True,
              help="Bits per code of absmax and affine; 4 packs two codes to a byte.")
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
@click.option("--json", "json_target", metavar="FILE|-",
              help="Write the report as JSON to FILE, or to stdout with '-'.")
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
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no table.")
@reports_errors
def quantize(
    input_path: Path,
    output: str | None,
    method: str | None,
    bits: str,
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
    json_target: str | None,
    format_name: str,
    tensor_parallel: int,
    no_hash: bool,
    no_stats: bool,
    force: bool,
    quiet: bool,
) -> None:
    """Quantize INPUT (a .safetensors file, an index, or a model folder) to INT8.

    Float tensors with at least 2 dimensions and 1024 elements are quantized; everything
    else is copied unchanged. Prints the error of every tensor and the totals.

    \b
    Examples:
      qz quantize model.safetensors --method affine --block 128
      qz quantize llama-3-8b/ --per-channel -o llama-3-8b-int8/
      qz quantize model.safetensors --exclude 'lm_head.*' --dry-run
      qz quantize model.safetensors --target-sqnr 40
      qz quantize llama-3-8b/ --format compressed-tensors --per-channel
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
    if target_bits is not None and bits != "8":
        raise click.UsageError("--target-bits chooses the bits itself; drop --bits")
    granularity = "channel" if per_channel else "tensor" if per_tensor else None
    scheme = FORMATS[format_name].scheme(method, granularity, block_size, clip, int(bits))
    with _progress_for(quiet or dry_run) as progress:
        report = quantize_checkpoint(
            input_path, output, scheme, include=include, exclude=exclude, force=force,
            dry_run=dry_run, error_stats=not no_stats, target_sqnr=target_sqnr,
            target_bits=target_bits, rules=rules, format=format_name,
            tensor_parallel=tensor_parallel, hash_source=not no_hash,
            progress=progress,
        )
    document = render.quantize_json(report)
    if json_target == "-":
        click.echo(render.dump_json(document))
        return
    if json_target:
        Path(json_target).write_text(render.dump_json(document) + "\n", encoding="utf-8")
    if not quiet:
        console = _stdout_console()
        console.print(render.quantize_table(report))
        console.print(render.quantize_summary(report))


@qz.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
@reports_errors
def inspect(input_path: Path, as_json: bool) -> None:
    """Show what INPUT holds, from its headers: tensors, dtypes, shapes, sizes, which
    tensors are quantized and how (in any format qz reads), metadata and totals.

    \b
    Example:
      qz inspect model.int8.safetensors
    """
    report = inspect_checkpoint(input_path)
    if as_json:
        click.echo(render.dump_json(render.inspect_json(report)))
    else:
        _stdout_console().print(render.inspect_table(report))


@qz.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(),  # a str: "DIR/" keeps its slash
              help="Output file or folder (DIR/ or an existing folder means a folder). "
                   "Default: beside INPUT; a model folder gives NAME.dequant/, a file "
                   "NAME.dequant.safetensors.")
@click.option("--dtype", type=click.Choice(["original", *OUTPUT_DTYPES]), default="original",
              show_default=True, help="Dtype of the restored tensors.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
@reports_errors
def dequantize(input_path: Path, output: str | None, dtype: str, force: bool,
               quiet: bool) -> None:
    """Turn a quantized INPUT (in any format qz writes) back into a float checkpoint: the
    original tensor names, shapes and dtypes, a drop-in replacement.

    \b
    Example:
      qz dequantize model.int8.safetensors -o model.restored.safetensors
    """
    with _progress_for(quiet) as progress:
        report = dequantize_checkpoint(input_path, output, dtype, force=force,
                                       progress=progress)
    if not quiet:
        _stdout_console().print(render.dequantize_summary(report))


@qz.command()
@click.argument("a", metavar="A", type=click.Path(path_type=Path))
@click.argument("b", metavar="B", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@reports_errors
def diff(a: Path, b: Path, as_json: bool) -> None:
    """Compare checkpoint B with checkpoint A, tensor by tensor.

    Either may be a float checkpoint or a quantized one (dequantized on the fly), a
    file, an index or a folder. Prints the error of B against A for every tensor both
    hold with the same shape, and lists the names and shapes that differ.

    \b
    Examples:
      qz diff model.safetensors model.int8.safetensors
      qz diff model.int8.safetensors model.affine.int8.safetensors --json
    """
    report = diff_checkpoints(a, b)
    if as_json:
        click.echo(render.dump_json(render.diff_json(report)))
    else:
        _stdout_console().print(render.diff_view(report))


@qz.command(context_settings={"ignore_unknown_options": True})
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
            numbers.append(float(text))
        except ValueError:
            raise click.BadParameter(f"{text!r} is not a number", param_hint="VALUES") from None
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
