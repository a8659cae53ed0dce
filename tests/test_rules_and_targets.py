"""--rule (per-tensor overrides), --target-bits (bits where they matter) and the patterns
that must each do something."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import read_with_safetensors, run_fail, run_ok, write_safetensors
from quantize_cli.cli.main import qz
from quantize_cli.core.scheme import Scheme
from quantize_cli.errors import SchemeError
from quantize_cli.formats import format_named
from quantize_cli.jobs import quantize_checkpoint
from quantize_cli.jobs.plan import LADDER, candidate_schemes
from quantize_cli.jobs.rules import parse_rule, rule_for

# ------------------------------------------------------------------------------ rules


@pytest.mark.parametrize(("text", "expected"), [
    ("*.mlp.*=int4", Scheme("absmax", "block", 128, "mse", 4)),
    ("*=int4,block32", Scheme("absmax", "block", 32, "mse", 4)),
    ("*=affine,channel", Scheme("affine", "channel", None, "none", 8)),
    ("*=tensor", Scheme("absmax", "tensor", None, "mse", 8)),  # auto clip, per tensor
    ("*=fp8", Scheme("fp8", "block", 128, "none", 8)),
    ("a=b=INT4 , BLOCK64", Scheme("absmax", "block", 64, "mse", 4)),  # the last '=' splits
])
def test_a_rule_changes_what_it_says_and_keeps_the_rest(text: str, expected: Scheme) -> None:
    assert parse_rule(text, Scheme()).scheme == expected


def test_an_explicit_clip_carries_over_where_it_applies() -> None:
    base = Scheme("absmax", "block", 32, "weighted", 4)
    assert parse_rule("*=block64", base).scheme == Scheme("absmax", "block", 64, "weighted", 4)
    # weighted is a below-8-bits search: at 8 bits the scheme's own default applies
    assert parse_rule("*=int8", base).scheme == Scheme("absmax", "block", 32, "none", 8)


@pytest.mark.parametrize(("text", "message"), [
    ("int4", "is not GLOB=SCHEME"),
    ("*=", "is not GLOB=SCHEME"),
    ("*=int9", "bits must be one of 2, 3, 4, 5, 6, 7, 8, got 9"),
    ("*=blk", "'blk' is not a choice qz knows"),
    ("*=channel,block32", "gives the granularity twice"),
    ("*=int4,int8", "gives the bits twice"),
])
def test_malformed_rules_are_refused_with_the_rule_named(text: str, message: str) -> None:
    with pytest.raises(SchemeError, match=message) as raised:
        parse_rule(text, Scheme())
    assert repr(text) in raised.value.message


def test_the_last_matching_rule_wins() -> None:
    rules = [parse_rule(text, Scheme()) for text in ("*=int4", "b.*=keep", "b.w=int8")]
    assert rule_for("a.w", rules) is rules[0]
    assert rule_for("b.v", rules) is rules[1]
    assert rule_for("b.w", rules) is rules[2]
    assert rule_for("a.w", []) is None


def model(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    arrays = {
        "layers.0.attn.weight": rng.standard_normal((64, 256)).astype(np.float32),
        "layers.0.mlp.weight": rng.standard_t(3, (64, 256)).astype(np.float32),
        "layers.1.attn.weight": rng.standard_normal((64, 256)).astype(np.float32) * 0.1,
        "layers.1.mlp.weight": rng.standard_normal((128, 256)).astype(np.float32),
        "norm.weight": np.ones(256, np.float32),
    }
    return write_safetensors(tmp_path / "m.safetensors", arrays)


def report_of(stdout: str) -> dict[str, dict]:
    return {t["name"]: t for t in json.loads(stdout)["tensors"]}


def test_rules_decide_tensors_and_the_dry_run_says_which(tmp_path: Path,
                                                         runner: CliRunner) -> None:
    source = model(tmp_path)
    stdout = run_ok(runner, "quantize", str(source), "--bits", "4", "--dry-run", "--json", "-",
                    "--rule", "*.mlp.*=int8", "--rule", "layers.1.*=keep",
                    "--rule", "layers.1.attn.*=affine,channel")
    tensors = report_of(stdout)
    assert tensors["layers.0.attn.weight"]["scheme"]["bits"] == 4
    assert tensors["layers.0.attn.weight"]["reason"] == "F32, 2-D"
    assert tensors["layers.0.mlp.weight"]["scheme"]["bits"] == 8
    assert tensors["layers.0.mlp.weight"]["reason"] == "--rule *.mlp.*=int8"
    assert tensors["layers.1.mlp.weight"]["action"] == "copy"
    assert tensors["layers.1.mlp.weight"]["reason"] == "--rule layers.1.*=keep"
    attn = tensors["layers.1.attn.weight"]["scheme"]
    assert (attn["method"], attn["granularity"], attn["bits"]) == ("affine", "channel", 4)
    assert tensors["norm.weight"]["action"] == "copy"  # rules never select
    assert json.loads(stdout)["totals"]["schemes"] == {
        "int4 absmax block 128, mse clip": 1, "absmax block 128": 1,
        "int4 affine channel, mse clip": 1, "kept": 1}


def test_rules_are_recorded_and_round_trip(tmp_path: Path, runner: CliRunner) -> None:
    source = model(tmp_path)
    run_ok(runner, "quantize", str(source), "-q", "--rule", "*.mlp.*=int4,affine,block64")
    output = tmp_path / "m.int8.safetensors"
    metadata, _ = read_with_safetensors(output)
    assert json.loads(metadata["qz.options"])["rules"] == ["*.mlp.*=int4,affine,block64"]
    assert "--rule '*.mlp.*=int4,affine,block64'" in metadata["qz.command"]
    inspected = run_ok(runner, "inspect", str(output), "--json")
    described = {t["name"]: t["stored_as"] for t in json.loads(inspected)["tensors"]}
    assert described["layers.0.mlp.weight"] == "INT4 affine block 64, mse clip"
    assert described["layers.0.attn.weight"] == "INT8 absmax block 128"
    run_ok(runner, "dequantize", str(output), "-q")


@pytest.mark.parametrize(("flags", "code", "message"), [
    (["--rule", "norm.*=int4"], 1, "matches only tensors qz does not quantize "
                                   "(norm.weight: 1-D tensor)"),
    (["--rule", "*.mlp.*=int4", "--rule", "*.mlp.*=keep"], 1,
     "--rule '*.mlp.*=int4' is overridden by later rules"),
    (["--include", "nothing.*"], 1, "--include 'nothing.*' matches no tensor"),
    (["--target-sqnr", "-5"], 2, "'--target-sqnr': -5 is not a positive number of dB"),
    (["--target-sqnr", "nan"], 2, "'--target-sqnr': nan is not a positive number of dB"),
    (["--target-bits", "0"], 2, "'--target-bits': 0 is not an average number of bits per "
                                "weight (above 0, below 64)"),
    (["--target-bits", "3.5"], 1, "cannot be stored in 3.5 bits per weight: the smallest "
                                  "schemes the format allows need 4.0"),
])
def test_patterns_and_targets_that_cannot_do_anything_are_refused(
        tmp_path: Path, runner: CliRunner, flags: list[str], code: int, message: str) -> None:
    source = model(tmp_path)
    stderr = run_fail(runner, code, "quantize", str(source), "--dry-run", *flags)
    assert message in stderr
    assert not (tmp_path / "m.int8.safetensors").exists()


@pytest.mark.parametrize(("flags", "warning"), [
    (["--exclude", "lm_head*"], "--exclude 'lm_head*' matches no tensor"),
    (["--rule", "nothing.*=int4"], "--rule 'nothing.*=int4' matches no tensor"),
])
def test_patterns_that_match_nothing_are_warnings(tmp_path: Path, flags: list[str],
                                                  warning: str) -> None:
    # One command run over many models: lm_head* on a model whose head is tied.
    source = model(tmp_path)
    written = CliRunner().invoke(qz, ["quantize", str(source), "-q", *flags])
    assert written.exit_code == 0 and written.stdout == ""
    assert written.stderr == f"Warning: {warning}\n"  # even with -q
    assert (tmp_path / "m.int8.safetensors").is_file()
    planned = CliRunner().invoke(qz, ["quantize", str(source), "--dry-run", "--json", "-",
                                      "--force", *flags])
    assert planned.exit_code == 0 and planned.stderr == f"Warning: {warning}\n"
    assert json.loads(planned.stdout)["warnings"] == [warning]


def test_keep_rules_work_in_compressed_tensors(tmp_path: Path, runner: CliRunner) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    rng = np.random.default_rng(0)
    write_safetensors(folder / "model.safetensors", {
        f"model.layers.0.{name}.weight": rng.standard_normal((64, 128)).astype(np.float32)
        for name in ("mlp.up_proj", "mlp.down_proj")})
    (folder / "config.json").write_text('{"model_type": "llama"}')
    run_ok(runner, "quantize", str(folder), "--format", "compressed-tensors", "-q",
           "--rule", "*.down_proj.weight=keep")
    config = json.loads((tmp_path / "model.ct-w8a16" / "config.json").read_text())
    assert "model.layers.0.mlp.down_proj" in config["quantization_config"]["ignore"]


# ----------------------------------------------------------------------- target bits


def candidates_by_run(source: Path, tmp_path: Path) -> dict[str, list[tuple[int, float]]]:
    """(output bytes, squared error) of keeping each tensor, and of every scheme of the
    qz format, each measured by a plain run with that one scheme."""
    _, arrays = read_with_safetensors(source)
    found: dict[str, list[tuple[int, float]]] = {}
    for number, scheme in enumerate(candidate_schemes(Scheme(), format_named("qz"), (4, 8))):
        report = quantize_checkpoint(source, tmp_path / f"{number}.safetensors", scheme,
                                     hash_source=False)
        for tensor in report.quantized:
            assert tensor.stats is not None
            found.setdefault(tensor.name, [(len(arrays[tensor.name][2]), 0.0)]).append(
                (tensor.output_bytes, tensor.stats.error_energy))
    return found


@pytest.mark.parametrize("target_bits", [4.3, 5.0, 6.5, 9.0])
def test_target_bits_finds_the_least_error_within_the_budget(
        tmp_path: Path, runner: CliRunner, target_bits: float) -> None:
    source = model(tmp_path)
    stdout = run_ok(runner, "quantize", str(source), "--target-bits", str(target_bits),
                    "-q", "--json", "-")
    document = json.loads(stdout)
    tensors = {t["name"]: t for t in document["tensors"] if t["selected"]}
    reached = document["totals"]["selected_bits_per_weight"]
    assert reached <= target_bits
    chosen_error = sum(t["stats"]["mse"] * np.prod(t["shape"]) if t["stats"] else 0.0
                       for t in tensors.values())
    # Brute force over every combination of candidates (11 per tensor, 4 tensors).
    (tmp_path / "runs").mkdir()
    options = candidates_by_run(source, tmp_path / "runs")
    assert set(options) == set(tensors)
    elements = sum(np.prod(t["shape"]) for t in tensors.values())
    best = min(sum(error for _, error in combination)
               for combination in itertools.product(*options.values())
               if 8 * sum(size for size, _ in combination) <= target_bits * elements)
    assert chosen_error <= best * (1 + 1e-9)
    assert f"--target-bits {target_bits:g}:" in tensors["layers.0.mlp.weight"]["reason"]


def test_target_bits_with_target_sqnr_reaches_both(tmp_path: Path, runner: CliRunner) -> None:
    source = model(tmp_path)
    document = json.loads(run_ok(runner, "quantize", str(source), "--target-bits", "8.5",
                                 "--target-sqnr", "30", "-q", "--json", "-"))
    assert document["totals"]["selected_bits_per_weight"] <= 8.5
    for tensor in document["tensors"]:
        if tensor["stats"] is not None:
            assert tensor["stats"]["sqnr_db"] >= 30
    stderr = run_fail(runner, 1, "quantize", str(source), "--target-bits", "4.5",
                      "--target-sqnr", "30", "--dry-run", "--force")
    assert "that reach 30 dB need" in stderr


def test_target_bits_report_shows_the_allocation(tmp_path: Path, runner: CliRunner) -> None:
    source = model(tmp_path)
    stdout = run_ok(runner, "quantize", str(source), "--target-bits", "5")
    assert "Schemes: " in stdout
    reached = float(stdout.split("Selected tensors: ")[1].split(" bits")[0])
    assert reached <= 5
    assert "(target 5)" in stdout


def test_target_ladder_is_cheapest_first() -> None:
    sizes = [Scheme("absmax", g, b).scale_shape((4096, 4096)) for g, b in LADDER]  # type: ignore[arg-type]
    counts = [int(np.prod(shape)) for shape in sizes]
    assert counts == sorted(counts)
