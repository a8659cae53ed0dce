"""The inspect job: what a checkpoint holds, from its headers."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..formats import Role, StoredWeight
from .reports import InspectedTensor, InspectReport
from .source import open_source


def inspect_checkpoint(source: str | Path) -> InspectReport:
    """Describe a checkpoint from its headers: tensors, what each is to a quantized
    weight, schemes, metadata. Tensor data is not read, except where a format keeps a
    weight's shape in a tiny tensor (compressed-tensors' ``weight_shape``). A checkpoint
    quantized in a way qz does not read is described, not refused (``refused``).

    >>> inspect_checkpoint("model.int8.safetensors").format_version   # doctest: +SKIP
    '1'
    """
    opened = open_source(source, describe_only=True)
    checkpoint = opened.checkpoint
    tensors: list[InspectedTensor] = []
    format_name = format_version = None
    tensor_metadata_keys: tuple[str, ...] = ()
    for shard in opened.shards:
        header = shard.shard.header
        if shard.fmt is not None:
            format_name, format_version = shard.fmt.name, shard.fmt.version(header)
            tensor_metadata_keys = shard.fmt.tensor_metadata_keys
        stored: dict[str, tuple[StoredWeight, Role]] = {
            name: (weight, role) for weight in shard.weights for name, role in weight.tensors}
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
        refused=None if opened.refused is None else opened.refused.what,
    )
