"""Where a job's output goes and what a folder output holds besides the shards: the
default output path, the checks made before any work, the rewritten index, the model's
config.json and the other files of a model folder."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import InputError, OutputError, located
from ..storage.checkpoint import Checkpoint, Shard
from ..storage.dtypes import DTYPE_BITS
from ..storage.jsonfile import loads_strict
from ..storage.writer import PlannedTensor, StagedFolder, check_output_path

CONFIG_NAME = "config.json"


def default_output(checkpoint: Checkpoint, suffix: str, folder: bool = False) -> Path:
    """``model.safetensors`` → ``model.<suffix>.safetensors``; a sharded folder ``llama``
    → ``llama.<suffix>`` beside it (and ``model.<suffix>`` when ``folder`` is asked for a
    single file). A suffix qz gave the input is replaced, not stacked."""
    if checkpoint.sharded:
        source = checkpoint.folder
        if source.name in ("", ".", ".."):
            source = source.resolve()
        return source.parent / f"{_stem(source.name)}.{suffix}"
    path = checkpoint.shards[0].path
    stem = _stem(path.name.removesuffix(".safetensors"))
    return path.with_name(f"{stem}.{suffix}" if folder else f"{stem}.{suffix}.safetensors")


def _stem(name: str) -> str:
    return name.removesuffix(".ct-int8").removesuffix(".int8")


class Destination:
    """Where a job writes: one file, published by its writer, or a folder, built under a
    hidden name and renamed into place whole. The target is checked on creation, before
    any work is done."""

    def __init__(self, target: Path, checkpoint: Checkpoint, force: bool, folder: bool) -> None:
        self.target = target
        self.folder = folder
        self._staging: StagedFolder | None = None
        if folder:
            _check_folder_output(target, checkpoint, force)
            self._staging = StagedFolder(target, force)
        else:
            check_output_path(target, [shard.path for shard in checkpoint.shards], force)

    def __enter__(self) -> Destination:
        if self._staging is not None:
            self._staging.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._staging is not None:
            self._staging.__exit__(*exc_info)

    def path_for(self, shard: Shard) -> Path:
        """Where the output of ``shard`` is written."""
        return self._staging.path / shard.path.name if self._staging is not None else self.target

    def write_text(self, name: str, text: str) -> None:
        assert self._staging is not None, "only a folder holds other files"
        (self._staging.path / name).write_text(text, encoding="utf-8")

    def copy(self, source: Path) -> None:
        assert self._staging is not None, "only a folder holds other files"
        shutil.copy2(source, self._staging.path / source.name)

    def publish(self) -> None:
        if self._staging is not None:
            self._staging.publish()


def _check_folder_output(output: Path, checkpoint: Checkpoint, force: bool) -> None:
    if output.exists() and output.resolve() == checkpoint.folder.resolve():
        raise OutputError(located(output, None, "output would overwrite the input folder"),
                          hint="choose another folder with -o")
    if not output.parent.is_dir():
        raise OutputError(located(output, None, f"directory {str(output.parent)!r} does not "
                                  "exist"))
    if output.exists():
        if not output.is_dir():
            raise OutputError(located(output, None, "exists and is not a folder"))
        if not force:
            raise OutputError(located(output, None, "already exists"),
                              hint="use --force to replace it")
        if any(output.iterdir()) and not any(output.glob("*.safetensors.index.json")):
            raise OutputError(located(output, None, "is not a checkpoint folder; refusing to "
                                      "replace it"), hint="choose another folder with -o")


def companion_files(checkpoint: Checkpoint) -> list[Path]:
    """Other files of a sharded model folder (tokenizer, …) to copy along; config.json is
    written by the job itself."""
    if checkpoint.index_path is None:
        return []
    skip = {checkpoint.index_path.name, CONFIG_NAME} | {shard.path.name
                                                        for shard in checkpoint.shards}
    return sorted(
        path for path in checkpoint.folder.iterdir()
        if path.is_file() and path.name not in skip and not path.name.startswith(".")
        and not path.name.endswith(".safetensors")
    )


def index_text(checkpoint: Checkpoint, shard_tensors: dict[str, list[PlannedTensor]]) -> str:
    """The output's index: the input's, with the output's tensors and total size."""
    assert checkpoint.index is not None
    weight_map = {tensor.name: shard for shard, tensors in shard_tensors.items()
                  for tensor in tensors}
    total = sum(math.prod(t.shape) * DTYPE_BITS[t.dtype] // 8
                for tensors in shard_tensors.values() for t in tensors)
    index = dict(checkpoint.index)
    metadata = dict(index.get("metadata") or {})
    metadata["total_size"] = total
    index["metadata"] = metadata
    index["weight_map"] = dict(sorted(weight_map.items()))
    return json.dumps(index, indent=2, ensure_ascii=False) + "\n"


def model_config(checkpoint: Checkpoint) -> dict[str, Any] | None:
    """The model's config.json beside the weights (None: there is none), read before
    any work so that a broken one is refused up front.

    Raises:
        InputError: config.json is not UTF-8, not JSON, or not a JSON object.
    """
    path = checkpoint.folder / CONFIG_NAME
    if not path.is_file():
        return None

    def fail(rule: str) -> InputError:
        return InputError(located(path, None, rule),
                          hint="repair the file, or move it away to go without it")

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise fail("is not UTF-8 text") from None
    except OSError as error:
        raise InputError(located(path, None, f"cannot be read ({error.strerror})")) from None
    config = loads_strict(text, "config.json", fail)
    if not isinstance(config, dict):
        raise fail("config.json must be a JSON object")
    return config


def finish_folder(destination: Destination, checkpoint: Checkpoint,
                  shard_tensors: dict[str, list[PlannedTensor]],
                  config: dict[str, Any] | None,
                  new_config: Callable[[dict[str, Any] | None], dict[str, Any] | None]) -> None:
    """Write a folder output's index, config.json and the model folder's other files."""
    if checkpoint.sharded:
        assert checkpoint.index_path is not None
        destination.write_text(checkpoint.index_path.name, index_text(checkpoint, shard_tensors))
        for path in companion_files(checkpoint):
            destination.copy(path)
    changed = new_config(config)
    if changed is not None and changed != config:
        destination.write_text(CONFIG_NAME, json.dumps(changed, indent=2) + "\n")
    elif config is not None and checkpoint.sharded:
        destination.copy(checkpoint.folder / CONFIG_NAME)
