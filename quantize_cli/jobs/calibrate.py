"""The calibrate job (``qz calibrate``): run the float model over text and record what
every linear layer's inputs look like (calibration.py says what the file holds).

The only part of qz that needs torch and transformers (the ``[calibrate]`` extra); they
are imported here, when the job runs. The model runs one block of layers at a time over
all the calibration sequences: the inputs of the first block are captured once, then
each block is run on the outputs of the one before, with hooks on its linear layers that
add XᵀX (in float64), each column's largest magnitude and the token count; the block's
statistics are written to the file before the next block starts. Memory is the model,
the hidden states of the sequences, and one block's statistics. Linear layers outside
the repeated blocks (a language model's head, a pooler) read inputs that only the model's
own final layers make; they are not calibrated, and quantize them as it would without.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..core import get_num_threads
from ..errors import InputError, located
from ..storage.writer import PlannedTensor, SafetensorsWriter
from .calibration import (
    CALIBRATION_VERSION,
    KEY_CALIBRATION,
    MAX_ABS,
    MEAN_SQUARE,
    SECOND_MOMENT,
)
from .reports import CalibrateReport, NoProgress, Progress

#: Default calibration: this many sequences of this many tokens (at most the model's).
SEQUENCES, LENGTH = 128, 512
#: Sequences run through the model together.
BATCH = 8


def calibrate_model(model_folder: str | Path, text: str | Path, output: str | Path | None = None,
                    *, sequences: int = SEQUENCES, length: int = LENGTH, force: bool = False,
                    progress: Progress | None = None) -> CalibrateReport:
    """Run the float model in ``model_folder`` (transformers, on CPU, or a GPU when torch
    has one) over the text in the file ``text``, cut into ``sequences`` windows of
    ``length`` tokens, and write the statistics of every linear layer's inputs to
    ``output`` (default: ``MODEL.calibration.safetensors`` beside the folder).

    >>> calibrate_model("SmolLM2-135M", "prose.txt").output   # doctest: +SKIP
    PosixPath('SmolLM2-135M.calibration.safetensors')

    Raises:
        QzError: torch or transformers is missing, the folder holds no model transformers
            loads, the text is too short for one window, or the output exists.
    """
    torch, transformers = _libraries()
    progress = progress or NoProgress()
    folder = Path(model_folder)
    target = Path(output) if output is not None else folder.absolute().with_name(
        folder.absolute().name + ".calibration.safetensors")
    if target.exists() and not force:
        raise InputError(located(target, None, "already exists"), hint="use --force to replace it")
    text_path = Path(text)
    try:
        text_bytes = text_path.read_bytes()
    except OSError as error:
        raise InputError(located(text_path, None, f"cannot be read ({error.strerror})")) from None
    started = time.perf_counter()
    model, tokenizer = _load(folder, torch, transformers)
    windows = _windows(tokenizer, text_bytes.decode("utf-8", errors="replace"), sequences,
                       min(length, _longest(model)), text_path)
    blocks = _blocks(model, torch)
    device = next(model.parameters()).device
    batches = [torch.tensor(windows[start:start + BATCH], device=device)
               for start in range(0, len(windows), BATCH)]
    progress.start((len(blocks) + 1) * len(batches) + len(blocks), "calibrating")
    with torch.no_grad():
        captured = _first_block_inputs(model, blocks[0][1], batches, torch, progress)
        inputs = _shared_inputs(blocks, captured[0], torch, progress)
        linears = {name: module for block_name, block in blocks
                   for name, module in _linears(block, block_name, torch)}
        planned = [tensor for name, entry in inputs.items() if entry == name
                   for tensor in _stored(name, linears[name].in_features)]
        record = {"format_version": CALIBRATION_VERSION, "model": folder.absolute().name,
                  "text_sha256": hashlib.sha256(text_bytes).hexdigest(),
                  "tokens": len(windows) * len(windows[0]), "sequences": len(windows),
                  "length": len(windows[0]), "qz_version": __version__,
                  "layers": dict(sorted(inputs.items()))}
        metadata = {KEY_CALIBRATION: json.dumps(record, separators=(",", ":"), sort_keys=True)}
        with SafetensorsWriter(target, planned, metadata) as writer:
            for block_name, block in blocks:
                _write(writer, _measure_block(block_name, block, captured, inputs, torch,
                                              progress), torch)
            writer.publish()
    return CalibrateReport(folder, target, len(windows), len(windows[0]),
                           len(windows) * len(windows[0]), len(inputs),
                           len(set(inputs.values())), time.perf_counter() - started)


def _libraries() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError:
        raise InputError("qz calibrate runs the model with torch and transformers, which "
                         "are not installed",
                         hint="pip install 'qz[calibrate]'") from None
    # qz reports what matters itself, with its own progress bar.
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    # The qz command keeps BLAS to one thread, for its own tiles (DESIGN amendment 25);
    # torch's products here are the work, on every core qz uses.
    torch.set_num_threads(get_num_threads())
    return torch, transformers


def _load(folder: Path, torch: Any, transformers: Any) -> tuple[Any, Any]:
    """The float model (float32, in evaluation mode) and its tokenizer."""
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
        causal = any(name.endswith("ForCausalLM") for name in config.architectures or [])
        loader = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        model = loader.from_pretrained(folder, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as error:
        raise InputError(located(folder, None, f"transformers cannot load a model from it "
                                 f"({str(error).splitlines()[0]})"),
                         hint="qz calibrate takes a model folder with config.json, weights "
                              "and a tokenizer") from None
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval(), tokenizer


def _longest(model: Any) -> int:
    """The longest sequence the model takes (its position embeddings), or the default."""
    config = model.config
    return int(getattr(config, "max_position_embeddings", None) or LENGTH)


def _windows(tokenizer: Any, text: str, count: int, length: int,
             path: Path) -> list[list[int]]:
    """``count`` windows of ``length`` tokens, consecutive through the text (the last
    ones dropped if it is shorter), each opened by the tokenizer's start token if it has
    one."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else (
        tokenizer.cls_token_id)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    body = length - (start is not None)
    windows = [([start] if start is not None else []) + ids[offset:offset + body]
               for offset in range(0, len(ids) - body + 1, body)][:count]
    if not windows:
        raise InputError(located(path, None, f"holds {len(ids)} tokens, fewer than one "
                                 f"window of {length}"),
                         hint="give more text, or a smaller --length")
    return windows


