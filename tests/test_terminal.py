"""At the terminal: tables that fit 60 and 80 columns with every number whole, the worst
tensors of large checkpoints, one --json convention, diff's exit status, a closed
stdout, and clear words for mistakes."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from rich.cells import cell_len

from conftest import read_with_safetensors, run_fail, run_ok, write_safetensors
from quantize_cli.cli.main import qz

SAMPLES = Path(__file__).resolve().parent.parent / "sample_weights"


def run_on_terminal(args: list[str], columns: int, cwd: Path,
                    raw: bool = False) -> tuple[int, str]:
    """Run qz with stdout and stderr on a pseudo-terminal ``columns`` wide; return the
    exit code and what the terminal received (without escape sequences unless ``raw``)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    env.update(TERM="xterm", NO_COLOR="1")
    process = subprocess.Popen([sys.executable, "-m", "quantize_cli", *args], cwd=cwd,
                               stdin=follower, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    output = b""
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        output += data
    os.close(leader)
    text = output.decode().replace("\r\n", "\n")
    return process.wait(), text if raw else plain(text)


def plain(output: str) -> str:
    """The text of terminal output, without its escape sequences."""
    return re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", output)


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    shutil.copy(SAMPLES / "tiny_llama_bf16.safetensors", tmp_path / "model.safetensors")
    return tmp_path / "model.safetensors"


def numbers_in_cells(line: str) -> list[str]:
    return [cell.strip() for cell in re.split(r"[│┃]", line)[1:-1]]


@pytest.mark.parametrize("columns", [60, 80])
def test_quantize_table_fits_and_every_number_is_whole(sample: Path, columns: int) -> None:
    code, output = run_on_terminal(["quantize", sample.name, "--json", "report.json"],
                                   columns, sample.parent)
    assert code == 0, output
    lines = output.splitlines()
    assert all(cell_len(line) <= columns for line in lines), max(lines, key=cell_len)
    report = json.loads((sample.parent / "report.json").read_text())
    expected = sorted(f"{t['stats']['sqnr_db']:.2f}" for t in report["tensors"] if t["stats"])
    rows = [numbers_in_cells(line) for line in lines if line.startswith("│")]
    assert len(rows) == len(report["tensors"])  # one line per tensor: nothing wraps
    shown = sorted(cell for row in rows for cell in row if re.fullmatch(r"\d+\.\d\d", cell))
    assert shown == expected  # every SQNR on screen, whole
    summary = output[output.index("Tensors:"):]
    pooled = report["totals"]["pooled"]
    assert f"SQNR {pooled['sqnr_db']:.2f} dB" in summary.replace("\n", " ")
    assert "…" not in summary and "exact dB" not in output


@pytest.mark.parametrize("columns", [60, 80])
def test_inspect_and_diff_fit_and_keep_numbers_whole(sample: Path, columns: int) -> None:
    run_ok(CliRunner(), "quantize", str(sample), "-q")
    quantized = sample.with_name("model.int8.safetensors")
    for args in (["inspect", quantized.name], ["diff", sample.name, quantized.name]):
        code, output = run_on_terminal(args, columns, sample.parent)
        assert code == 0, output
        lines = output.splitlines()
        assert all(cell_len(line) <= columns for line in lines)
        tensor_lines = output.split("Metadata")[0].splitlines()  # not the metadata table
        for row in (numbers_in_cells(line) for line in tensor_lines if line.startswith("│")):
            for cell in row:  # sizes and statistics: whole, never cut
                if re.match(r"^[\d.]+", cell) and not re.search(r"[a-zA-Z_]", cell.split()[0]):
                    assert "…" not in cell, cell
                    assert re.fullmatch(r"[\d.]+(e-?\d+)?( (kB|MB|bytes))?|[\d×]+", cell), cell


def test_names_are_shortened_to_initials_then_in_the_middle() -> None:
    from quantize_cli.cli.text import shorten_name

    name = "model.layers.11.mlp.down_proj.weight"
    assert shorten_name(name, 60) == name
    assert shorten_name(name, 33) == "m.layers.11.mlp.down_proj.weight"
    assert shorten_name(name, 30) == "m.l.11.mlp.down_proj.weight"
    assert shorten_name(name, 20).count("…") == 1 and len(shorten_name(name, 20)) == 20


def many_tensors(folder: Path, count: int = 60) -> Path:
    rng = np.random.default_rng(0)
    return write_safetensors(folder / "many.safetensors", {
        f"layers.{i}.weight": (rng.standard_normal((32, 64)) * (1 + i % 7)).astype(np.float32)
        for i in range(count)})


def test_large_checkpoints_show_the_worst_tensors_on_a_terminal(tmp_path: Path) -> None:
    source = many_tensors(tmp_path)
    code, output = run_on_terminal(["quantize", source.name, "--json", "r.json"], 100,
                                   tmp_path)
    assert code == 0, output
    assert "The 20 tensors of lowest SQNR, of 60 quantized (--all shows every tensor)" in output
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["tensors"]) == 60  # the JSON always has everything
    rows = [line for line in output.splitlines() if line.startswith("│")]
    assert len(rows) == 20
    worst = sorted(report["tensors"], key=lambda t: t["stats"]["sqnr_db"])[0]
    assert worst["name"] in rows[0]
    code, output = run_on_terminal(["quantize", source.name, "--force", "--all"], 100, tmp_path)
    assert len([line for line in output.splitlines() if line.startswith("│")]) == 60
    code, output = run_on_terminal(["quantize", source.name, "--force", "--worst", "0"], 100,
                                   tmp_path)
    assert "│" not in output and "Pooled: SQNR" in output
    # Off a terminal (a log, a pipe) every tensor is shown.
    logged = run_ok(CliRunner(), "quantize", str(source), "--force")
    assert len([line for line in logged.splitlines() if line.startswith("│")]) == 60


