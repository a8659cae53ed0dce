"""The bad-input checklist (docs/RELIABILITY.md): every row, built from bytes.

For each refused input: the documented exit code, one ``Error:`` line (and perhaps a
``Hint:``) on stderr naming the file, the tensor where there is one, and the rule; nothing
on stdout; no traceback; no output and no temporary file; the input unchanged. Rows that
qz accepts on purpose are checked to succeed. Sharded-checkpoint rows (H) are in
test_sharded.py, faults and signals in test_faults.py.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import raw_safetensors, read_with_safetensors, snapshot, to_array
from quantize_cli.cli.main import qz

WEIGHT = np.linspace(-1, 1, 32 * 64, dtype=np.float32).reshape(32, 64)
VALID_ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def header_file(header: bytes | str, data: bytes = b"") -> bytes:
    encoded = header.encode() if isinstance(header, str) else header
    return struct.pack("<Q", len(encoded)) + encoded + data


def one_tensor(entry: dict[str, object], data: bytes = b"\0" * 8, **extra: object) -> bytes:
    return header_file(json.dumps({"a": entry, **extra}), data)


def weight_file(**arrays: np.ndarray) -> bytes:
    tensors = {"w": WEIGHT, **arrays}
    codes = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64",
             np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
             np.dtype(np.int64): "I64", np.dtype(np.bool_): "BOOL", np.dtype(np.int8): "I8"}
    return raw_safetensors({name: (codes[a.dtype], list(a.shape), a.tobytes())
                            for name, a in tensors.items()})


# (id, file bytes, extra CLI arguments, exit code, fragment of stderr)
BAD_FILES: list[tuple[str, bytes, list[str], int, str]] = [
    ("A05-empty-file", b"", [], 1, "file too short for a safetensors header (0 bytes)"),
    ("A06-three-bytes", b"\x05\x00\x00", [], 1,
     "file too short for a safetensors header (3 bytes)"),
    ("B09-length-past-end", struct.pack("<Q", 1000) + b"{}" + b"\0" * 40, [], 1,
     "header length 1,000 exceeds the file size (50 bytes)"),
    ("B10-length-2^40", struct.pack("<Q", 2**40) + b"{}", [], 1,
     "header too large (1,099,511,627,776 bytes; the limit is 100,000,000)"),
    ("B10-length-2^64-1", struct.pack("<Q", 2**64 - 1) + b"{}", [], 1, "header too large"),
    ("B11-length-0", struct.pack("<Q", 0) + b"{}", [], 1,
     "header is empty, expected a JSON object"),
    ("C12-not-utf8", header_file(b"\xff\xfe\x7b\x7d"), [], 1, "header is not valid UTF-8 (byte 0)"),
    ("C13-bom", header_file(b"\xef\xbb\xbf{}"), [], 1,
     "header must be a JSON object starting with '{'"),
    ("C14-not-json", header_file("{not json}"), [], 1, "header is not valid JSON: Expecting"),
    ("C14-truncated-json", header_file('{"a":'), [], 1, "header is not valid JSON"),
    ("C15-array", header_file("[1,2,3]"), [], 1, "header must be a JSON object"),
    ("C15-string", header_file('"x"'), [], 1, "header must be a JSON object"),
    ("C15-number", header_file("42"), [], 1, "header must be a JSON object"),
    ("C16-nan-token", header_file('{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}',
                                  b"\0" * 4), [], 1, "header is not valid JSON (NaN is not JSON)"),
    ("C16-infinity-token", header_file('{"a":{"dtype":"F32","shape":[Infinity],'
                                       '"data_offsets":[0,4]}}', b"\0" * 4), [], 1,
     "Infinity is not JSON"),
    ("C17-deep-nesting", header_file('{"a":' + "[" * 100_000), [], 1, "header"),
    ("C18-duplicate-tensor", header_file('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                                         '"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
                                         b"\0" * 8), [], 1, "duplicate key 'a' in header"),
    ("C19-duplicate-metadata-key", header_file('{"__metadata__":{"k":"1","k":"2"}}'), [], 1,
     "duplicate key 'k' in header"),
    ("C20-metadata-int", header_file('{"__metadata__":{"k":1}}'), [], 1,
     "metadata value for 'k' must be a string, got int"),
    ("C20-metadata-object", header_file('{"__metadata__":{"k":{"x":"y"}}}'), [], 1,
     "metadata value for 'k' must be a string, got dict"),
    ("C20-metadata-null", header_file('{"__metadata__":{"k":null}}'), [], 1,
     "metadata value for 'k' must be a string, got NoneType"),
    ("C21-metadata-array", header_file('{"__metadata__":[]}'), [], 1,
     "__metadata__ must be an object of strings"),
    ("C22-entry-not-object", header_file('{"a":5}'), [], 1,
     "tensor 'a': entry must be an object with dtype, shape and data_offsets"),
    ("C22-missing-field", header_file('{"a":{"dtype":"F32","shape":[2]}}'), [], 1,
     "tensor 'a': entry lacks data_offsets"),
    ("C22-unknown-field", one_tensor({**VALID_ENTRY, "foo": 1}), [], 1,
     "tensor 'a': entry has unknown field(s) foo"),
    ("C23-unknown-dtype", one_tensor({**VALID_ENTRY, "dtype": "F128"}), [], 1,
     "tensor 'a': unknown dtype 'F128'"),
    ("C23-lowercase-dtype", one_tensor({**VALID_ENTRY, "dtype": "float32"}), [], 1,
     "unknown dtype 'float32'"),
    ("C24-negative-dim", one_tensor({**VALID_ENTRY, "shape": [-1]}), [], 1,
     "tensor 'a': shape must be a list of non-negative integers"),
    ("C24-float-dim", one_tensor({**VALID_ENTRY, "shape": [2.0]}), [], 1,
     "shape must be a list of non-negative integers"),
    ("C24-bool-dim", one_tensor({**VALID_ENTRY, "shape": [True]}), [], 1,
     "shape must be a list of non-negative integers"),
    ("C24-string-dim", one_tensor({**VALID_ENTRY, "shape": ["2"]}), [], 1,
     "shape must be a list of non-negative integers"),
    ("C24-null-dim", one_tensor({**VALID_ENTRY, "shape": [None]}), [], 1,
     "shape must be a list of non-negative integers"),
    ("C24-huge-dim", one_tensor({**VALID_ENTRY, "shape": [2**70]}), [], 1,
     "shape must be a list of non-negative integers"),
    ("C25-three-offsets", one_tensor({**VALID_ENTRY, "data_offsets": [0, 4, 8]}), [], 1,
     "tensor 'a': data_offsets must be [begin, end] with 0 ≤ begin ≤ end"),
    ("C25-negative-offset", one_tensor({**VALID_ENTRY, "data_offsets": [-8, 0]}), [], 1,
     "data_offsets must be [begin, end]"),
    ("C25-float-offsets", one_tensor({**VALID_ENTRY, "data_offsets": [0.0, 8.0]}), [], 1,
     "data_offsets must be [begin, end]"),
    ("C25-begin-after-end", one_tensor({**VALID_ENTRY, "data_offsets": [8, 0]}), [], 1,
     "data_offsets must be [begin, end]"),
    ("C26-lone-surrogate", header_file('{"\\ud800":{"dtype":"F32","shape":[2],'
                                       '"data_offsets":[0,8]}}', b"\0" * 8), [], 1,
     "tensor name '\\ud800' is not valid Unicode (lone surrogate)"),
    ("C27-no-tensors", header_file("{}"), [], 1, "has no tensors"),
    ("D29-overlap", header_file('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                                '"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
                                b"\0" * 8), [], 1, "tensor 'b': overlaps the previous tensor"),
    ("D30-hole", one_tensor({"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}), [], 1,
     "bytes 0–4 of the data section belong to no tensor"),
    ("D31-trailing-bytes", one_tensor(VALID_ENTRY, b"\0" * 10), [], 1,
     "2 unexpected bytes after the last tensor"),
    ("D32-truncated", one_tensor(VALID_ENTRY, b"\0" * 5), [], 1,
     "tensor 'a': ends at byte 8, past the end of the data section (5 bytes); the file is "
     "truncated"),
    ("D33-size-mismatch", one_tensor({**VALID_ENTRY, "shape": [3]}), [], 1,
     "tensor 'a': declares 12 bytes (F32 [3]) but its data_offsets span 8"),
    ("D34-overflowing-shape", one_tensor({**VALID_ENTRY, "shape": [2, 2**63]}), [], 1,
     "tensor 'a': shape [2, 9223372036854775808] is too large"),
    ("D35-offsets-past-end", one_tensor({**VALID_ENTRY, "data_offsets": [1000, 1008]}), [], 1,
     "bytes 0–1,000 of the data section belong to no tensor"),
    ("E38-nan", weight_file(v=np.where(np.eye(32, 64) > 0, np.nan, 1.0).astype(np.float32)),
     [], 1, "tensor 'v': 32 non-finite values (NaN or ±inf), first at index [0, 0]"),
    ("E39-inf", weight_file(v=np.full((32, 64), -np.inf, np.float32)), [], 1,
     "tensor 'v': 2048 non-finite values"),
    ("E39-f64-beyond-float32", weight_file(v=np.full((32, 64), 1e300)), [], 1,
     "tensor 'v': 2048 non-finite values"),
    ("E52-scale-name-taken", weight_file(w_scale=np.ones(32, np.float32)), [], 1,
     "tensor 'w_scale': collides with the name qz would give the scale of 'w'"),
    ("E52-zero-point-name-taken", weight_file(w_zero_point=np.ones(32, np.int8)),
     ["--method", "affine"], 1,
     "tensor 'w_zero_point': collides with the name qz would give the zero point of 'w'"),
    ("F53-block-0", weight_file(), ["--block", "0"], 2, "0 is not in the range x>=1"),
    ("F53-block-negative", weight_file(), ["--block", "-4"], 2, "not in the range x>=1"),
    ("F53-block-fraction", weight_file(), ["--block", "3.5"], 2, "'3.5' is not a valid integer"),
    ("F53-block-word", weight_file(), ["--block", "true"], 2, "'true' is not a valid integer"),
    ("F56-unknown-method", weight_file(), ["--method", "blockwise"], 2,
     "'blockwise' is not one of 'absmax', 'affine'"),
    ("F56-two-granularities", weight_file(), ["--per-tensor", "--per-channel"], 2,
     "choose one granularity, not --per-channel and --per-tensor"),
]


def assert_refused(runner: CliRunner, folder: Path, args: list[str], code: int,
                   fragment: str) -> str:
    before = snapshot(folder)
    result = runner.invoke(qz, args)
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert fragment in result.stderr, result.stderr
    if code == 1:
        lines = result.stderr.splitlines()
        assert lines[0].startswith("Error: ") and len(lines) <= 2, lines
        assert len(lines) == 1 or lines[1].startswith("Hint: ")
    assert snapshot(folder) == before  # no output, no temporary file, input unchanged
    return result.stderr


@pytest.mark.parametrize("data,extra,code,fragment",
                         [case[1:] for case in BAD_FILES], ids=[case[0] for case in BAD_FILES])
def test_bad_file(runner: CliRunner, tmp_path: Path, data: bytes, extra: list[str], code: int,
                  fragment: str) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    stderr = assert_refused(runner, tmp_path, ["quantize", str(path), *extra], code, fragment)
    if code == 1:
        assert f"Error: {path}: " in stderr  # every message names the file


@pytest.mark.parametrize("data,extra,code,fragment",
                         [case[1:] for case in BAD_FILES if case[0][0] in "ABCD"],
                         ids=[case[0] for case in BAD_FILES if case[0][0] in "ABCD"])
def test_bad_file_inspect(runner: CliRunner, tmp_path: Path, data: bytes, extra: list[str],
                          code: int, fragment: str) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    if fragment == "has no tensors":  # inspect shows an empty file; only quantize refuses
        result = runner.invoke(qz, ["inspect", str(path)])
        assert result.exit_code == 0 and "0 tensors" in result.stdout
        return
    assert_refused(runner, tmp_path, ["inspect", str(path)], code, fragment)


# ----------------------------------------------------------------- A: the file itself


def test_A01_missing_path(runner: CliRunner, tmp_path: Path) -> None:
    # Deliberate difference: exit 1 (qz's own message), not click's usage error 2.
    assert_refused(runner, tmp_path, ["quantize", str(tmp_path / "nope.safetensors")], 1,
                   f"Error: {tmp_path / 'nope.safetensors'}: does not exist")


def test_A02_directory_without_checkpoint(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    assert_refused(runner, tmp_path, ["quantize", str(tmp_path / "sub")], 1,
                   "folder holds no model.safetensors.index.json and 0 .safetensors files")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX only")
def test_A03_fifo_is_refused_without_blocking(runner: CliRunner, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.safetensors")
    assert_refused(runner, tmp_path, ["quantize", str(tmp_path / "pipe.safetensors")], 1,
                   "is not a regular file")


def test_A03_device_is_refused(runner: CliRunner, tmp_path: Path) -> None:
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    result = runner.invoke(qz, ["inspect", "/dev/zero"])
    assert result.exit_code == 1 and "Error: /dev/zero: is not a regular file" in result.stderr


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root ignores permission bits")
def test_A04_unreadable_file(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(weight_file())
    path.chmod(0)
    try:
        assert_refused(runner, tmp_path, ["quantize", str(path)], 1,
                       "cannot be read (Permission denied)")
    finally:
        path.chmod(0o644)


def test_A07_dangling_symlink_and_loop(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "dangling.safetensors").symlink_to(tmp_path / "gone")
    assert_refused(runner, tmp_path, ["quantize", str(tmp_path / "dangling.safetensors")], 1,
                   "does not exist")
    (tmp_path / "loop.safetensors").symlink_to(tmp_path / "loop.safetensors")
    assert_refused(runner, tmp_path, ["quantize", str(tmp_path / "loop.safetensors")], 1,
                   "cannot be read (Too many levels of symbolic links)")


def test_A08_file_truncated_while_being_read(runner: CliRunner, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from quantize_cli.storage.reader import SafetensorsReader

    path = tmp_path / "m.safetensors"
    path.write_bytes(weight_file(v=np.ones((64, 64), np.float32)))
    original = SafetensorsReader.read_into

    def truncate_then_read(self: SafetensorsReader, *args: object) -> None:
        os.truncate(path, 200)  # another process shortens the file under us
        original(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(SafetensorsReader, "read_into", truncate_then_read)
    result = runner.invoke(qz, ["quantize", str(path)])
    assert result.exit_code == 1 and result.stdout == ""
    assert "input changed while reading" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


# ------------------------------------------------------------ C, D: valid oddities


def test_C26_markup_and_escapes_in_names_and_metadata(runner: CliRunner,
                                                      tmp_path: Path) -> None:
    hostile = {"w[bold red]x[/]": WEIGHT, "v\x1b[31m\x07": WEIGHT}
    path = tmp_path / "m.safetensors"
    path.write_bytes(raw_safetensors(
        {name: ("F32", [32, 64], a.tobytes()) for name, a in hostile.items()},
        {"note[/]": "\x1b[2Jvalue[bold]"}))
    for command in (["inspect", str(path)], ["quantize", str(path), "--dry-run"]):
        result = runner.invoke(qz, command)
        assert result.exit_code == 0
        assert "w[bold red]x[/]" in result.stdout and "v\\x1b[31m\\x07" in result.stdout
        assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "\\x1b[2Jvalue[bold]" in runner.invoke(qz, ["inspect", str(path)]).stdout
    # ... and in error messages.
    bad = tmp_path / "bad.safetensors"
    nan = np.full((32, 64), np.nan, np.float32)
    bad.write_bytes(raw_safetensors({"n\x1b[31m[/]": ("F32", [32, 64], nan.tobytes())}))
    result = runner.invoke(qz, ["quantize", str(bad)])
    assert result.exit_code == 1 and "\x1b" not in result.stderr
    assert "tensor 'n\\x1b[31m[/]'" in result.stderr


def test_C28_many_entries(runner: CliRunner, tmp_path: Path) -> None:
    entries = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
               for i in range(100_000)}
    path = tmp_path / "m.safetensors"
    path.write_bytes(header_file(json.dumps(entries)))
    result = runner.invoke(qz, ["inspect", str(path), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["totals"]["tensors"] == 100_000


def test_D36_D37_unusual_but_valid_layouts_are_accepted(runner: CliRunner,
                                                        tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(header_file(
        '{"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},'
        '"e1":{"dtype":"F32","shape":[0],"data_offsets":[8,8]},'
        '"e2":{"dtype":"I8","shape":[0,5],"data_offsets":[8,8]},'
        '"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 8))
    result = runner.invoke(qz, ["inspect", str(path), "--json"])
    assert result.exit_code == 0
    assert [t["name"] for t in json.loads(result.stdout)["tensors"]] == ["a", "b", "e1", "e2"]


# ------------------------------------------------------- E: values and kinds that work


def quantize_ok(runner: CliRunner, tmp_path: Path, arrays: dict[str, np.ndarray],
                *extra: str) -> tuple[dict[str, object], Path]:
    path = tmp_path / "m.safetensors"
    path.write_bytes(weight_file(**arrays))
    result = runner.invoke(qz, ["quantize", str(path), "--json", "-", *extra])
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    report = json.loads(result.stdout)
    return {t["name"]: t for t in report["tensors"]}, Path(report["output"])


@pytest.mark.parametrize("method", ["absmax", "affine"])
def test_E40_to_E43_numeric_edges_succeed(runner: CliRunner, tmp_path: Path,
                                          method: str) -> None:
    arrays = {
        "zeros": np.zeros((32, 64), np.float32),
        "constant": np.full((32, 64), 7.25, np.float32),
        "subnormal": np.full((32, 64), 1e-45, np.float32),
        "huge": np.where(np.arange(32 * 64).reshape(32, 64) % 2, 3e38, -3e38)
        .astype(np.float32),
    }
    tensors, output = quantize_ok(runner, tmp_path, arrays, "--method", method)
    assert tensors["zeros"]["stats"]["max_abs_error"] == 0.0
    _, written = read_with_safetensors(output)
    for name, values in arrays.items():
        scale = to_array(*written[f"{name}_scale"]).astype(np.float64)
        assert np.isfinite(scale).all() and (scale >= 0).all()
        step = np.repeat(scale, 128, axis=-1)[:, :64]
        # s/2 plus float32 rounding, as in the property tests.
        bound = step / 2 + step * 1e-5 + np.abs(values.astype(np.float64)) * 3e-7 + 1e-45
        assert tensors[name]["stats"]["max_abs_error"] <= bound.max(), name
    assert to_array(*written["zeros_scale"]).max() == 0.0


def test_E44_to_E50_kinds_pass_through_or_quantize(runner: CliRunner, tmp_path: Path) -> None:
    f8 = ("F8_E4M3", [32, 64], bytes(range(256)) * 8)
    path = tmp_path / "m.safetensors"
    path.write_bytes(raw_safetensors({
        "empty": ("F32", [0, 4], b""), "scalar": ("F32", [], np.float32(2).tobytes()),
        "bias": ("F32", [64], np.ones(64, np.float32).tobytes()),
        "ids": ("I64", [4], np.arange(4).tobytes()), "mask": ("BOOL", [4], b"\1\0\1\0"),
        "bf16": ("BF16", [32, 64], WEIGHT.astype(ml_dtypes.bfloat16).tobytes()),
        "f8": f8, "f64": ("F64", [32, 64], WEIGHT.astype(np.float64).tobytes())}))
    result = runner.invoke(qz, ["quantize", str(path), "--json", "-"])
    assert result.exit_code == 0, result.stderr
    reasons = {t["name"]: t["reason"] for t in json.loads(result.stdout)["tensors"]}
    assert reasons == {"empty": "empty tensor", "scalar": "scalar", "bias": "1-D tensor",
                       "ids": "integer dtype I64", "mask": "bool dtype BOOL",
                       "f8": "float format qz does not quantize dtype F8_E4M3",
                       "bf16": "BF16, 2-D", "f64": "F64, 2-D"}
    metadata, written = read_with_safetensors(tmp_path / "m.int8.safetensors")
    assert written["f8"] == f8 and written["empty"] == ("F32", [0, 4], b"")
    assert json.loads(metadata["qz.tensors"])["f64"]["dtype"] == "F64"


def test_E51_already_quantized(runner: CliRunner, tmp_path: Path) -> None:
    # A quantized input is read as its values (DESIGN amendment 41); its default output
    # name is its own, which is refused, never overwritten.
    _, output = quantize_ok(runner, tmp_path, {})
    os.remove(tmp_path / "m.safetensors")
    stderr = assert_refused(runner, tmp_path, ["quantize", str(output)], 1,
                            "output would overwrite the input")
    assert "Hint: choose another path with -o" in stderr


# -------------------------------------------------- F: schemes the contract accepts


@pytest.mark.parametrize("block", ["48", "4096"])
def test_F54_F55_blocks_that_do_not_divide_the_row_are_accepted(runner: CliRunner,
                                                                tmp_path: Path,
                                                                block: str) -> None:
    # Deliberate difference from the checklist: DESIGN §2 gives a short last block its
    # own scale instead of refusing.
    _, output = quantize_ok(runner, tmp_path, {}, "--block", block)
    _, written = read_with_safetensors(output)
    assert written["w_scale"][1] == [32, -(-64 // int(block))]


# --------------------------------------------------------------------- G: outputs


def make_input(tmp_path: Path) -> Path:
    path = tmp_path / "m.safetensors"
    path.write_bytes(weight_file())
    return path


def test_G57_G58_output_is_the_input(runner: CliRunner, tmp_path: Path) -> None:
    path = make_input(tmp_path)
    (tmp_path / "link.safetensors").symlink_to(path)
    os.link(path, tmp_path / "hard.safetensors")
    for target in (path, tmp_path / "link.safetensors", tmp_path / "hard.safetensors"):
        assert_refused(runner, tmp_path, ["quantize", str(path), "-o", str(target),
                                          "--force"], 1, "output would overwrite the input")


def test_G59_G60_G61_outputs_that_cannot_be_used(runner: CliRunner, tmp_path: Path) -> None:
    path = make_input(tmp_path)
    existing = tmp_path / "m.int8.safetensors"
    existing.write_bytes(b"mine")
    assert_refused(runner, tmp_path, ["quantize", str(path)], 1, "already exists")
    existing.unlink()
    assert_refused(runner, tmp_path, ["quantize", str(path), "-o", "-"], 1,
                   "'-' is not an output: qz writes files and folders, not to stdout")
    assert_refused(runner, tmp_path, ["quantize", str(path), "-o",
                                      str(tmp_path / "none" / "x.safetensors")], 1,
                   f"directory '{tmp_path / 'none'}' does not exist")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root ignores permission bits")
def test_G62_unwritable_folder_fails_before_work(runner: CliRunner, tmp_path: Path) -> None:
    path = make_input(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert_refused(runner, tmp_path, ["quantize", str(path), "-o",
                                          str(locked / "x.safetensors")], 1, "cannot write to")
    finally:
        locked.chmod(0o755)


def test_G67_closed_stdout_pipe(tmp_path: Path) -> None:
    import subprocess

    path = make_input(tmp_path)
    reader, writer = os.pipe()
    os.close(reader)  # nobody reads: writing gets EPIPE
    result = subprocess.run([sys.executable, "-m", "quantize_cli", "inspect", str(path)],
                            stdout=writer, stderr=subprocess.PIPE, check=False)
    os.close(writer)
    assert result.returncode in (0, 1)
    assert b"Traceback" not in result.stderr and b"BrokenPipe" not in result.stderr


# ------------------------------------------------------------ I: damaged qz files


def qz_file(tmp_path: Path, tensors: dict[str, tuple[str, list[int], bytes]],
            entry: dict[str, object] | None = None, version: str = "1",
            described: str | None = None) -> Path:
    entry = entry or {"method": "affine", "granularity": "channel", "block": None,
                      "dtype": "F32"}
    metadata = {"qz.format_version": version,
                "qz.tensors": described if described is not None else json.dumps({"w": entry})}
    path = tmp_path / "q.safetensors"
    path.write_bytes(raw_safetensors(tensors, metadata))
    return path


CODES = ("I8", [2, 4], bytes([1, 2, 3, 4, 5, 6, 7, 8]))
SCALE = ("F32", [2, 1], np.float32([0.5, 0.25]).tobytes())
ZERO = ("I8", [2, 1], bytes([0, 1]))
ABSMAX = {"method": "absmax", "granularity": "channel", "block": None, "dtype": "F32"}

DAMAGED: list[tuple[str, Callable[[Path], Path], str]] = [
    ("I76-plain-file", lambda p: _plain(p),
     "not a quantized checkpoint: no file is in a format qz reads"),
    ("I77-unknown-version", lambda p: qz_file(p, {"w": CODES, "w_scale": SCALE,
                                                  "w_zero_point": ZERO}, version="99"),
     "unsupported qz format version '99' (this qz reads 1, 2 and 3)"),
    ("I78-tensors-not-json", lambda p: qz_file(p, {"w": CODES}, described="{oops"),
     "qz.tensors metadata is not valid JSON"),
    ("I78-tensors-not-object", lambda p: qz_file(p, {"w": CODES}, described="[1]"),
     "qz.tensors must be a JSON object"),
    ("I78-entry-wrong-types", lambda p: qz_file(p, {"w": CODES}, entry={
        "method": "absmax", "granularity": "block", "block": "128", "dtype": "F32"}),
     "tensor 'w': invalid qz.tensors entry: block must be a positive integer, got '128'"),
    ("I78-entry-bad-dtype", lambda p: qz_file(p, {"w": CODES}, entry={
        "method": "absmax", "granularity": "tensor", "block": None, "dtype": "I64"}),
     "original dtype 'I64' is not a float dtype qz quantizes"),
    ("I79-missing-scale", lambda p: qz_file(p, {"w": CODES, "w_zero_point": ZERO}),
     "tensor 'w': affine channel needs tensor 'w_scale', which is missing"),
    ("I80-scale-dtype", lambda p: qz_file(p, {"w": CODES, "w_scale": (
        "F16", [2, 1], np.float16([0.5, 0.25]).tobytes()), "w_zero_point": ZERO}),
     "tensor 'w_scale': must be F32 of shape [2, 1], found F16 [2, 1]"),
    ("I80-scale-shape", lambda p: qz_file(p, {"w": CODES, "w_scale": (
        "F32", [2], np.float32([0.5, 0.25]).tobytes()), "w_zero_point": ZERO}),
     "tensor 'w_scale': must be F32 of shape [2, 1], found F32 [2]"),
    ("I81-nan-scale", lambda p: qz_file(p, {"w": CODES, "w_scale": (
        "F32", [2, 1], np.float32([np.nan, 0.25]).tobytes()), "w_zero_point": ZERO}),
     "tensor 'w_scale': holds non-finite or negative scales"),
    ("I81-negative-scale", lambda p: qz_file(p, {"w": CODES, "w_scale": (
        "F32", [2, 1], np.float32([-1, 0.25]).tobytes()), "w_zero_point": ZERO}),
     "tensor 'w_scale': holds non-finite or negative scales"),
    ("I82-zero-point-missing", lambda p: qz_file(p, {"w": CODES, "w_scale": SCALE}),
     "affine channel needs tensor 'w_zero_point', which is missing"),
    ("I82-zero-point-extra", lambda p: qz_file(p, {"w": CODES, "w_scale": SCALE,
                                                   "w_zero_point": ZERO}, entry=ABSMAX),
     "absmax has no zero point, but 'w_zero_point' exists"),
    ("I82-zero-point-shape", lambda p: qz_file(p, {"w": CODES, "w_scale": SCALE,
                                                   "w_zero_point": ("I8", [2], b"\0\1")}),
     "tensor 'w_zero_point': must be I8 of shape [2, 1], found I8 [2]"),
    ("I83-codes-not-i8", lambda p: qz_file(p, {"w": ("U8", [2, 4], bytes(8)),
                                               "w_scale": SCALE, "w_zero_point": ZERO}),
     "tensor 'w': quantized values must be I8, found U8"),
    ("I83-codes-out-of-range", lambda p: qz_file(p, {"w": ("I8", [2, 4], b"\x80" + bytes(7)),
                                                     "w_scale": SCALE}, entry=ABSMAX),
     "tensor 'w': holds the code -128, outside absmax's range [-127, 127]"),
    ("I84-listed-but-absent", lambda p: qz_file(p, {"v": CODES}),
     "tensor 'w': listed in qz.tensors but the file has no such tensor"),
]


def _plain(folder: Path) -> Path:
    path = folder / "q.safetensors"
    path.write_bytes(weight_file())
    return path


@pytest.mark.parametrize("build,fragment", [case[1:] for case in DAMAGED],
                         ids=[case[0] for case in DAMAGED])
@pytest.mark.parametrize("command", ["dequantize", "inspect"])
def test_damaged_qz_files(runner: CliRunner, tmp_path: Path, command: str,
                          build: Callable[[Path], Path], fragment: str) -> None:
    path = build(tmp_path)
    if command == "inspect" and ("not a quantized" in fragment or "holds" in fragment):
        return  # inspect shows plain files, and reads no values to check
    assert_refused(runner, tmp_path, [command, str(path)], 1, fragment)


def test_I84_orphan_scale_tensors_are_ordinary_tensors(runner: CliRunner,
                                                       tmp_path: Path) -> None:
    # Deliberate: a tensor named like a scale but belonging to no quantized tensor (an FP8
    # model's weight_scale, say) is kept as an ordinary tensor, not refused.
    path = qz_file(tmp_path, {"w": CODES, "w_scale": SCALE, "w_zero_point": ZERO,
                              "v_scale": SCALE})
    result = runner.invoke(qz, ["dequantize", str(path)])
    assert result.exit_code == 0, result.stderr
    _, written = read_with_safetensors(tmp_path / "q.dequant.safetensors")
    assert sorted(written) == ["v_scale", "w"]


def test_I85_unknown_output_dtype(runner: CliRunner, tmp_path: Path) -> None:
    path = qz_file(tmp_path, {"w": CODES, "w_scale": SCALE, "w_zero_point": ZERO})
    assert_refused(runner, tmp_path, ["dequantize", str(path), "--dtype", "F8"], 2,
                   "'F8' is not one of 'original', 'float32', 'float16', 'bfloat16'")
