"""Finding and validating a checkpoint: one safetensors file, or a sharded folder whose
``model.safetensors.index.json`` maps every tensor to its shard.

Every shard's header is read and checked against the index before anything is written,
so a missing shard, a tensor in two shards, a tensor the index maps to the wrong shard or
a shard path outside the folder is refused up front (vLLM and SGLang once loaded such
checkpoints silently).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, InputError, located
from .header import TO_SAFETENSORS, Header
from .jsonfile import loads_strict
from .reader import SafetensorsReader

INDEX_NAME = "model.safetensors.index.json"
#: Files of these kinds hold weights in formats qz does not read (PyTorch, TensorFlow,
#: Flax, GGUF, ONNX, OpenVINO, Rust, NumPy, Paddle, NeMo, TFLite checkpoints).
OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx",
                         ".onnx_data", ".ot", ".npz", ".pdparams", ".nemo", ".tflite")
INDEX_SUFFIX = ".safetensors.index.json"


@dataclass(frozen=True)
class Shard:
    """One safetensors file of a checkpoint and its validated header."""

    path: Path
    header: Header


@dataclass(frozen=True)
class Checkpoint:
    """A single file (``index is None``) or a sharded checkpoint with its index."""

    source: Path  # what the user named
    shards: tuple[Shard, ...]
    index_path: Path | None = None
    index: dict[str, Any] | None = None

    @property
    def sharded(self) -> bool:
        return self.index_path is not None

    @property
    def folder(self) -> Path:
        return self.shards[0].path.parent if self.index_path is None else self.index_path.parent

    @property
    def data_bytes(self) -> int:
        """Bytes of tensor data (what a job reads, and what its progress counts)."""
        return sum(shard.header.data_size for shard in self.shards)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a ``.safetensors`` file, an index file, or a folder holding either.

    Raises:
        InputError: nothing usable at ``path``.
        CheckpointError: the index and the shards disagree.
        HeaderError, LayoutError: a file breaks the safetensors format.
    """
    source = Path(path)
    if source.is_dir():
        index = source / INDEX_NAME
        if index.is_file():
            return _open_sharded(source, index)
        candidates = sorted(source.glob("*.safetensors"))
        indexes = sorted(source.glob(f"*{INDEX_SUFFIX}"))
        if len(indexes) == 1:
            return _open_sharded(source, indexes[0])
        if len(candidates) == 1:
            return _open_single(source, candidates[0])
        others = sorted(entry.name for entry in source.iterdir()
                        if entry.name.endswith(OTHER_WEIGHT_SUFFIXES))
        if not candidates and others:
            raise InputError(
                located(source, None, f"holds weights only in formats qz does not read "
                        f"({', '.join(others[:3])}{', …' if len(others) > 3 else ''}), no "
                        ".safetensors file"), hint=TO_SAFETENSORS)
        raise InputError(
            located(source, None, f"folder holds no {INDEX_NAME} and "
                    f"{len(candidates)} .safetensors files"),
            hint="name the file or the index to use",
        )
    if source.name.endswith(".json"):
        if not source.is_file():
            raise InputError(located(source, None, "does not exist"))
        return _open_sharded(source, source)
    return _open_single(source, source)


def _open_single(source: Path, file: Path) -> Checkpoint:
    with SafetensorsReader(file) as reader:
        return Checkpoint(source=source, shards=(Shard(file, reader.header),))


def _read_index(index_path: Path) -> dict[str, Any]:
    try:
        text = index_path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointError(located(index_path, None, "invalid index file: not UTF-8 "
                                      f"(byte {error.start})")) from None
    except OSError as error:
        raise InputError(located(index_path, None, f"cannot be read ({error.strerror})")) from None
    index = loads_strict(text, "the index file",
                         lambda rule: CheckpointError(located(index_path, None, rule)))
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        model_config = isinstance(index, dict) and "model_type" in index
        raise CheckpointError(
            located(index_path, None, "is not a sharded checkpoint's index: it has no "
                    "weight_map object (qz reads model.safetensors.index.json)"),
            hint=("this is a model's config.json: to quantize the model, give its folder"
                  if model_config else "give a .safetensors file, an index, or a model folder")
        )
    return index


def _open_sharded(source: Path, index_path: Path) -> Checkpoint:
    index = _read_index(index_path)
    folder = index_path.parent
    weight_map: dict[str, Any] = index["weight_map"]
    shard_names: list[str] = []
    for tensor, shard_name in weight_map.items():
        if (
            not isinstance(shard_name, str)
            or Path(shard_name).name != shard_name
            or shard_name in ("", ".", "..")
            or "\\" in shard_name
        ):
            raise CheckpointError(
                located(index_path, tensor, f"shard path {shard_name!r} must be a file name "
                        "in the index's folder")
            )
        if shard_name not in shard_names:
            shard_names.append(shard_name)
    shards = []
    owner: dict[str, str] = {}
    for shard_name in sorted(shard_names):
        shard_path = folder / shard_name
        if not shard_path.is_file():
            raise CheckpointError(
                located(index_path, None, f"shard {shard_name!r} listed in the index is missing")
            )
        with SafetensorsReader(shard_path) as reader:
            header = reader.header
        for entry in header.tensors:
            if entry.name in owner:
                raise CheckpointError(
                    located(folder, entry.name, f"appears in shard {owner[entry.name]!r} and "
                            f"in shard {shard_name!r}")
                )
            owner[entry.name] = shard_name
            mapped = weight_map.get(entry.name)
            if mapped != shard_name:
                where = "is not listed" if mapped is None else f"is mapped to {mapped!r}"
                raise CheckpointError(
                    located(shard_path, entry.name, f"is in this shard but {where} in the index")
                )
        shards.append(Shard(shard_path, header))
    for tensor, shard_name in weight_map.items():
        if owner.get(tensor) != shard_name:
            raise CheckpointError(
                located(index_path, tensor, f"is mapped to shard {shard_name!r}, which does "
                        "not hold it")
            )
    return Checkpoint(source=source, shards=tuple(shards), index_path=index_path, index=index)
