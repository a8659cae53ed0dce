"""safetensors dtype codes: their sizes, and the numpy dtypes of the ones qz computes on."""

from __future__ import annotations

import functools

import numpy as np

#: Bits per element of every dtype the safetensors format defines (safetensors' ``Dtype``).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}

#: The floating dtypes qz quantizes (DESIGN §3).
FLOAT_DTYPES: tuple[str, ...] = ("F64", "F32", "F16", "BF16")

#: numpy dtypes of the fixed-width integer and bool dtypes (for showing values).
INTEGER_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
}

#: Names accepted by ``qz dequantize --dtype`` and the safetensors code each one writes.
OUTPUT_DTYPES: dict[str, str] = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


#: The safetensors codes numpy has no dtype for, by their ml_dtypes name.
_ML_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu"}


@functools.cache
def numpy_dtype(code: str) -> np.dtype:
    """The little-endian numpy dtype of a float (FP8 E4M3 and E8M0 included) or integer
    safetensors code.

    BF16 and the FP8 types come from ml_dtypes, because numpy has none of them. It is
    imported here, on first use, rather than with the module: importing it takes about
    half a second, which commands that read only headers (``qz inspect``, ``qz --help``)
    should not pay.

    >>> numpy_dtype("BF16").name, numpy_dtype("F8_E4M3").name, numpy_dtype("F8_E8M0").name
    ('bfloat16', 'float8_e4m3fn', 'float8_e8m0fnu')
    """
    if code in _ML_DTYPES:
        import ml_dtypes

        found: np.dtype = np.dtype(getattr(ml_dtypes, _ML_DTYPES[code]))
        return found
    if code in FLOAT_DTYPES:
        return np.dtype({"F64": "<f8", "F32": "<f4", "F16": "<f2"}[code])
    return INTEGER_DTYPES[code]


def alignment(code: str) -> int:
    """Bytes a tensor of this dtype should be aligned to (its element size, at least 1)."""
    return max(1, DTYPE_BITS[code] // 8)
