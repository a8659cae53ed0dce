"""`qz quantize` through click's CliRunner: exit codes, stdout, stderr and the files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import read_with_safetensors, run_fail, run_ok, sha256, to_array, write_safetensors
from quantize_cli import Scheme, quantize


def test_default_quantize_writes_int8_file_and_prints_the_table(runner: CliRunner,
                                                                 small_model: Path) -> None:
    before = sha256(small_model)
    stdout = run_ok(runner, "quantize", str(small_model))
    output = small_model.with_name("model.int8.safetensors")
    assert output.exists()
    assert sha256(small_model) == before
    for text in ("Quantization error per tensor", "a.weight", "absmax block 128", "SQNR dB",
                 "copied: 1-D tensor", "copied: integer dtype I64",
                 "Tensors: 3 quantized, 2 copied unchanged", "Pooled: SQNR", "Worst:",
                 f"Wrote {output}"):
        assert text in stdout
    metadata, tensors = read_with_safetensors(output)
    assert sorted(tensors) == ["a.weight", "a.weight_scale", "b.weight", "b.weight_scale",
                               "c.weight", "c.weight_scale", "norm.weight", "position_ids"]
    assert tensors["a.weight"][:2] == ("I8", [8, 160])
    assert tensors["a.weight_scale"][:2] == ("F32", [8, 2])  # 160 = 128 + a 32-long tail
    assert tensors["norm.weight"][0] == "BF16"
    assert metadata["format"] == "pt"
    assert metadata["qz.format_version"] == "1"
    assert json.loads(metadata["qz.tensors"])["a.weight"] == {
        "method": "absmax", "granularity": "block", "block": 128, "dtype": "BF16"}
    assert set(os.listdir(small_model.parent)) == {"model.safetensors", "model.int8.safetensors"}


def test_codes_in_the_file_equal_the_library_result(runner: CliRunner, small_model: Path) -> None:
    output = small_model.with_name("out.safetensors")
    run_ok(runner, "quantize", str(small_model), "--method", "affine", "--block", "64",
           "-o", str(output), "-q")
    _, original = read_with_safetensors(small_model)
    _, written = read_with_safetensors(output)
    expected = quantize(to_array(*original["a.weight"]), Scheme("affine", "block", 64))
    assert to_array(*written["a.weight"]).tobytes() == expected.codes.tobytes()
    assert to_array(*written["a.weight_scale"]).tobytes() == expected.scale.tobytes()
    assert expected.zero_point is not None
    assert to_array(*written["a.weight_zero_point"]).tobytes() == expected.zero_point.tobytes()


@pytest.mark.parametrize("flag,scale_shape", [("--per-channel", [8, 1]), ("--per-tensor", [1]),
                                               ("--block=32", [8, 5])])
def test_granularity_options(runner: CliRunner, small_model: Path, flag: str,
                             scale_shape: list[int]) -> None:
    output = small_model.with_name("out.safetensors")
    run_ok(runner, "quantize", str(small_model), flag, "-o", str(output), "-q")
    _, tensors = read_with_safetensors(output)
    assert tensors["a.weight_scale"][1] == scale_shape


def test_two_granularities_are_a_usage_error(runner: CliRunner, small_model: Path) -> None:
    stderr = run_fail(runner, 2, "quantize", str(small_model), "--per-channel", "--block", "64")
    assert "choose one granularity, not --block and --per-channel" in stderr


@pytest.mark.parametrize("value", ["0", "-4", "3.5", "abc"])
def test_bad_block_size_is_a_usage_error(runner: CliRunner, small_model: Path,
                                         value: str) -> None:
    stderr = run_fail(runner, 2, "quantize", str(small_model), "--block", value)
    assert "--block" in stderr


def test_unknown_method_is_a_usage_error(runner: CliRunner, small_model: Path) -> None:
    stderr = run_fail(runner, 2, "quantize", str(small_model), "--method", "foo")
    assert "'foo' is not one of 'absmax', 'affine'" in stderr


def test_json_to_stdout(runner: CliRunner, small_model: Path) -> None:
    stdout = run_ok(runner, "quantize", str(small_model), "--json", "-")
    report = json.loads(stdout)
    assert report["command"] == "quantize" and report["dry_run"] is False
    assert report["scheme"] == {"method": "absmax", "granularity": "block", "block": 128,
                                "clip": "none", "bits": 8, "label": "INT8",
                                "activations": None}
    by_name = {t["name"]: t for t in report["tensors"]}
    assert by_name["norm.weight"]["action"] == "copy"
    assert by_name["norm.weight"]["reason"] == "1-D tensor"
    stats = by_name["b.weight"]["stats"]
    assert 35 < stats["sqnr_db"] < 50 and 0.999 < stats["cosine_similarity"] <= 1
    totals = report["totals"]
    assert totals["quantized_tensors"] == 3 and totals["copied_tensors"] == 2
    assert totals["input_bytes"] > totals["output_bytes"]
    assert len(totals["worst"]) == 3


def test_json_to_file_and_table_to_stdout(runner: CliRunner, small_model: Path) -> None:
    report_path = small_model.with_name("report.json")
    stdout = run_ok(runner, "quantize", str(small_model), "--json", str(report_path))
    assert "Quantization error per tensor" in stdout
    assert json.loads(report_path.read_text())["totals"]["quantized_tensors"] == 3


def test_quiet_prints_nothing(runner: CliRunner, small_model: Path) -> None:
    assert run_ok(runner, "quantize", str(small_model), "--quiet") == ""
    assert small_model.with_name("model.int8.safetensors").exists()


def test_dry_run_writes_nothing(runner: CliRunner, small_model: Path) -> None:
    stdout = run_ok(runner, "quantize", str(small_model), "--dry-run")
    assert "Plan (dry run)" in stdout and "nothing written" in stdout
    assert "1-D tensor" in stdout and "BF16, 2-D" in stdout
    assert os.listdir(small_model.parent) == ["model.safetensors"]


def test_include_and_exclude(runner: CliRunner, small_model: Path) -> None:
    report = json.loads(run_ok(runner, "quantize", str(small_model), "--dry-run", "--json", "-",
                               "--include", "*.weight", "--exclude", "b.*"))
    actions = {t["name"]: (t["action"], t["reason"]) for t in report["tensors"]}
    assert actions["a.weight"] == ("quantize", "matches --include '*.weight'")
    assert actions["norm.weight"] == ("quantize", "matches --include '*.weight'")
    assert actions["b.weight"] == ("copy", "matches --exclude 'b.*'")
    assert actions["position_ids"] == ("copy", "integer dtype I64")


def test_existing_output_needs_force(runner: CliRunner, small_model: Path) -> None:
    output = small_model.with_name("model.int8.safetensors")
    output.write_bytes(b"keep me")
    stderr = run_fail(runner, 1, "quantize", str(small_model))
    assert stderr == (f"Error: {output}: already exists\nHint: use --force to replace it\n")
    # --force replaces only what qz wrote.
    stderr = run_fail(runner, 1, "quantize", str(small_model), "--force")
    assert stderr == (f"Error: {output}: was not written by qz; --force replaces only qz's "
                      "own outputs\nHint: choose another path with -o\n")
    assert output.read_bytes() == b"keep me"
    output.unlink()
    run_ok(runner, "quantize", str(small_model), "-q")
    first = output.read_bytes()
    run_ok(runner, "quantize", str(small_model), "--force", "-q", "--method", "affine",
           "-o", str(output))
    assert output.read_bytes() != first


def test_output_may_not_be_the_input(runner: CliRunner, small_model: Path) -> None:
    before = sha256(small_model)
    stderr = run_fail(runner, 1, "quantize", str(small_model), "-o", str(small_model), "--force")
    assert "output would overwrite the input" in stderr
    assert sha256(small_model) == before


def test_a_quantized_input_is_quantized_again_from_its_values(runner: CliRunner,
                                                               small_model: Path) -> None:
    run_ok(runner, "quantize", str(small_model), "-q")
    int8 = small_model.with_name("model.int8.safetensors")
    # Its default output name is its own: refused, not overwritten.
    stderr = run_fail(runner, 1, "quantize", str(int8))
    assert stderr == (f"Error: {int8}: output would overwrite the input\n"
                      "Hint: choose another path with -o\n")
    report = json.loads(run_ok(runner, "quantize", str(int8), "--bits", "4", "--json", "-"))
    assert report["output"] == str(small_model.with_name("model.int4.safetensors"))
    assert report["notes"] == [
        "the input is quantized (qz: INT8 absmax block 128): its 3 quantized weights were "
        "read as the values they stand for, and errors are measured against those values"]
    # The error is the INT4 error of the INT8 values, which qz diff measures too.
    restored = small_model.with_name("int8.safetensors")
    run_ok(runner, "dequantize", str(int8), "-o", str(restored), "--dtype", "float32", "-q")
    compared = json.loads(run_ok(runner, "diff", str(restored),
                                 str(small_model.with_name("model.int4.safetensors")),
                                 "--json"))
    theirs = {t["name"]: t["stats"]["sqnr_db"] for t in compared["tensors"]}
    ours = {t["name"]: t["stats"]["sqnr_db"] for t in report["tensors"] if t["stats"]}
    assert ours == pytest.approx({name: theirs[name] for name in ours}, abs=0.05)


def test_nan_is_refused_and_nothing_is_written(runner: CliRunner, tmp_path: Path) -> None:
    values = np.ones((4, 512), np.float32)
    values[3, 100] = np.nan
    values[3, 300] = np.inf
    path = write_safetensors(tmp_path / "m.safetensors", {"w": values})
    stderr = run_fail(runner, 1, "quantize", str(path))
    assert stderr.splitlines()[0] == (
        f"Error: {path}: tensor 'w': 2 non-finite values (NaN or ±inf), first at index [3, 100]")
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_nan_found_in_a_later_chunk_reports_the_whole_tensor(tmp_path: Path) -> None:
    from quantize_cli.errors import NonFiniteValuesError
    from quantize_cli.jobs import quantize_checkpoint

    values = np.ones((64, 32), np.float32)
    values[40, 5] = np.nan
    values[63, 0] = -np.inf
    path = write_safetensors(tmp_path / "m.safetensors", {"w": values})
    with pytest.raises(NonFiniteValuesError) as caught:
        quantize_checkpoint(path, chunk_bytes=256)  # two rows a chunk
    assert (caught.value.count, caught.value.first_index) == (2, (40, 5))


def test_scale_name_collision_is_refused(runner: CliRunner, tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "m.safetensors", {
        "w": np.ones((32, 64), np.float32), "w_scale": np.ones(32, np.float32)})
    stderr = run_fail(runner, 1, "quantize", str(path))
    assert "tensor 'w_scale': collides with the name qz would give the scale of 'w'" in stderr


def test_nothing_to_quantize(runner: CliRunner, tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "m.safetensors", {"bias": np.ones(8, np.float32)})
    stderr = run_fail(runner, 1, "quantize", str(path))
    assert f"Error: {path}: has no tensor to quantize" in stderr
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    assert f"Error: {empty}: has no tensors" in run_fail(runner, 1, "quantize", str(empty))


def test_broken_file_is_one_clear_line(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    stderr = run_fail(runner, 1, "quantize", str(path))
    assert stderr.startswith(f"Error: {path}: header is not valid JSON")
    assert len(stderr.splitlines()) == 1


def test_missing_input(runner: CliRunner, tmp_path: Path) -> None:
    stderr = run_fail(runner, 1, "quantize", str(tmp_path / "nope.safetensors"))
    assert stderr == f"Error: {tmp_path / 'nope.safetensors'}: does not exist\n"


def test_float64_and_float16_inputs(runner: CliRunner, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = write_safetensors(tmp_path / "m.safetensors", {
        "d": rng.standard_normal((16, 128)), "h": rng.standard_normal((16, 128)).astype(np.float16),
        "b": rng.standard_normal((16, 128)).astype(ml_dtypes.bfloat16)})
    run_ok(runner, "quantize", str(path), "-q")
    metadata, _ = read_with_safetensors(tmp_path / "m.int8.safetensors")
    dtypes = {name: entry["dtype"] for name, entry in json.loads(metadata["qz.tensors"]).items()}
    assert dtypes == {"b": "BF16", "d": "F64", "h": "F16"}


def test_markup_and_escapes_in_names_are_shown_literally(runner: CliRunner,
                                                          tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "m.safetensors", {
        "w[bold red]x[/]": np.ones((32, 64), np.float32),
        "v\x1b[31m": np.ones((32, 64), np.float32)})
    stdout = run_ok(runner, "quantize", str(path))
    assert "w[bold red]x[/]" in stdout
    assert "v\\x1b[31m" in stdout and "\x1b" not in stdout


def test_output_is_deterministic(runner: CliRunner, small_model: Path) -> None:
    first, second = (small_model.with_name(f"{n}.safetensors") for n in ("one", "two"))
    run_ok(runner, "quantize", str(small_model), "--method", "affine", "-o", str(first), "-q")
    run_ok(runner, "quantize", str(small_model), "--method", "affine", "-o", str(second), "-q")
    assert first.read_bytes() == second.read_bytes()


def test_small_chunks_give_the_same_bytes(tmp_path: Path, small_model: Path) -> None:
    from quantize_cli.jobs import quantize_checkpoint

    for granularity in ("tensor", "channel", "block"):
        scheme = Scheme("affine", granularity, 64 if granularity == "block" else None)  # type: ignore[arg-type]
        whole = quantize_checkpoint(small_model, tmp_path / "whole.safetensors", scheme,
                                    force=True)
        chunked = quantize_checkpoint(small_model, tmp_path / "chunked.safetensors", scheme,
                                      force=True, chunk_bytes=300)  # ~1 row a chunk
        assert (tmp_path / "whole.safetensors").read_bytes() == \
            (tmp_path / "chunked.safetensors").read_bytes()
        for one, other in zip(whole.tensors, chunked.tensors, strict=True):
            if one.stats is not None:
                assert other.stats is not None
                assert one.stats.max_abs_error == other.stats.max_abs_error
                assert one.stats.sqnr_db == pytest.approx(other.stats.sqnr_db, rel=1e-6)


def test_no_stats_writes_the_same_bytes(runner: CliRunner, small_model: Path) -> None:
    with_stats, without = (small_model.with_name(f"{n}.safetensors") for n in ("a", "b"))
    run_ok(runner, "quantize", str(small_model), "-o", str(with_stats), "-q")
    report = json.loads(run_ok(runner, "quantize", str(small_model), "-o", str(without),
                               "--no-stats", "--json", "-"))
    assert with_stats.read_bytes() == without.read_bytes()
    assert all(t["stats"] is None for t in report["tensors"])
    assert report["totals"]["pooled"] is None
    table = run_ok(runner, "quantize", str(small_model), "-o", str(without), "--no-stats",
                   "--force")
    assert "absmax block 128" in table and "copied: 1-D tensor" in table
    assert "Pooled" not in table and f"Wrote {without}" in table


# --------------------------------------- say what will happen, and what went wrong, in one line


def test_the_dry_run_refuses_what_the_run_would(runner: CliRunner, small_model: Path) -> None:
    run_ok(runner, "quantize", str(small_model), "-q")
    stderr = run_fail(runner, 1, "quantize", str(small_model), "--dry-run")
    assert stderr == (f"Error: {small_model.with_name('model.int8.safetensors')}: already "
                      "exists\nHint: use --force to replace it\n")
    assert "Would write" in run_ok(runner, "quantize", str(small_model), "--dry-run", "--force")


def test_worst_zero_prints_the_summary_alone(runner: CliRunner, small_model: Path) -> None:
    stdout = run_ok(runner, "quantize", str(small_model), "--worst", "0")
    assert "│" not in stdout and "Quantization error" not in stdout
    assert stdout.startswith("Tensors: 3 quantized, 2 copied unchanged\n")


@pytest.mark.parametrize(("flags", "name"), [
    ([], "model.int8.safetensors"),
    (["--method", "affine"], "model.int8-affine.safetensors"),
    (["--per-channel"], "model.int8-channel.safetensors"),
    (["--block", "64"], "model.int8-g64.safetensors"),
    (["--bits", "4"], "model.int4.safetensors"),
    (["--bits", "4", "--method", "affine", "--block", "64"], "model.int4-affine-g64.safetensors"),
    (["--method", "fp8"], "model.fp8.safetensors"),
    (["--method", "fp8", "--per-channel"], "model.fp8-channel.safetensors"),
    (["--clip", "none", "--bits", "4"], "model.int4-clip-none.safetensors"),
    (["--format", "compressed-tensors"], "model.ct-w8a16"),
    (["--format", "compressed-tensors", "--per-channel"], "model.ct-int8-channel"),
    (["--format", "compressed-tensors", "--block", "64"], "model.ct-int8-g64"),
    (["--format", "compressed-tensors", "--scheme", "W4A16_ASYM"], "model.ct-w4a16-asym"),
    (["--format", "mlx", "--bits", "4"], "model.mlx-int4"),
])
def test_default_names_say_the_scheme(runner: CliRunner, tmp_path: Path, flags: list[str],
                                      name: str) -> None:
    # Two different exports of one model never take the same name.
    source = write_safetensors(tmp_path / "model.safetensors", {
        "layers.0.mlp.up_proj.weight": np.ones((128, 256), np.float32)})
    report = json.loads(run_ok(runner, "quantize", str(source), "--dry-run", "--json",
                               "-", *flags))
    assert report["output"] == str(source.with_name(name))


def test_every_default_name_differs_and_dequantize_keeps_it(runner: CliRunner,
                                                             small_model: Path) -> None:
    for flags in (["--per-channel"], ["--block", "64"], ["--method", "affine"]):
        run_ok(runner, "quantize", str(small_model), "-q", *flags)
    written = sorted(os.listdir(small_model.parent))
    assert written == ["model.int8-affine.safetensors", "model.int8-channel.safetensors",
                       "model.int8-g64.safetensors", "model.safetensors"]
    run_ok(runner, "dequantize", str(small_model.with_name(written[0])), "-q")
    run_ok(runner, "dequantize", str(small_model.with_name(written[1])), "-q")
    assert small_model.with_name("model.int8-affine.dequant.safetensors").is_file()
    assert small_model.with_name("model.int8-channel.dequant.safetensors").is_file()


@pytest.mark.parametrize(("start", "what"), [
    (b"PK\x03\x04", "is a PyTorch checkpoint (a zip archive, as torch.save writes)"),
    (b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8", "is a PyTorch checkpoint (a Python pickle)"),
    (b"GGUF\x03\x00\x00\x00", "is a GGUF file (llama.cpp's format)"),
])
def test_weights_in_other_formats_are_named(runner: CliRunner, tmp_path: Path, start: bytes,
                                            what: str) -> None:
    path = tmp_path / "model.pth"
    path.write_bytes(start + bytes(200))
    stderr = run_fail(runner, 1, "inspect", str(path))
    assert stderr.startswith(f"Error: {path}: {what}, not a safetensors file\nHint: ")
    assert len(stderr.splitlines()) == 2


def test_a_header_whose_length_starts_like_a_pickle_is_read(runner: CliRunner,
                                                            tmp_path: Path) -> None:
    # 0x280 = 640 bytes of header: the file starts with b"\x80\x02", as a pickle does.
    names = {f"layer_{index:03d}.weight": np.ones((4, 4), np.float32) for index in range(6)}
    path = write_safetensors(tmp_path / "m.safetensors", names)
    length = int.from_bytes(path.read_bytes()[:8], "little")
    padded = 0x280
    assert length <= padded
    data = path.read_bytes()
    path.write_bytes(padded.to_bytes(8, "little") + data[8:8 + length]
                     + b" " * (padded - length) + data[8 + length:])
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert "6 tensors" in run_ok(runner, "inspect", str(path))


@pytest.mark.parametrize(("args", "message"), [
    (["diff", "{m}", "{m}", "--fail-under", "nan"], "nan is not a number of dB (or inf)"),
    (["quantize", "{m}", "--target-sqnr", "nan"], "nan is not a positive number of dB"),
    (["quantize", "{m}", "--target-bits", "inf"], "inf is not an average number of bits"),
    (["quantize", "{m}", "--rule", "a.*=int9"], "--rule 'a.*=int9'"),
    (["quantize", "{m}", "--scheme", "W9A9"], "unknown --scheme 'W9A9'"),
    (["quantize", "{m}", "--method", "fp8", "--bits", "4"], "--bits"),
    (["quantize", "{m}", "--method", "affine", "--format", "compressed-tensors"],
     "affine is not supported at 8 bits"),
    (["quantize", "{m}", "--tensor-parallel", "2"], "--tensor-parallel applies to"),
])
def test_invalid_option_values_are_usage_errors(runner: CliRunner, small_model: Path,
                                                args: list[str], message: str) -> None:
    # Exit 2, before any input is read, whatever part of qz finds the value wrong.
    stderr = run_fail(runner, 2, *(arg.format(m=small_model) for arg in args))
    assert message in stderr
    assert os.listdir(small_model.parent) == ["model.safetensors"]