def test_progress_bar_stays_on_one_line_at_60_columns(tmp_path: Path) -> None:
    source = many_tensors(tmp_path, 8)
    code, output = run_on_terminal(["quantize", source.name, "--no-stats"], 60, tmp_path,
                                   raw=True)
    assert code == 0
    assert "━" in output or "╸" in output  # a bar was drawn
    for frame in re.split(r"\r|\n|\x1b\[2K|\x1b\[1A", output):
        assert cell_len(plain(frame)) <= 60, plain(frame)


# ------------------------------------------------------------------------------ JSON


@pytest.mark.parametrize("command", ["quantize", "inspect", "dequantize", "diff"])
def test_one_json_convention_on_every_command(sample: Path, command: str,
                                              runner: CliRunner) -> None:
    run_ok(runner, "quantize", str(sample), "-q")
    quantized = sample.with_name("model.int8.safetensors")
    target = {"quantize": [str(sample), "-o", str(sample.with_name("q.safetensors"))],
              "inspect": [str(quantized)], "dequantize": [str(quantized)],
              "diff": [str(sample), str(quantized)]}[command]
    report = sample.with_name(f"{command}.json")
    stdout = run_ok(runner, command, *target, "--json", str(report))
    assert json.loads(report.read_text())["command"] == command
    assert stdout == "" or not stdout.lstrip().startswith("{")  # the table, not JSON
    # An existing report needs --force, and is refused before any work.
    stderr = run_fail(runner, 1, command, *target, "--json", str(report))
    assert f"{report}: already exists" in stderr and "--force" in stderr
    # No value, or '-': the JSON on stdout instead of the table.
    for flag in (["--json"], ["--json", "-"]):
        stdout = run_ok(runner, command, *target, *flag, "--force")
        assert json.loads(stdout)["schema_version"] == 3


def test_json_target_is_checked_before_any_work(small_model: Path, runner: CliRunner) -> None:
    stderr = run_fail(runner, 1, "quantize", str(small_model), "--json", "nodir/r.json")
    assert "nodir/r.json: directory 'nodir' does not exist" in stderr
    assert "internal error" not in stderr
    assert not small_model.with_name("model.int8.safetensors").exists()
    folder = small_model.parent / "folder"
    folder.mkdir()
    write_safetensors(folder / "model.safetensors", {"w": np.ones((64, 64), np.float32)})
    stderr = run_fail(runner, 1, "quantize", str(folder), "--json", str(folder / "r.json"))
    assert "is inside the input folder" in stderr


# ------------------------------------------------------------------------------- diff


def test_diff_exit_status_with_fail_under(sample: Path, runner: CliRunner) -> None:
    run_ok(runner, "quantize", str(sample), "-q")
    quantized = str(sample.with_name("model.int8.safetensors"))
    report = json.loads(run_ok(runner, "diff", str(sample), quantized, "--json"))
    worst = min(t["stats"]["sqnr_db"] for t in report["tensors"]
                if t["stats"]["sqnr_db"] is not None)  # null: exact
    run_ok(runner, "diff", str(sample), quantized, "--fail-under", f"{worst - 0.01:.2f}")
    result = runner.invoke(qz, ["diff", str(sample), quantized, "--fail-under",
                                f"{worst + 0.01:.2f}"])
    assert result.exit_code == 3
    assert "Compared 27 floating tensors" in result.stdout  # the report still prints
    assert result.stderr.startswith("qz diff: 1 tensor below")
    # inf: only identical checkpoints pass.
    run_ok(runner, "diff", str(sample), str(sample), "--fail-under", "inf")
    result = runner.invoke(qz, ["diff", str(sample), quantized, "--fail-under", "inf", "-q"])
    assert result.exit_code == 3 and "tensors below exact" in result.stderr


