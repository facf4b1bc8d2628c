"""The number types a model's arrays may have, in one place.

numpy has no bfloat16; `ml_dtypes` (the ecosystem's standard, used by JAX
and TensorFlow) adds it as a numpy dtype, which flctl imports only when a
bfloat16 array appears (it comes with `pip install flctl[torch]`). numpy
does not count that dtype as floating and does not keep it in .npz files,
so every question "is this a float", "what does this dtype travel as" and
"how is this array cast back" is answered here, and the wire, checkpoints
and strategies ask.

Casting an aggregate back to a model's dtype: floats round to nearest,
integer buffers (BatchNorm's `num_batches_tracked`) are rounded to the
nearest integer (plain truncation would count 10.9 as 10), booleans take
the (weighted) majority, a tie counting as true (mean >= 0.5).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flctl.errors import FlctlError

BFLOAT16 = "bfloat16"


def bfloat16() -> np.dtype:
    """ml_dtypes' bfloat16, imported on first use."""
    try:
        import ml_dtypes
    except ImportError:
        raise FlctlError("a bfloat16 array needs the ml_dtypes package "
                         "(pip install 'flctl[torch]' or pip install ml_dtypes)") from None
    return np.dtype(ml_dtypes.bfloat16)


def is_bfloat16(dtype: Any) -> bool:
    """Without importing ml_dtypes: its dtype is named bfloat16 and is 2 bytes."""
    dtype = np.dtype(dtype)
    return dtype.name == BFLOAT16 and dtype.itemsize == 2


def is_float(dtype: Any) -> bool:
    """A floating type: numpy's, or bfloat16."""
    dtype = np.dtype(dtype)
    return np.issubdtype(dtype, np.floating) or is_bfloat16(dtype)


def is_number(dtype: Any) -> bool:
    """What a model may hold and strategies may average: floats, integers, booleans."""
    dtype = np.dtype(dtype)
    return is_float(dtype) or np.issubdtype(dtype, np.integer) or dtype == np.bool_


def float_max(dtype: Any) -> float:
    """The largest finite value of a floating dtype."""
    dtype = np.dtype(dtype)
    if is_bfloat16(dtype):
        return 3.3895313892515355e38   # (2 - 2**-7) * 2**127
    return float(np.finfo(dtype).max)


def cast_back(values: np.ndarray, dtype: Any) -> np.ndarray:
    """An aggregate (float64, or any float) in a model array's dtype: rounded to
    the nearest integer for integer buffers, the majority for booleans."""
    dtype = np.dtype(dtype)
    if values.dtype == dtype:
        return values
    if dtype == np.bool_:
        return values >= 0.5
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


# ------------------------------------------------------------ storing

def storage_key(name: str, dtype: Any) -> str:
    """The .npz key of an array: bfloat16 arrays are stored as their raw 16-bit
    patterns under a key that says so (npz would keep them as anonymous bytes)."""
    return f"{name}__{BFLOAT16}" if is_bfloat16(dtype) else name


def storage_array(array: np.ndarray) -> np.ndarray:
    return array.view(np.uint16) if is_bfloat16(array.dtype) else array


def from_storage(key: str, array: np.ndarray) -> tuple[str, np.ndarray]:
    """(name, array) back from an .npz key and its stored array."""
    suffix = f"__{BFLOAT16}"
    if key.endswith(suffix) and array.dtype == np.uint16:
        return key[:-len(suffix)], array.view(bfloat16())
    return key, array
