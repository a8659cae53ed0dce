"""Where a job's output goes and what a folder output holds besides the weights.

Folders are the unit (DESIGN §5): a model folder in (a folder, an index, or a
``.safetensors`` file of a folder with a config.json) gives a complete model folder out,
beside the input and never inside it, holding the rewritten weights, index and
config.json and every other file of the model (tokenizer, templates, model card,
subfolders such as ``1_Pooling/``) except weights in other formats. A loose
``.safetensors`` file gives a file beside it, unless the format writes folders or ``-o``
names a folder (``DIR/`` or an existing folder). A model in a Hugging Face cache gives
its output in the current folder, named after the model: qz never writes in a cache.

What qz may replace (``--force``): an output it wrote (every weight file's metadata names
qz), or an empty folder; nothing else. Outputs keep their input's permission bits.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, OutputError, QzError, located
from ..formats import DEQUANTIZED_SUFFIX, strip_suffix

# Weights in other formats are left out: a copy would hand a loader the full-precision
# model beside the quantized one.
from ..storage.checkpoint import OTHER_WEIGHT_SUFFIXES, Checkpoint, Shard
from ..storage.dtypes import DTYPE_BITS
from ..storage.jsonfile import loads_strict
from ..storage.reader import SafetensorsReader
from ..storage.writer import PlannedTensor, StagedFolder, check_output_path
from .provenance import KEY_VERSION
from .reports import FolderReport

CONFIG_NAME = "config.json"
#: Folders that hold another copy of the weights (Llama's ``original/`` checkpoint).
OTHER_WEIGHT_FOLDERS = ("original",)


@dataclass(frozen=True)
class FolderContents:
    """What a folder output carries over from the input's model folder: files by their
    path inside it, and what is left out with the reason."""

    files: tuple[Path, ...] = ()
    left_out: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class OutputPlan:
    """Where a job writes: a file, or a folder (with what it carries over, when the
    input is a model folder)."""

    path: Path
    folder: bool
    contents: FolderContents | None = None  # None: the input is not a model folder


def model_folder(checkpoint: Checkpoint) -> Path | None:
    """The model folder the checkpoint is, if it is one: a folder or an index was named,
    or a ``.safetensors`` file of a folder with a config.json (vLLM and mlx-lm load every
    ``.safetensors`` of such a folder, so nothing may be written in it)."""
    if checkpoint.sharded or checkpoint.source.is_dir():
        return checkpoint.folder
    folder = checkpoint.folder
    return folder if (folder / CONFIG_NAME).is_file() else None


#: The folders of a Hugging Face cache's repositories: ``models--ORG--NAME``.
_CACHE_REPOSITORIES = ("models--", "datasets--", "spaces--")


def cached_model(path: Path) -> str | None:
    """The model's name when ``path`` lies in a Hugging Face cache snapshot
    (``…/hub/models--ORG--NAME/snapshots/REVISION``), else None.

    >>> cached_model(Path("/c/hub/models--HuggingFaceTB--SmolLM2-135M/snapshots/12ab"))
    'SmolLM2-135M'
    """
    parts = path.absolute().parts
    for index, part in enumerate(parts[:-1]):
        if part.startswith(_CACHE_REPOSITORIES) and parts[index + 1] == "snapshots":
            return part.split("--")[-1]
    return None


def _in_cache(path: Path) -> bool:
    return any(part.startswith(_CACHE_REPOSITORIES)
               for part in path.resolve().parts[:-1] + path.absolute().parts[:-1])


def plan_output(checkpoint: Checkpoint, output: str | Path | None, suffix: str,
                folder_format: bool) -> OutputPlan:
    """Decide the output path and kind (see the module's docstring).

    Raises:
        OutputError: ``-`` was given as the output, or a file name for a folder output.
    """
    if output is not None and str(output) == "-":
        raise OutputError("'-' is not an output: qz writes files and folders, not to stdout",
                          hint="give a file or folder name with -o")
    model = model_folder(checkpoint)
    names_folder = output is not None and (str(output).endswith(("/", os.sep))
                                           or Path(output).is_dir())
    names_file = output is not None and str(output).endswith(".safetensors")
    as_folder = folder_format or checkpoint.sharded or names_folder or (
        model is not None and not names_file)
    if as_folder and names_file:
        what = ("this format writes a folder" if folder_format
                else "a sharded checkpoint gives a folder")
        raise OutputError(located(output, None, f"names a file, but {what}"),
                          hint="give a folder name with -o")
    if output is not None:
        path = Path(output)
    else:
        source = model if model is not None else checkpoint.shards[0].path
        path = _beside(source, suffix, folder=as_folder)
    contents = folder_contents(checkpoint, model) if as_folder and model is not None else None
    return OutputPlan(path, as_folder, contents)


def _beside(source: Path, suffix: str, folder: bool) -> Path:
    """``llama`` → ``llama.<suffix>``; ``model.safetensors`` → ``model.<suffix>`` (a
    folder) or ``model.<suffix>.safetensors``; a suffix qz gave is replaced (a
    dequantized output keeps the name of what it was restored from). A model in a
    Hugging Face cache goes to the current folder, named after the model."""
    if source.name in ("", ".", ".."):
        source = source.resolve()
    cached = cached_model(source)
    if cached is not None:
        return Path(cached + "." + suffix)
    name = source.name.removesuffix(".safetensors")
    stem = name if suffix == DEQUANTIZED_SUFFIX else strip_suffix(name)
    name = f"{stem}.{suffix}" if folder or source.is_dir() else f"{stem}.{suffix}.safetensors"
    return source.parent / name


def folder_contents(checkpoint: Checkpoint, folder: Path) -> FolderContents:
    """Every file of the model folder to carry over, and what is left out and why. The
    checkpoint's own files (weights, index, config.json) are written by the job."""
    own = {shard.path.name for shard in checkpoint.shards} | {CONFIG_NAME}
    if checkpoint.index_path is not None:
        own.add(checkpoint.index_path.name)
    files: list[Path] = []
    left_out: list[tuple[str, str]] = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if name in own:
            continue
        reason = _left_out_reason(entry, top_level=True)
        if reason is not None:
            left_out.append((name + ("/" if entry.is_dir() else ""), reason))
        elif entry.is_dir():
            kept, dropped = _walk(entry, Path(name))
            if kept or not dropped:
                files += kept
                left_out += dropped
            else:  # nothing of it is carried over: say so once
                left_out.append((f"{name}/", "only weights in other formats"))
        else:
            files.append(Path(name))
    return FolderContents(tuple(files), tuple(left_out))


def _walk(folder: Path, relative: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    files: list[Path] = []
    left_out: list[tuple[str, str]] = []
    for entry in sorted(folder.iterdir()):
        inner = relative / entry.name
        reason = _left_out_reason(entry, top_level=False)
        if reason is not None:
            left_out.append((str(inner) + ("/" if entry.is_dir() else ""), reason))
        elif entry.is_dir():
            kept, dropped = _walk(entry, inner)
            files += kept
            left_out += dropped
        else:
            files.append(inner)
    return files, left_out


def _left_out_reason(entry: Path, top_level: bool) -> str | None:
    name = entry.name
    if name.startswith("."):
        return "hidden"
    if entry.is_symlink() and entry.is_dir():
        # It may lead out of the model folder, or back into it; files that are links are
        # followed (the Hugging Face cache keeps every file as one).
        return "a link to a folder, not followed"
    if entry.is_dir():
        if top_level and name in OTHER_WEIGHT_FOLDERS:
            return "another copy of the weights"
        return None
    if name.endswith(OTHER_WEIGHT_SUFFIXES) or name.removesuffix(".index.json").endswith(
            OTHER_WEIGHT_SUFFIXES):
        return "weights in a format qz does not convert"
    if top_level and name.endswith((".safetensors", ".safetensors.index.json")):
        return "weights that are not part of this checkpoint"
    if not entry.is_file():
        return "not a regular file"
    return None


def check_destination(plan: OutputPlan, checkpoint: Checkpoint, force: bool) -> None:
    """Refuse, before any work (and in a dry run), an output the job may not write: in a
    Hugging Face cache, inside the input, an existing one without ``force``, or one qz
    did not write (which ``force`` never replaces).

    Raises:
        OutputError: naming the output and why.
    """
    if _in_cache(plan.path):
        raise OutputError(located(plan.path, None, "is inside a Hugging Face cache, which qz "
                                  "never writes to"),
                          hint="choose a place outside the cache with -o")
    if plan.folder:
        _check_folder_output(plan.path, checkpoint, force)
        return
    check_output_path(plan.path, [shard.path for shard in checkpoint.shards], force)
    model = model_folder(checkpoint)
    if model is not None and plan.path.absolute().parent.resolve() == model.resolve():
        raise OutputError(located(plan.path, None, "would be written inside the model folder "
                                  "(vLLM and mlx-lm load every .safetensors there)"),
                          hint="give a folder beside the model with -o, or no -o")
    if plan.path.exists() and not written_by_qz(plan.path):
        raise OutputError(located(plan.path, None, "was not written by qz; --force replaces "
                                  "only qz's own outputs"), hint="choose another path with -o")


def written_by_qz(path: Path) -> bool:
    """Whether ``path`` is an output of qz: a safetensors file whose metadata names qz's
    version, or a folder whose every weight file does (and that has one)."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    for file in files:
        try:
            with SafetensorsReader(file) as reader:
                if KEY_VERSION not in reader.header.metadata:
                    return False
        except QzError:
            return False
    return bool(files)


def permissions(path: Path) -> int:
    """The permission bits of ``path``, which an output made from it keeps."""
    return stat.S_IMODE(path.stat().st_mode)


class Destination:
    """Where a job writes: one file, published by its writer, or a folder, built under a
    hidden name and renamed into place whole. The target is checked on creation, before
    any work is done."""

    def __init__(self, plan: OutputPlan, checkpoint: Checkpoint, force: bool) -> None:
        self.plan = plan
        self._staging: StagedFolder | None = None
        check_destination(plan, checkpoint, force)
        if plan.folder:
            folder = model_folder(checkpoint)
            self._staging = StagedFolder(plan.path, force or _is_empty_folder(plan.path),
                                         permissions(folder) if folder is not None else None)

    def __enter__(self) -> Destination:
        if self._staging is not None:
            self._staging.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._staging is not None:
            self._staging.__exit__(*exc_info)

    def path_for(self, shard: Shard) -> Path:
        """Where the output of ``shard`` is written."""
        if self._staging is None:
            return self.plan.path
        return self._staging.path / shard.path.name

    def write_text(self, name: str, text: str, like: Path | None = None) -> None:
        """Write a file of the folder, with the permission bits of the input file
        ``like`` (the config.json or index it replaces)."""
        assert self._staging is not None, "only a folder holds other files"
        target = self._staging.path / name
        target.write_text(text, encoding="utf-8")
        if like is not None and like.is_file():
            os.chmod(target, permissions(like))

    def copy(self, source: Path, relative: Path) -> None:
        """Copy a file of the model folder to the same place in the output (links are
        followed: the Hugging Face cache keeps its files as links to blobs)."""
        assert self._staging is not None, "only a folder holds other files"
        target = self._staging.path / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copy2(source, target)
        except OSError as error:
            raise OutputError(located(target, None, f"could not copy {str(source)!r} "
                                      f"({error.strerror})")) from None

    def publish(self) -> None:
        if self._staging is not None:
            self._staging.publish()


def _is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _check_folder_output(output: Path, checkpoint: Checkpoint, force: bool) -> None:
    source = (model_folder(checkpoint) or checkpoint.shards[0].path).resolve()
    target = output.resolve()
    if target == source or source in target.parents:
        raise OutputError(located(output, None, "would be written inside the input, which "
                                  "qz never changes"),
                          hint="choose a folder outside the input with -o")
    if target in source.parents:
        raise OutputError(located(output, None, "holds the input; replacing it would delete "
                                  "the input"), hint="choose another folder with -o")
    if not output.parent.is_dir():
        raise OutputError(located(output, None, f"directory {str(output.parent)!r} does not "
                                  "exist"))
    if not output.exists() or _is_empty_folder(output):
        return
    if not output.is_dir():
        raise OutputError(located(output, None, "exists and is not a folder"))
    if not force:
        raise OutputError(located(output, None, "already exists"),
                          hint="use --force to replace it")
    if not written_by_qz(output):
        raise OutputError(located(output, None, "holds files qz did not write; --force "
                                  "replaces only qz's own outputs or an empty folder"),
                          hint="choose another folder with -o")


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
    """The model's config.json (None: the input is not a model folder, or it has none),
    read before any work so that a broken one is refused up front.

    Raises:
        InputError: config.json is not UTF-8, not JSON, or not a JSON object.
    """
    folder = model_folder(checkpoint)
    if folder is None or not (folder / CONFIG_NAME).is_file():
        return None
    path = folder / CONFIG_NAME

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
                  config: dict[str, Any] | None) -> None:
    """Write a folder output's index and config.json, and carry over the model folder's
    other files."""
    folder = model_folder(checkpoint)
    if checkpoint.index_path is not None:
        destination.write_text(checkpoint.index_path.name, index_text(checkpoint, shard_tensors),
                               like=checkpoint.index_path)
    if config is not None:
        destination.write_text(CONFIG_NAME, json.dumps(config, indent=2) + "\n",
                               like=None if folder is None else folder / CONFIG_NAME)
    contents = destination.plan.contents
    if contents is not None and folder is not None:
        for relative in contents.files:
            destination.copy(folder / relative, relative)


def folder_report(plan: OutputPlan) -> FolderReport | None:
    """What a report says of a folder output (None for a file)."""
    if not plan.folder:
        return None
    contents = plan.contents or FolderContents()
    return FolderReport(tuple(str(path) for path in contents.files), contents.left_out)
