"""The whole-checkpoint jobs under their qz 1.0 import path; they live in
:mod:`quantize_cli.jobs`."""

from .jobs import dequantize_checkpoint, diff_checkpoints, inspect_checkpoint, quantize_checkpoint

__all__ = ["dequantize_checkpoint", "diff_checkpoints", "inspect_checkpoint",
           "quantize_checkpoint"]
