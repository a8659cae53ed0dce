"""Faults while writing, and signals while running: the output is all or nothing.

Disk full, a failing fsync or rename, Ctrl-C in the middle, and SIGINT/SIGTERM/SIGKILL
sent to a real process: afterwards the folder holds exactly what it held before (only a
SIGKILL may leave a hidden ``.qz-partial`` file), the input is unchanged, and the exit
code says what happened.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import snapshot, write_safetensors
from quantize_cli.cli.main import qz
from quantize_cli.jobs import quantize_checkpoint
from quantize_cli.storage import writer as writer_module


@pytest.fixture
def model(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    return write_safetensors(tmp_path / "m.safetensors", {
        f"layer{i}.weight": rng.standard_normal((256, 512)).astype(np.float32)
        for i in range(4)})


def run_and_compare(runner: CliRunner, folder: Path, args: list[str], code: int,
                    fragment: str) -> None:
    before = snapshot(folder)
    result = runner.invoke(qz, args)
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(folder) == before


def test_disk_full_mid_write(runner: CliRunner, model: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    budget = [300_000]
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: memoryview, position: int) -> int:
        budget[0] -= len(data)
        if budget[0] < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, position)

    monkeypatch.setattr(writer_module.os, "pwrite", pwrite)
    run_and_compare(runner, model.parent, ["quantize", str(model)], 1,
                    f"Error: {model.with_name('m.int8.safetensors')}: disk full while writing")


def test_interrupted_mid_write(runner: CliRunner, model: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    calls = [0]
    real_write = writer_module.SafetensorsWriter.write

    def write(self: writer_module.SafetensorsWriter, name: str, array: np.ndarray) -> None:
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        real_write(self, name, array)

    monkeypatch.setattr(writer_module.SafetensorsWriter, "write", write)
    run_and_compare(runner, model.parent, ["quantize", str(model)], 130,
                    "Interrupted; nothing was written.")


@pytest.mark.parametrize("call,message", [
    ("fsync", "could not be published (Input/output error)"),
    ("replace", "could not be published (Invalid cross-device link)"),
    ("fdatasync", "write failed (Input/output error)"),
])
def test_failing_system_calls(runner: CliRunner, model: Path, monkeypatch: pytest.MonkeyPatch,
                              call: str, message: str) -> None:
    code = errno.EXDEV if call == "replace" else errno.EIO

    def fail(*args: object) -> None:
        raise OSError(code, os.strerror(code))

    output = model.with_name("m.int8.safetensors")
    quantize_checkpoint(model, output, hash_source=False)  # a result qz may replace
    before = output.read_bytes()
    if call == "fdatasync":
        monkeypatch.setattr(writer_module, "WRITEBACK_BYTES", 1)  # flush in the background
    monkeypatch.setattr(writer_module.os, call, fail)
    run_and_compare(runner, model.parent, ["quantize", str(model), "--force"], 1, message)
    assert output.read_bytes() == before


def test_failing_publish_of_a_sharded_output(runner: CliRunner, model: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    folder = model.parent / "sharded"
    folder.mkdir()
    model.rename(folder / "model-00001-of-00001.safetensors")
    names = [f"layer{i}.weight" for i in range(4)]
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": dict.fromkeys(names, "model-00001-of-00001.safetensors")}))
    real_replace = os.replace

    def replace(source: str | Path, target: str | Path) -> None:
        if Path(target).name == "sharded.int8":
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        real_replace(source, target)

    monkeypatch.setattr(writer_module.os, "replace", replace)
    run_and_compare(runner, model.parent, ["quantize", str(folder)], 1,
                    "could not be published (Permission denied)")


def test_read_error_names_file_and_tensor(runner: CliRunner, model: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from quantize_cli.storage import reader as reader_module

    def preadv(*args: object) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(reader_module.os, "preadv", preadv)
    run_and_compare(runner, model.parent, ["quantize", str(model)], 1,
                    f"Error: {model}: tensor 'layer0.weight': cannot be read "
                    "(Input/output error)")


def test_a_bug_is_one_line_not_a_traceback(runner: CliRunner, model: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from quantize_cli.jobs import tensor

    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(tensor, "quantize_rows", broken)
    run_and_compare(runner, model.parent, ["quantize", str(model)], 1,
                    "Error: internal error: ZeroDivisionError: boom\nHint: this is a bug in qz")
    monkeypatch.setenv("QZ_TRACEBACK", "1")
    result = runner.invoke(qz, ["quantize", str(model)])
    assert isinstance(result.exception, ZeroDivisionError)


def big_model(folder: Path) -> Path:
    """About 100 MB of float32: long enough to be interrupted in the middle."""
    rng = np.random.default_rng(0)
    return write_safetensors(folder / "big.safetensors", {
        f"layer{i}.weight": rng.standard_normal((1024, 4096), dtype=np.float32)
        for i in range(6)})


def start_and_signal(folder: Path, source: Path, signum: int) -> tuple[int, str]:
    env = {**os.environ, "QZ_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "quantize_cli", "quantize", str(source), "--method", "affine",
         "--per-tensor"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 30
    # Wait until the output is being written, then interrupt.
    while not any(name.endswith(".qz-partial") for name in os.listdir(folder)):
        if process.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.002)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    return process.returncode, stderr.decode()


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_leave_nothing_behind(tmp_path: Path, signum: int, code: int) -> None:
    source = big_model(tmp_path)
    before = snapshot(tmp_path)
    returncode, stderr = start_and_signal(tmp_path, source, signum)
    assert returncode == code, stderr
    assert "Traceback" not in stderr
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_sigkill_leaves_only_a_recognisable_partial_file(tmp_path: Path) -> None:
    source = big_model(tmp_path)
    returncode, _ = start_and_signal(tmp_path, source, signal.SIGKILL)
    assert returncode == -signal.SIGKILL
    leftovers = set(os.listdir(tmp_path)) - {source.name}
    assert all(name.startswith(".big.int8-affine-tensor.safetensors.")
               and name.endswith(".qz-partial") for name in leftovers)
    assert not (tmp_path / "big.int8-affine-tensor.safetensors").exists()