def _blocks(model: Any, torch: Any) -> list[tuple[str, Any]]:
    """The model's repeated blocks (transformer layers), with their module names: the
    longest list of modules of one kind that hold linear layers."""
    best: tuple[str, Any] | None = None
    for name, module in model.named_modules():
        repeated = isinstance(module, torch.nn.ModuleList) and len(module) and all(
            type(child) is type(module[0]) for child in module) and any(
            isinstance(inner, torch.nn.Linear) for inner in module[0].modules())
        if repeated and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise InputError("the model has no repeated blocks of linear layers to calibrate")
    return [(f"{best[0]}.{index}", block) for index, block in enumerate(best[1])]


def _linears(block: Any, block_name: str, torch: Any) -> list[tuple[str, Any]]:
    return [(f"{block_name}.{name}", module) for name, module in block.named_modules()
            if isinstance(module, torch.nn.Linear)]


class _StopForward(Exception):
    """Raised by the hook that captured the first block's inputs: nothing after is run."""


def _first_block_inputs(model: Any, block: Any, batches: list[Any], torch: Any,
                        progress: Progress) -> list[tuple[list[Any], dict[str, Any]]]:
    """The positional and keyword arguments the first block receives, per batch."""
    captured: list[tuple[list[Any], dict[str, Any]]] = []

    def capture(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((list(args), dict(kwargs)))
        raise _StopForward

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                with contextlib.suppress(_StopForward):
                    if _takes_cache(model):
                        model(input_ids=batch, use_cache=False)
                    else:
                        model(input_ids=batch)
                progress.advance(1, "embeddings")
    finally:
        handle.remove()
    for args, kwargs in captured:
        if not args and "hidden_states" in kwargs:
            args.append(kwargs.pop("hidden_states"))
    return captured


def _takes_cache(model: Any) -> bool:
    return bool(getattr(model.config, "use_cache", False))


class _Moments:
    """XᵀX, each column's largest |x| and the token count of one input. XᵀX is
    symmetric: only its blocks on and above the diagonal are computed (a little over
    half the products of the whole), in float32 per batch (BLAS at full speed; a few
    thousand tokens) and summed over batches in float64."""

    BLOCK = 512

    def __init__(self, columns: int, torch: Any, device: Any) -> None:
        self.product = torch.zeros((columns, columns), dtype=torch.float64, device=device)
        self.largest = torch.zeros(columns, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, inputs: Any, torch: Any) -> None:
        flat = inputs.reshape(-1, inputs.shape[-1]).to(torch.float32)
        columns = flat.shape[1]
        for start in range(0, columns, self.BLOCK):
            rows = flat[:, start:start + self.BLOCK]
            self.product[start:start + self.BLOCK, start:] += (rows.T @ flat[:, start:]).to(
                torch.float64)
        self.largest = torch.maximum(self.largest, flat.abs().amax(dim=0).to(torch.float64))
        self.tokens += flat.shape[0]

    def second_moment(self, torch: Any) -> np.ndarray:
        """XᵀX / n, the blocks below the diagonal mirrored from those above."""
        upper = torch.triu(self.product)
        whole = upper + upper.T - torch.diag(torch.diagonal(upper))
        return np.asarray((whole / max(self.tokens, 1)).cpu().numpy())


def _shared_inputs(blocks: list[tuple[str, Any]], first: tuple[list[Any], dict[str, Any]],
                   torch: Any, progress: Progress) -> dict[str, str]:
    """Which input each linear layer reads, named after the first layer that reads it
    (q/k/v, gate/up read one), from one batch run through every block."""
    args, kwargs = first
    hidden = args[0]
    inputs: dict[str, str] = {}
    for block_name, block in blocks:
        seen: dict[tuple[int, tuple[int, ...]], str] = {}
        # Every input stays alive until the block has run: a freed input's address could
        # be given to a later, different one (the MLP's input took attention's, at times).
        held: list[Any] = []

        def hook_for(name: str, seen: dict[tuple[int, tuple[int, ...]], str] = seen,
                     held: list[Any] = held) -> Callable[..., None]:
            def hook(module: Any, hook_args: tuple[Any, ...]) -> None:
                tensor = hook_args[0]
                held.append(tensor)
                inputs[name] = seen.setdefault((tensor.data_ptr(), tuple(tensor.shape)), name)
            return hook

        handles = [module.register_forward_pre_hook(hook_for(name))
                   for name, module in _linears(block, block_name, torch)]
        try:
            output = block(hidden, *args[1:], **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        hidden = output[0] if isinstance(output, tuple) else output
        progress.advance(1, block_name)
    return inputs


def _measure_block(block_name: str, block: Any,
                   captured: list[tuple[list[Any], dict[str, Any]]], inputs: dict[str, str],
                   torch: Any, progress: Progress) -> dict[str, _Moments]:
    """Run ``block`` on every batch, adding the inputs of its linear layers (one entry
    for layers that share one) to their moments; each batch's hidden states become the
    block's output, the next block's input."""
    statistics: dict[str, _Moments] = {}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            tensor = args[0]
            if name not in statistics:
                statistics[name] = _Moments(tensor.shape[-1], torch, tensor.device)
            statistics[name].add(tensor, torch)
        return hook

    handles = [module.register_forward_pre_hook(hook_for(name))
               for name, module in _linears(block, block_name, torch) if inputs.get(name) == name]
    try:
        for args, kwargs in captured:
            output = block(*args, **kwargs)
            args[0] = output[0] if isinstance(output, tuple) else output
            progress.advance(1, block_name)
    finally:
        for handle in handles:
            handle.remove()
    return statistics


def _stored(name: str, columns: int) -> list[PlannedTensor]:
    return [PlannedTensor(name + SECOND_MOMENT, "F32", (columns, columns)),
            PlannedTensor(name + MEAN_SQUARE, "F32", (columns,)),
            PlannedTensor(name + MAX_ABS, "F32", (columns,))]


def _write(writer: SafetensorsWriter, statistics: dict[str, _Moments], torch: Any) -> None:
    for name, moments in statistics.items():
        moment = moments.second_moment(torch)
        writer.write(name + SECOND_MOMENT, moment.astype(np.float32))
        writer.write(name + MEAN_SQUARE, np.diagonal(moment).astype(np.float32))
        writer.write(name + MAX_ABS, moments.largest.cpu().numpy().astype(np.float32))
