"""The ``qz`` commands: parse options, call the library, render the result (views.py,
documents.py); how they end is in exits.py."""

from __future__ import annotations

import math
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .. import __version__
from ..core.elements import METHOD_INFO
from ..core.explain import explain as explain_steps
from ..core.scheme import ACTIVATIONS, BITS, CLIP_CHOICES, METHODS, Scheme
from ..errors import SchemeError
from ..formats import (
    DEFAULT_FORMAT,
    DEQUANTIZED_SUFFIX,
    FORMATS,
    PRESETS,
    output_suffix,
    scheme_for,
)
from ..jobs import (
    calibrate_model,
    check_options,
    dequantize_checkpoint,
    diff_checkpoints,
    inspect_checkpoint,
    quantize_checkpoint,
)
from ..jobs.calibrate import LENGTH as CALIBRATION_LENGTH
from ..jobs.calibrate import SEQUENCES as CALIBRATION_SEQUENCES
from ..jobs.rules import SYNTAX as RULE_SYNTAX
from ..storage.dtypes import OUTPUT_DTYPES
from . import documents, views
from .console import make_console
from .exits import EXIT_BELOW_THRESHOLD, BadUsage, reports_errors, terminate
from .options import (
    JsonReport,
    json_option,
    number,
    output_option,
    shown_worst,
    table_options,
)
from .progress import progress_for
from .text import display_text


def _stdout_console() -> Any:
    stdout = sys.stdout
    return make_console(stdout, terminal=stdout.isatty())


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


def _defaults(said: Callable[[Scheme], str]) -> str:
    """``[default: X; Y for FORMAT]``: what each format's default scheme says."""
    default = said(FORMATS[DEFAULT_FORMAT].default_scheme)
    others = [f"{said(fmt.default_scheme)} for {name}" for name, fmt in FORMATS.items()
              if said(fmt.default_scheme) != default]
    return f"[default: {'; '.join([default, *others])}]"


@qz.command(short_help="Quantize a checkpoint or model folder.")
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@output_option(output_suffix(FORMATS[DEFAULT_FORMAT], FORMATS[DEFAULT_FORMAT].default_scheme))
@click.option("--scheme", "preset_name", metavar="NAME",
              help="A preset by llm-compressor's name, for the method, bits, granularity "
                   f"and activations: {', '.join(PRESETS)}.")
@click.option("--method", type=click.Choice(METHODS), default=None,
              help=" ".join(f"{name}: {info.summary}." for name, info in METHOD_INFO.items())
              + " " + _defaults(lambda scheme: scheme.method))
@click.option("--bits", type=click.Choice([str(bits) for bits in BITS]), default=None,
              help="Bits per integer code (absmax, affine); below 8 they are packed. "
                   + _defaults(lambda scheme: str(scheme.bits)))
@click.option("--activations", type=click.Choice(ACTIVATIONS), default=None,
              help="Declare that the runtime quantizes each layer's inputs dynamically (per "
                   "token) to INT8 or FP8 (compressed-tensors: W8A8, FP8_DYNAMIC).")
@click.option("--block", "block_size", type=click.IntRange(min=1), default=None,
              help="Block-wise: one scale per N consecutive values of the last axis. "
                   + _defaults(lambda scheme: str(scheme.block_size)))
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
              callback=number(lambda db: 0 < db < math.inf, "a positive number of dB"),
              help="Give each tensor the cheapest scheme (per tensor, per channel, block "
                   "128, 64, 32) whose SQNR reaches DB; tensors that cannot stay as they "
                   "are. Measures every candidate, so it reads the data more than once.")
@click.option("--target-bits", type=float, metavar="B",
              callback=number(lambda bits: 0 < bits < 64, "an average number of bits per "
                              "weight (above 0, below 64)"),
              help="Give each tensor the scheme (4 or 8 bits, any granularity the format "
                   "stores, or its own dtype) so that the total squared error is least and "
                   "the selected tensors average at most B bits per weight, scales "
                   "included; with --target-sqnr, every tensor also reaches DB. Measures "
                   "every candidate.")