def test_diff_pools_floats_and_refuses_nothing_in_common(tmp_path: Path,
                                                         runner: CliRunner) -> None:
    a = write_safetensors(tmp_path / "a.safetensors", {
        "w": np.float32([[1, 2], [3, 4]]), "ids": np.arange(4, dtype=np.int64) * 2**25})
    b = write_safetensors(tmp_path / "b.safetensors", {
        "w": np.float32([[1, 2], [3, 5]]), "ids": np.arange(4, dtype=np.int64) * 2**25 + 1})
    report = json.loads(run_ok(runner, "diff", str(a), str(b), "--json"))
    assert report["pooled"]["sqnr_db"] == pytest.approx(10 * np.log10(30 / 1))
    assert report["exact"][0]["differing_elements"] == 4
    result = runner.invoke(qz, ["diff", str(a), str(b), "--fail-under", "10"])
    assert result.exit_code == 3 and "1 tensor integer or other tensors differing" in \
        result.stderr
    c = write_safetensors(tmp_path / "c.safetensors", {"other": np.ones(3, np.float32)})
    stderr = run_fail(runner, 1, "diff", str(a), str(c))
    assert "has no tensor in common with" in stderr and "nothing to compare" in stderr


# --------------------------------------------------------------------- closed stdout


def test_a_closed_stdout_is_not_a_failure(sample: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "quantize_cli", "quantize", str(sample), "--all"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": "200"})
    assert process.stdout is not None and process.stderr is not None
    process.stdout.readline()  # `| head -1`
    process.stdout.close()
    code = process.wait()
    stderr = process.stderr.read().decode()
    assert code == 0, stderr
    assert stderr == ""
    assert sample.with_name("model.int8.safetensors").exists()


# ------------------------------------------------------------------- clear words


def test_files_that_are_not_checkpoints_are_named_for_what_they_are(
        tmp_path: Path, runner: CliRunner) -> None:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[unused0]\n[unused1]\n")
    stderr = run_fail(runner, 1, "quantize", str(vocab))
    assert "vocab.txt: is not a safetensors file: it starts with the text '[PAD]" in stderr
    assert "header too large" not in stderr
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "bert", "hidden_size": 384}')
    stderr = run_fail(runner, 1, "quantize", str(config))
    assert "config.json: is not a sharded checkpoint's index" in stderr
    assert "this is a model's config.json: to quantize the model, give its folder" in stderr


def test_explain_mistakes(runner: CliRunner) -> None:
    result = runner.invoke(qz, ["explain", "nan", "1"])
    assert result.exit_code == 2 and "'nan' is not a finite number" in result.stderr
    assert "--exclude" not in result.stderr
    result = runner.invoke(qz, ["explain", "1", "2", "--per-channel"])
    assert result.exit_code == 2 and "No such option '--per-channel'" in result.stderr
    assert "is not a number" not in result.stderr
    assert "Did you mean" not in result.stderr or "--method" in result.stderr
    run_ok(runner, "explain", "1", "-2.5", "-1e-3")  # negative numbers are values


def test_exact_results_say_exact_without_a_unit(tmp_path: Path, runner: CliRunner) -> None:
    source = write_safetensors(tmp_path / "m.safetensors",
                               {"w": np.tile(np.float32([0, 127, -127, 64]), (32, 64))})
    stdout = run_ok(runner, "quantize", str(source))
    assert "Pooled: SQNR exact," in stdout and "exact dB" not in stdout


def test_dequantize_dtype_converts_only_restored_tensors(small_model: Path,
                                                         runner: CliRunner) -> None:
    """--dtype applies to the tensors qz restores; tensors it never quantized (norms,
    integers) keep their dtype and bytes (DESIGN amendment 21)."""
    run_ok(runner, "quantize", str(small_model), "-q")
    quantized = small_model.with_name("model.int8.safetensors")
    restored = small_model.with_name("restored.safetensors")
    run_ok(runner, "dequantize", str(quantized), "-o", str(restored), "--dtype", "float16",
           "-q")
    _, before = read_with_safetensors(small_model)
    _, after = read_with_safetensors(restored)
    assert after["a.weight"][0] == after["c.weight"][0] == "F16"
    assert after["norm.weight"] == before["norm.weight"]  # BF16, byte for byte


def test_sharded_provenance_records_the_folder_command(tmp_path: Path,
                                                        runner: CliRunner) -> None:
    output = tmp_path / "out"
    run_ok(runner, "quantize", str(SAMPLES / "tiny_llama_sharded"), "-o", str(output), "-q",
           "--per-channel")
    for shard in sorted(output.glob("*.safetensors")):
        metadata, _ = read_with_safetensors(shard)
        assert metadata["qz.command"].startswith("qz quantize tiny_llama_sharded ")
        assert json.loads(metadata["qz.source"])["file"] == shard.name


def test_help_lists_every_command_without_cutting_it(runner: CliRunner) -> None:
    result = runner.invoke(qz, ["--help"], terminal_width=80)
    commands = result.stdout.split("Commands:")[1]
    assert "..." not in commands
    for name in ("quantize", "inspect", "dequantize", "diff", "explain"):
        assert f"  {name} " in commands
