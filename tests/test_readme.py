"""The README's promises: its first commands, its library example, its worked example."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_readme_opens_with_install_and_test_commands_that_ci_runs() -> None:
    first = code_blocks("bash")[0].strip().splitlines()
    assert first[0].startswith("pip install -e . && qz quantize sample_weights/")
    assert first[1] == "pip install -e '.[test]' && python -m pytest"
    ci = (ROOT / ".ci" / "run").read_text()
    assert first[0] in ci and first[1] in ci


def test_library_example_runs_and_says_what_it_prints() -> None:
    (example,) = code_blocks("python")
    namespace: dict[str, object] = {}
    exec(example, namespace)
    qt = namespace["qt"]
    assert qt.codes.tolist() == [33, -14, -70, 35, -59, 10, 47, 127]  # type: ignore[attr-defined]
    from quantize_cli import dequantize, error_stats

    sqnr = error_stats(namespace["x"], dequantize(qt)).sqnr_db  # type: ignore[arg-type]
    assert f"# {sqnr:.1f}" in example


def test_worked_example_in_the_readme_is_right() -> None:
    from quantize_cli import Scheme, dequantize, quantize

    x = np.array([1.6, -0.7, -3.4, 1.7, -2.9, 0.5, 2.3, 6.2], dtype=np.float32)
    qt = quantize(x, Scheme("absmax", "tensor"))
    assert "q = round(x / s) = [33, -14, -70, 35, -59, 10, 47, 127]" in README
    shown = ", ".join(f"{v:.3f}" for v in dequantize(qt)).replace("6.200", "6.2")
    assert f"x̂ = q · s = [{shown}]" in README
    affine = quantize(x, Scheme("affine", "tensor"))
    assert affine.zero_point is not None
    assert f"= {int(affine.zero_point[0])}; 0.0".replace("-", "−") in README  # typeset minus


def test_every_command_is_documented() -> None:
    from quantize_cli.cli.main import qz

    assert len(qz.commands) >= 5
    for command in qz.commands:
        assert f"### `qz {command}`" in README, command


def console_sessions() -> list[tuple[str, list[str]]]:
    """Every ``$ command`` of the README's console blocks, in order, with the lines it
    shows below it."""
    sessions: list[tuple[str, list[str]]] = []
    for block in code_blocks("console"):
        for line in block.splitlines():
            if line.startswith("$ "):
                sessions.append((line[2:], []))
            elif sessions:
                sessions[-1][1].append(line.rstrip())
    return sessions


def shows(expected: list[str], actual: list[str]) -> bool:
    """Whether ``actual`` is ``expected``, where a line "…" stands for any lines."""
    if not expected:
        return not actual
    if expected[0] == "…":
        return any(shows(expected[1:], actual[start:]) for start in range(len(actual) + 1))
    return bool(actual) and actual[0] == expected[0] and shows(expected[1:], actual[1:])


def test_every_readme_command_runs_as_written_and_prints_what_it_shows(tmp_path: Path) -> None:
    """The README's transcripts are real: each command runs, in order, on a fresh copy of
    the bundled samples, 120 columns wide, and prints exactly the lines shown (a line
    "…" stands for lines left out)."""
    # The samples as the repository holds them, without outputs of earlier runs.
    samples = tmp_path / "sample_weights"
    samples.mkdir()
    for source in (ROOT / "sample_weights").iterdir():
        original = source.suffix in (".py", ".safetensors") and source.name.count(".") == 1
        if original or source.name in ("tiny_llama_sharded", "tiny_llama_fp8", "README.md"):
            copy = shutil.copytree if source.is_dir() else shutil.copy2
            copy(source, samples / source.name)
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1", "TERM": "dumb"}
    qz = f"{sys.executable} -m quantize_cli "
    sessions = console_sessions()
    assert len(sessions) >= 15
    for command, expected in sessions:
        result = subprocess.run(["bash", "-c", re.sub(r"^qz ", qz, command)], cwd=tmp_path,
                                env=env, capture_output=True, text=True)
        failure = any(line.startswith(("Error:", "qz diff:")) for line in expected)
        assert (result.returncode != 0) == failure, (command, result.stderr)
        actual = [line.rstrip() for line in (result.stdout + result.stderr).splitlines()]
        assert shows(expected, actual), f"$ {command}\n" + "\n".join(actual)
