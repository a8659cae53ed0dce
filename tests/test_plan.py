"""The planner: which tensors are quantized and why, what each becomes in the chosen
format and how many bytes that is, from the header alone."""

from __future__ import annotations

import pytest

from quantize_cli.core import Scheme
from quantize_cli.errors import InputError
from quantize_cli.formats import format_named
from quantize_cli.jobs.plan import MIN_ELEMENTS, plan_shard, plan_tensor, select
from quantize_cli.storage.header import Header, TensorEntry

QZ, CT = format_named("qz"), format_named("compressed-tensors")


def entry(name: str, dtype: str, shape: tuple[int, ...]) -> TensorEntry:
    return TensorEntry(name, dtype, shape, 0, 0)


@pytest.mark.parametrize("tensor,include,exclude,expected", [
    (entry("w", "BF16", (64, 128)), (), (), (True, "BF16, 2-D")),
    (entry("n", "BF16", (4096,)), (), (), (False, "1-D tensor")),
    (entry("s", "F32", (16, 16)), (), (), (False, f"fewer than {MIN_ELEMENTS} elements")),
    (entry("ids", "I64", (1, 2048)), (), (), (False, "integer dtype I64")),
    (entry("m", "BOOL", (64, 64)), (), (), (False, "bool dtype BOOL")),
    (entry("f8", "F8_E4M3", (64, 64)), (), (), (False, "float format qz does not quantize "
                                                       "dtype F8_E4M3")),
    (entry("x", "F32", ()), (), (), (False, "scalar")),
    (entry("e", "F32", (0, 8)), (), (), (False, "empty tensor")),
    (entry("n", "BF16", (4096,)), ("n*",), (), (True, "matches --include 'n*'")),
    (entry("w", "BF16", (64, 128)), ("n*",), (), (False, "matches no --include pattern")),
    (entry("w", "BF16", (64, 128)), ("w",), ("w",), (False, "matches --exclude 'w'")),
])
def test_selection_rules(tensor: TensorEntry, include: tuple[str, ...],
                         exclude: tuple[str, ...], expected: tuple[bool, str]) -> None:
    assert select(tensor, include, exclude) == expected


def test_output_bytes_per_format() -> None:
    weight = entry("l.weight", "BF16", (64, 256))
    # qz: 64×256 int8 codes + 64×2 float32 scales (+ 64×2 int8 zero points for affine).
    assert plan_tensor(weight, Scheme("absmax", "block", 128), QZ).output_bytes == 16384 + 512
    assert plan_tensor(weight, Scheme("affine", "block", 128), QZ).output_bytes == (
        16384 + 512 + 128)
    # compressed-tensors: packed codes + BF16 scales + the I64 shape.
    assert plan_tensor(weight, Scheme("absmax", "block", 128), CT).output_bytes == (
        16384 + 256 + 16)
    copied = plan_tensor(entry("n", "BF16", (256,)), Scheme(), QZ)
    assert copied.scheme is None and copied.output_bytes == 512


def test_format_keeps_what_it_cannot_store() -> None:
    plan = plan_tensor(entry("model.embed_tokens.weight", "BF16", (256, 128)), Scheme(), CT)
    assert plan.scheme is None
    assert plan.reason == "kept for vLLM: an embedding (vLLM quantizes Linear layers only)"
    assert [t.name for t in plan.outputs] == ["model.embed_tokens.weight"]


def test_collisions_name_the_role() -> None:
    header = Header({}, (TensorEntry("w", "F32", (32, 32), 0, 4096),
                         TensorEntry("w_zero_point", "I8", (32, 1), 4096, 4128)), 8)
    with pytest.raises(InputError, match="tensor 'w_zero_point': collides with the name qz "
                                         "would give the zero point of 'w'"):
        plan_shard(header, "m.safetensors", Scheme("affine", "channel"), QZ)
    assert plan_shard(header, "m.safetensors", Scheme("absmax", "channel"), QZ)[0].quantized


def test_with_scheme_replans_the_outputs() -> None:
    plan = plan_tensor(entry("w", "F32", (8, 256)), Scheme(), QZ)
    replanned = plan.with_scheme(Scheme("affine", "channel"), "chosen", QZ)
    assert [t.name for t in replanned.outputs] == ["w", "w_scale", "w_zero_point"]
    assert replanned.with_scheme(None, "kept", QZ).output_bytes == 8 * 256 * 4
