"""qz explain: the worked example, step by step."""

from __future__ import annotations

from click.testing import CliRunner

from quantize_cli.cli.main import qz

WORKED = ["1.6", "-0.7", "-3.4", "1.7", "-2.9", "0.5", "2.3", "6.2"]


def test_worked_example_step_by_step() -> None:
    result = CliRunner().invoke(qz, ["explain", *WORKED])
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "scale:  s = max|x| / 127 = 6.2 / 127 = 0.0488189   (1/s = 20.4839)" in out
    codes = [line.split("│")[3].strip() for line in out.splitlines() if line.count("│") == 5]
    assert codes == ["33", "-14", "-70", "35", "-59", "10", "47", "127"]
    assert "largest error 0.0197 ≤ s/2 = 0.0244" in out
    assert "SQNR 47.21 dB" in out


def test_affine_and_commas() -> None:
    result = CliRunner().invoke(qz, ["explain", ",".join(WORKED), "--method", "affine"])
    assert result.exit_code == 0
    assert "zero point: z = round(-128 - lo / s) = -38   (the code of 0.0)" in result.stdout
    assert "range:  lo = min(min x, 0) = -3.4, hi = max(max x, 0) = 6.2" in result.stdout


def test_blocks_and_an_all_zero_group() -> None:
    result = CliRunner().invoke(qz, ["explain", "0", "0", "0", "0", "1", "2", "--block", "4"])
    assert result.exit_code == 0
    assert "absmax, values 0–3" in result.stdout and "absmax, values 4–5" in result.stdout
    assert "an all-zero group: s = 0, every code 0, exact" in result.stdout
    assert "│  63.500 │  64 │" in result.stdout  # 1 / (2/127) = 63.5 rounds to even


def test_not_a_number_is_a_usage_error() -> None:
    result = CliRunner().invoke(qz, ["explain", "1", "abc"])
    assert result.exit_code == 2 and "'abc' is not a number" in result.stderr
    assert CliRunner().invoke(qz, ["explain"]).exit_code == 2


def test_the_worked_example_leads_the_help() -> None:
    help_text = CliRunner().invoke(qz, ["explain", "--help"]).stdout
    examples = help_text[help_text.index("Examples:"):].splitlines()
    assert examples[1].strip() == "qz explain " + " ".join(WORKED)
