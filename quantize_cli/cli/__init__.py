"""The command line (click) and its rendering (rich): the only layer that prints."""

from __future__ import annotations

import os


def main() -> None:
    """Console-script entry point (``qz``)."""
    # qz runs its own loops on every core. OpenBLAS (and MKL) would start threads of
    # their own inside each np.dot of a large tile and spin against qz's: measured on
    # two cores, `qz diff` of a 1.5 GB checkpoint took 6.0 s of CPU with them and 2.5 s
    # without. This must happen before numpy is first imported; a value the user set
    # is kept.
    for variable in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")
    from .main import main as run

    run()
