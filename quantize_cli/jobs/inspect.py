"""The inspect job: what a checkpoint holds, from its headers."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..formats import Role, StoredWeight, detect
from ..storage.checkpoint import open_checkpoint
from ..storage.reader import SafetensorsReader
from .outputs import model_config
from .reports import InspectedTensor, InspectReport


def inspect_checkpoint(source: str | Path) -> InspectReport:
    """Describe a checkpoint from its headers: tensors, what each is to a quantized
    weight, schemes, metadata. Tensor data is not read, except where a format keeps a
    weight's shape in a tiny tensor (compressed-tensors' ``weight_shape``).

    >>> inspect_checkpoint("model.int8.safetensors").format_version   # doctest: +SKIP
    '1'
    """
    checkpoint = open_checkpoint(source)
    config = model_config(checkpoint)
    tensors: list[InspectedTensor] = []
    format_name = format_version = None
    tensor_metadata_keys: tuple[str, ...] = ()
    for shard in checkpoint.shards:
        header = shard.header
        fmt = detect(header)
        weights: list[StoredWeight] = []
        if fmt is not None:
            with SafetensorsReader(shard.path) as reader:
                weights = fmt.find(reader, config)
            format_name, format_version = fmt.name, fmt.version(header)
            tensor_metadata_keys = fmt.tensor_metadata_keys
        stored: dict[str, tuple[StoredWeight, Role]] = {
            name: (weight, role) for weight in weights for name, role in weight.tensors}
        shard_name = shard.path.name if checkpoint.sharded else None
        for tensor in header.tensors:
            plain = InspectedTensor(tensor.name, tensor.dtype, tensor.shape, tensor.nbytes,
                                    "tensor", shard=shard_name)
            if tensor.name not in stored:
                tensors.append(plain)
                continue
            weight, role = stored[tensor.name]
            if role == "codes":
                tensors.append(replace(plain, role=role, of=weight.name, scheme=weight.scheme,
                                       original_dtype=weight.dtype, weight_shape=weight.shape,
                                       description=weight.description))
            else:
                tensors.append(replace(plain, role=role, of=weight.name))
    return InspectReport(
        source=checkpoint.source,
        shards=[(shard.path.name, shard.header.file_size) for shard in checkpoint.shards],
        metadata=checkpoint.shards[0].header.metadata,
        tensors=sorted(tensors, key=lambda tensor: tensor.name),
        format=format_name,
        format_version=format_version,
        sharded=checkpoint.sharded,
        tensor_metadata_keys=tensor_metadata_keys,
    )
