"""What every model format provides: the interface the jobs call, and the records it
shares with them.

A model format is the container around the weights: which layouts (layout.py) it holds
for which schemes, what it adds to a file's metadata and to a model's config.json, which
tensors it keeps in float for the runtime that loads it (deployment rules such as
tensor parallelism and kernel shapes), which layers must share a scheme, how its
quantized weights are found in a file, and what dequantizing gives back of its config.
The jobs (quantize, dequantize, inspect, diff) call these and never branch on a format.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..core import Scheme
from ..errors import SchemeError
from ..storage.header import Header, TensorEntry
from ..storage.reader import SafetensorsReader
from .layout import Layout, StoredLayout, StoredTensor, StoredWeight


@dataclass(frozen=True)
class Deployment:
    """What an output will run on, as far as a format's rules depend on it: the number
    of GPUs each layer is split over (tensor parallelism) and the model's config.json."""

    tensor_parallel: int = 1
    config: dict[str, Any] | None = None


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight a job is about to quantize: its input tensor and its scheme."""

    entry: TensorEntry
    scheme: Scheme


class ModelFormat(ABC):
    """One on-disk model format. Subclasses are registered in ``formats/__init__.py``."""

    #: The ``--format`` value, and the word for the format everywhere.
    name: ClassVar[str]
    #: One line for ``--format``'s help.
    summary: ClassVar[str]
    #: What default output names say of the format, before the scheme
    #: (``model.<prefix>int8.safetensors``).
    prefix: ClassVar[str]
    #: The layouts this format holds, tried in order for a scheme.
    layouts: ClassVar[tuple[Layout, ...]]
    #: Layouts of this format that qz reads but does not write.
    read_only_layouts: ClassVar[tuple[StoredLayout, ...]] = ()
    #: Whether qz writes this format (``--format``), or only reads it.
    writes: ClassVar[bool] = True
    #: What it stores, in words, for refusals.
    supported: ClassVar[str]
    #: The scheme when none is asked for.
    default_scheme: ClassVar[Scheme] = Scheme()
    #: Whether the output is always a folder (the format is described in config.json).
    folder_output: ClassVar[bool] = False
    #: Whether the format's shape rules depend on tensor parallelism (served by vLLM).
    tensor_parallel: ClassVar[bool] = False
    #: Metadata keys that describe tensors one by one (too long for a metadata table).
    tensor_metadata_keys: ClassVar[tuple[str, ...]] = ()
    #: Whether output names use llm-compressor's preset names for its schemes.
    names_presets: ClassVar[bool] = False

    # ------------------------------------------------------------------------ writing

    def layout_for(self, scheme: Scheme) -> Layout:
        """The layout this format stores ``scheme`` in.

        >>> from quantize_cli.formats import format_named
        >>> format_named("compressed-tensors").layout_for(Scheme("nvfp4")).name
        'nvfp4-pack-quantized'

        Raises:
            SchemeError: the format cannot store the scheme (its message says why).
        """
        reasons = []
        for layout in self.layouts:
            reason = layout.refusal(scheme)
            if reason is None:
                return layout
            reasons.append(reason)
        raise SchemeError(f"{self.supported}; {self.refusal(scheme, reasons)}",
                          hint=self.hint(scheme))

    def refusal(self, scheme: Scheme, reasons: Sequence[str]) -> str:
        """Why no layout takes ``scheme``, from each layout's reason: by default the
        most specific one (the first that is not about another kind of element)."""
        specific = [reason for reason in reasons if not reason.startswith(("not ", "stores "))]
        return (specific or [f"{scheme.describe()} is not supported"])[0]

    def hint(self, scheme: Scheme) -> str | None:
        """What to do instead when ``scheme`` cannot be stored."""
        return None

    def check_scheme(self, scheme: Scheme) -> None:
        """Refuse, before any work, a scheme this format cannot store (SchemeError)."""
        self.layout_for(scheme)

    def stored_tensors(self, entry: TensorEntry, scheme: Scheme) -> list[StoredTensor]:
        """The tensors a quantized ``entry`` becomes, from its header entry alone."""
        return self.layout_for(scheme).stored_tensors(entry, scheme)

    def keep_reason(self, entry: TensorEntry, scheme: Scheme,
                    deployment: Deployment) -> str | None:
        """Why this tensor must stay in its dtype in this format (None: it can be
        quantized)."""
        return None

    def fused_with(self, name: str) -> str | None:
        """The key shared by the layers a runtime fuses with ``name`` (q/k/v, gate/up),
        which must share a scheme (and NVFP4's global scale); None: not fused."""
        return None

    def check_model(self, decided: Mapping[str, Scheme | None]) -> None:  # noqa: B027
        """Refuse, before any work, schemes the runtime cannot load together: ``decided``
        maps every tensor to its scheme (None: kept in its dtype)."""

    def notes(self, schemes: Sequence[Scheme]) -> list[str]:
        """What a user should know about an output holding ``schemes`` (which runtimes
        load it, which do not)."""
        return []

    @abstractmethod
    def shard_metadata(self, metadata: dict[str, str],
                       quantized: Sequence[QuantizedWeight]) -> dict[str, str]:
        """A shard's output ``__metadata__``, from its input's."""

    def model_config(self, config: dict[str, Any] | None, scheme: Scheme,
                     quantized: Sequence[QuantizedWeight],
                     kept: Sequence[TensorEntry]) -> dict[str, Any] | None:
        """The output model's config.json from the input's (None: there is none);
        ``scheme`` is the one asked for, ``quantized`` the weights with the schemes they
        got, ``kept`` the float tensors that stayed in their dtype."""
        return config

    # ------------------------------------------------------------------------ reading

    @abstractmethod
    def recognises(self, header: Header) -> bool:
        """Whether a file is in this format, from its header alone (cheap)."""

    def find(self, reader: SafetensorsReader,
             config: dict[str, Any] | None) -> list[StoredWeight]:
        """The quantized weights of a file this format recognises; ``config`` is the
        model's config.json, for formats that describe their weights there. By default
        every tensor is offered to each layout, which says whether it is the codes of a
        weight it stores.

        Raises:
            QuantizedFormatError: the file breaks the format.
        """
        found = []
        for entry in reader.header.tensors:
            for layout in (*self.layouts, *self.read_only_layouts):
                weight = layout.match(reader, entry, config)
                if weight is not None:
                    found.append(weight)
                    break
        return found

    def version(self, header: Header) -> str | None:
        """The format version a file declares, if the format has versions."""
        return None

    def float_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """config.json of the dequantized model: without what this format added."""
        return {key: value for key, value in config.items() if key != "quantization_config"}

    def float_metadata(self, metadata: dict[str, str]) -> dict[str, str]:
        """A shard's ``__metadata__`` once dequantized (qz's own keys are dropped by the
        job)."""
        return metadata
