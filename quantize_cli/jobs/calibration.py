"""Calibration statistics: what ``qz calibrate`` measured of every linear layer's inputs,
in a safetensors file that any number of ``qz quantize --calibration`` runs read (bits,
groups, formats), without running the model again (DESIGN amendment 43).

For each distinct input (layers that read the same input, such as q/k/v or gate/up,
share one), named after the first layer that reads it:

* ``NAME.second_moment`` F32 (in, in): H = XᵀX / n over the n calibration tokens (GPTQ's
  Hessian, up to a factor of 2);
* ``NAME.mean_square`` F32 (in,): each input column's mean square, H's diagonal (what
  llama.cpp's imatrix holds);
* ``NAME.max_abs`` F32 (in,): each input column's largest magnitude (what static
  activation scales, such as compressed-tensors' FP8 preset, are made from);

and the metadata key ``qz.calibration``, a JSON object: ``format_version`` ("1"),
``model`` (the folder's name), ``text_sha256``, ``tokens``, ``sequences``, ``length``,
``qz_version``, and ``layers``, which maps every linear layer (module name) to the input
it reads.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.gptq import GptqPlan, plan_gptq
from ..errors import InputError, located
from ..storage.header import TensorEntry
from ..storage.reader import SafetensorsReader

KEY_CALIBRATION = "qz.calibration"
CALIBRATION_VERSION = "1"
SECOND_MOMENT, MEAN_SQUARE, MAX_ABS = ".second_moment", ".mean_square", ".max_abs"


@dataclass(frozen=True)
class Calibration:
    """What quantizing one weight for its layer's output needs: the second moment of its
    inputs, and GPTQ's plan for it (None: no GPTQ)."""

    second_moment: np.ndarray
    plan: GptqPlan | None


class CalibrationStatistics:
    """A statistics file, read lazily: one input's second moment at a time (kept while
    the layers that share it are quantized).

    Raises:
        InputError: the file is not a statistics file qz wrote, or breaks its format.
    """

    def __init__(self, path: str | Path, *, gptq: bool = True, act_order: bool = False) -> None:
        self.path = Path(path)
        self.gptq, self.act_order = gptq, act_order
        self._reader = SafetensorsReader(self.path)
        metadata = self._reader.header.metadata
        try:
            record = json.loads(metadata[KEY_CALIBRATION])
            layers = record["layers"]
            assert isinstance(layers, dict) and record["format_version"] == CALIBRATION_VERSION
        except (KeyError, ValueError, TypeError, AssertionError):
            self._reader.close()
            raise InputError(located(self.path, None, "is not a calibration statistics file "
                                     "of this qz version"),
                             hint="qz calibrate MODEL --text FILE writes one") from None
        self.record: dict[str, Any] = record
        self.layers: dict[str, str] = {str(key): str(value) for key, value in layers.items()}
        self._cached: tuple[str, Calibration] | None = None

    def sha256(self) -> str:
        digest = hashlib.sha256()
        with open(self.path, "rb") as handle:
            while piece := handle.read(8 * 1024 * 1024):
                digest.update(piece)
        return digest.hexdigest()

    def input_of(self, weight: str) -> str | None:
        """The input the layer of ``weight`` (``MODULE.weight``) reads, if calibrated."""
        return self.layers.get(weight.removesuffix(".weight"))

    def for_weight(self, weight: str, columns: int) -> Calibration | None:
        """The calibration of ``weight`` (a 2-D layer weight of ``columns`` inputs);
        None when its layer was not calibrated.

        Raises:
            InputError: the statistics were measured for inputs of another size.
        """
        name = self.input_of(weight)
        if name is None:
            return None
        if self._cached is not None and self._cached[0] == name:
            return self._cached[1]
        header = self._reader.header
        stored = name + SECOND_MOMENT
        if stored not in header or header[stored].shape != (columns, columns):
            raise InputError(located(self.path, name + SECOND_MOMENT, f"does not hold the "
                                     f"{columns}×{columns} second moment of {weight}'s "
                                     "inputs"),
                             hint="calibrate the model this checkpoint is")
        moment = self._reader.read_tensor(header[stored]).astype(np.float64)
        calibration = Calibration(moment, plan_gptq(moment, self.act_order) if self.gptq
                                  else None)
        self._cached = (name, calibration)
        return calibration

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> CalibrationStatistics:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def calibration_of(statistics: CalibrationStatistics | None,
                   entry: TensorEntry) -> Calibration | None:
    """The calibration of a layer weight (2-D, its last axis the layer's inputs), if the
    statistics hold its layer."""
    if statistics is None or len(entry.shape) != 2:
        return None
    return statistics.for_weight(entry.name, entry.shape[1])
