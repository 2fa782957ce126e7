"""Stage 6: one run of zeros at load, so the first real request pays no lazy initialisation."""

from __future__ import annotations

import numpy as np

from gateway.errors import ModelLoadError
from gateway.types import NUMPY_DTYPES, ModelRuntime

__all__ = ["warm_up"]


def warm_up(runtime: ModelRuntime) -> None:
    feeds = {}
    for spec in runtime.inputs:
        shape = tuple(1 if d < 0 else d for d in spec.shape)
        if spec.datatype == "BYTES":
            feeds[spec.name] = np.full(shape, "", dtype=object)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=NUMPY_DTYPES[spec.datatype])
    try:
        runtime.run(feeds, [spec.name for spec in runtime.outputs])
    except Exception as err:
        raise ModelLoadError(f"warm-up run failed: {err}") from err