@click.option("--rule", "rules", multiple=True, metavar="GLOB=SCHEME",
              help="Quantize the selected tensors whose names match GLOB with SCHEME. "
                   f"{RULE_SYNTAX}. Repeatable; the last matching rule wins.")
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
@click.option("--calibration", type=click.Path(path_type=Path), metavar="STATS",
              help="A statistics file of qz calibrate: quantize each calibrated layer for "
                   "its output (the scale search weighted by its inputs, and GPTQ), report "
                   "the output error, and let the targets allocate by it.")
@click.option("--act-order", is_flag=True,
              help="With --calibration: GPTQ rounds the columns of largest inputs first "
                   "(the same output layout).")
@click.option("--no-gptq", is_flag=True,
              help="With --calibration: only the weighted scale search, no GPTQ.")
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
    calibration: Path | None,
    act_order: bool,
    no_gptq: bool,
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
      qz quantize llama-3-8b/ --bits 4 --calibration llama-3-8b.calibration.safetensors
    """
    if (act_order or no_gptq) and calibration is None:
        raise click.UsageError(f"{'--act-order' if act_order else '--no-gptq'} applies to "
                               "GPTQ, which needs --calibration")
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
    overridden = [name for name, given in (("--method", method), ("--bits", bits),
                                           ("--activations", activations)) if given] + chosen
    if preset_name is not None and overridden:
        raise click.UsageError(f"--scheme {preset_name} sets the method, bits, granularity and "
                               f"activations; drop {overridden[0]}")
    granularity = "channel" if per_channel else "tensor" if per_tensor else None
    try:
        scheme = scheme_for(FORMATS[format_name], preset_name=preset_name,
                            method=method,  # type: ignore[arg-type]
                            granularity=granularity,  # type: ignore[arg-type]
                            block_size=block_size,
                            bits=None if bits is None else int(bits),
                            clip=clip,  # type: ignore[arg-type]
                            activations=activations)  # type: ignore[arg-type]
        check_options(FORMATS[format_name], scheme, rules, target_sqnr, target_bits,
                      tensor_parallel)
    except SchemeError as error:
        raise BadUsage(error.message, error.hint) from None
    report_file = JsonReport(json_target, force, [input_path])
    with progress_for(quiet or dry_run) as progress:
        report = quantize_checkpoint(
            input_path, output, scheme, include=include, exclude=exclude, force=force,
            dry_run=dry_run, error_stats=not no_stats, target_sqnr=target_sqnr,
            target_bits=target_bits, rules=rules, format=format_name,
            tensor_parallel=tensor_parallel, hash_source=not no_hash,
            calibration=calibration, gptq=not no_gptq, act_order=act_order,
            progress=progress,
        )
    for warning in report.warnings:  # on stderr even with --quiet: the option did nothing
        click.echo(f"Warning: {display_text(warning)}", err=True)
    report_file.write(documents.quantize_json(report))
    if not quiet and not report_file.to_stdout:
        console = _stdout_console()
        shown = None if report.dry_run else shown_worst(worst, show_all, len(report.tensors))
        if shown != 0:  # --worst 0: the summary alone
            console.print(views.quantize_table(report, console.width, shown))
        console.print(views.quantize_summary(report))


@qz.command(short_help="Measure a model's layer inputs on text, for quantize.")
@click.argument("input_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--text", "text_path", type=click.Path(path_type=Path), required=True,
              metavar="FILE", help="UTF-8 text to run the model on (the only text used).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="The statistics file. [default: MODEL.calibration.safetensors beside "
                   "the model folder]")
@click.option("--sequences", type=click.IntRange(min=1), default=CALIBRATION_SEQUENCES,
              show_default=True, help="Windows of text to run.")
@click.option("--length", type=click.IntRange(min=2), default=CALIBRATION_LENGTH,
              show_default=True, help="Tokens per window (at most the model's).")
@click.option("--force", is_flag=True, help="Replace an existing statistics file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
@reports_errors
def calibrate(input_path: Path, text_path: Path, output: Path | None, sequences: int,
              length: int, force: bool, quiet: bool) -> None:
    """Run the float model in MODEL (a folder transformers loads) over the text in FILE
    and record, for every linear layer's inputs, their second moment XᵀX / n, each
    column's mean square and largest magnitude: what qz quantize --calibration needs to
    quantize each layer for its output (GPTQ). One file serves any number of quantize
    runs. Needs torch and transformers: pip install 'qz[calibrate]'.

    \b
    Example:
      qz calibrate SmolLM2-135M/ --text prose.txt
      qz quantize SmolLM2-135M/ --bits 4 --calibration SmolLM2-135M.calibration.safetensors
    """
    with progress_for(quiet) as progress:
        report = calibrate_model(input_path, text_path, output, sequences=sequences,
                                 length=length, force=force, progress=progress)
    if not quiet:
        _stdout_console().print(views.calibrate_summary(report))


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
    report_file.write(documents.inspect_json(report))
    if not report_file.to_stdout:
        console = _stdout_console()
        console.print(views.inspect_table(report, console.width))


@qz.command(short_help="Turn a quantized checkpoint back into floats.")
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@output_option(DEQUANTIZED_SUFFIX)
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
    with progress_for(quiet) as progress:
        report = dequantize_checkpoint(input_path, output, dtype, force=force,
                                       progress=progress)
    report_file.write(documents.dequantize_json(report))
    if not quiet and not report_file.to_stdout:
        _stdout_console().print(views.dequantize_summary(report))


@qz.command(short_help="Compare two checkpoints, tensor by tensor.")
@click.argument("a", metavar="A", type=click.Path(path_type=Path))
@click.argument("b", metavar="B", type=click.Path(path_type=Path))
@click.option("--fail-under", type=float, metavar="DB",
              callback=number(lambda db: db > -math.inf, "a number of dB (or inf)"),
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
    with progress_for(quiet) as progress:
        report = diff_checkpoints(a, b, progress=progress)
    failures = [] if fail_under is None else views.diff_failures(report, fail_under)
    report_file.write(documents.diff_json(report, fail_under, failures))
    if not quiet and not report_file.to_stdout:
        console = _stdout_console()
        console.print(views.diff_view(report, console.width,
                                       shown_worst(worst, show_all, len(report.compared))))
    if failures:
        click.echo(f"qz diff: {'; '.join(failures)}", err=True)
        sys.exit(EXIT_BELOW_THRESHOLD)


@qz.command(context_settings={"ignore_unknown_options": True},
            short_help="Show step by step how a few values are quantized.")
@click.argument("values", nargs=-1, required=True, metavar="VALUES...")
@click.option("--method", type=click.Choice(METHODS), default=METHODS[0], show_default=True,
              help=" ".join(f"{name}: {info.summary}." for name, info in METHOD_INFO.items()))
@click.option("--bits", type=click.Choice([str(bits) for bits in BITS]), default="8",
              show_default=True, help="Bits per code.")
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
      qz explain 1.6 -0.7 -3.4 1.7 -2.9 0.5 2.3 6.2 --method mxfp4
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
    # The tutorial's rule: the full range of each group, never clipped. The microscaling
    # types have their own groups.
    microscaling = METHOD_INFO[method].microscaling
    scheme = Scheme(method, "block" if block_size or microscaling else "tensor",  # type: ignore[arg-type]
                    block_size, clip="none", bits=int(bits))
    _stdout_console().print(views.explain_view(explain_steps(numbers, scheme)))


def main() -> None:
    """Console-script entry point."""
    signal.signal(signal.SIGTERM, terminate)
    qz(prog_name="qz")
