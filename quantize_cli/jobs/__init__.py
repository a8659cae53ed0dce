"""The jobs: whole-checkpoint quantize, dequantize, inspect and diff, and calibrate (the
one that runs a model, with torch). Each is a thin orchestration over the storage layer,
the planner and the formats' codecs; none branches on a format."""

from .calibrate import calibrate_model
from .dequantize import dequantize_checkpoint
from .diff import diff_checkpoints
from .inspect import inspect_checkpoint
from .quantize import check_options, quantize_checkpoint

__all__ = ["calibrate_model", "check_options", "dequantize_checkpoint", "diff_checkpoints",
           "inspect_checkpoint", "quantize_checkpoint"]
