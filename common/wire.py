"""The CNN's weights as they travel between the server and the sites (``cnn.transfer``): in
half precision when the protocol asks, which halves the bytes of a round. Numpy only, so the
apps convert without importing torch.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from common.glm import ModelError


def to_wire(arrays: Mapping[str, np.ndarray], transfer: str) -> dict[str, np.ndarray]:
    """The weights as they travel (``cnn.transfer``): with ``"float16"`` every float array in
    half precision (integer buffers, BatchNorm's counters, unchanged); a value beyond float16's
    range is a :class:`~common.glm.ModelError` naming the weight (it would arrive infinite)."""
    if transfer == "float32":
        return dict(arrays)
    out = {}
    for name, array in arrays.items():
        array = np.asarray(array)
        if array.dtype.kind == "f":
            biggest = float(np.max(np.abs(array))) if array.size else 0.0
            if biggest > float(np.finfo(np.float16).max):
                raise ModelError(f"weight '{name}' holds {biggest:.3g}, beyond float16's range: "
                                 f"this model cannot travel with cnn.transfer = float16")
            array = array.astype(np.float16)
        out[name] = array
    return out


def from_wire(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Weights that travelled in half precision back to float32 (the rest unchanged)."""
    return {name: np.asarray(a, dtype=np.float32) if np.asarray(a).dtype == np.float16
            else np.asarray(a) for name, a in arrays.items()}


def wire_nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """The weights' bytes as they travel (every array's own dtype), before encoding overhead."""
    return sum(int(np.asarray(a).nbytes) for a in arrays.values())
