"""The progress bar: drawn on a terminal, never when stderr is not one or with --quiet."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from quantize_cli.jobs import quantize_checkpoint


def run_with_terminal_stderr(*args: str) -> tuple[int, str, bytes]:
    """Run qz with stderr on a pseudo-terminal; return (exit code, stdout, terminal bytes)."""
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm"}
    process = subprocess.Popen([sys.executable, "-m", "quantize_cli", *args],
                               stdout=subprocess.PIPE, stderr=follower, env=env)
    os.close(follower)
    drawn = b""
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        drawn += data
    stdout, _ = process.communicate()
    os.close(leader)
    return process.returncode, stdout.decode(), drawn


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_progress_bar_on_a_terminal_only(small_model: Path) -> None:
    code, stdout, drawn = run_with_terminal_stderr("quantize", str(small_model))
    assert code == 0 and "Quantization error per tensor" in stdout
    assert b"kB" in drawn  # bytes done / total, drawn on the terminal
    assert b"\x1b[" in drawn  # and redrawn in place
    code, stdout, drawn = run_with_terminal_stderr("quantize", str(small_model), "--force",
                                                   "--quiet")
    assert code == 0 and stdout == "" and drawn == b""


class Recorder:
    """Records each phase's announced total and the bytes reported done."""

    def __init__(self) -> None:
        self.phases: dict[str, list[int]] = {}
        self.current = ""
        self.tensors: list[str] = []

    def start(self, total_bytes: int, phase: str) -> None:
        self.current = phase
        self.phases[phase] = [total_bytes, 0]

    def advance(self, nbytes: int, tensor: str) -> None:
        self.phases[self.current][1] += nbytes
        self.tensors.append(tensor)


def test_progress_reports_every_byte(small_model: Path, tmp_path: Path) -> None:
    recorder = Recorder()
    quantize_checkpoint(small_model, tmp_path / "out.safetensors", progress=recorder,
                        chunk_bytes=512)
    data_bytes = 8 * 160 * 2 + 16 * 128 * 2 + 32 * 64 * 4 + 160 * 2 + 8 * 8
    assert recorder.phases == {"quantizing": [data_bytes, data_bytes]}
    assert set(recorder.tensors) == {"a.weight", "b.weight", "c.weight", "norm.weight",
                                     "position_ids"}


@pytest.mark.parametrize("target", [{"target_sqnr": 30.0}, {"target_bits": 6.0}])
def test_measuring_for_a_target_is_a_phase_of_its_own(small_model: Path, tmp_path: Path,
                                                      target: dict[str, float]) -> None:
    recorder = Recorder()
    quantize_checkpoint(small_model, tmp_path / "out.safetensors", progress=recorder,
                        chunk_bytes=512, **target)  # type: ignore[arg-type]
    assert list(recorder.phases) == ["measuring", "quantizing"]
    for total, done in recorder.phases.values():
        assert total == done > 0
