"""What every codec shares: the error type, the header, and the checks on untrusted input.

A codec turns a host's update delta (trained weights minus the global
weights the host was sent) into wire arrays plus a small JSON header, and
back. Decoding runs on the coordinator with arrays a remote host chose, so
everything a decoder reads is checked first: codec name and parameters,
array count, dtypes, shapes, lengths, indices and finiteness. A bad update
is a CompressionError with one line, never an IndexError from numpy.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from flctl.core.aggregation import all_finite
from flctl.core.compression.feedback import ErrorFeedback
from flctl.errors import FlctlError

HEADER_KEYS = frozenset({"codec", "params"})
# uint32 indices (top-k) and int sizes in headers: arrays past this cannot be addressed.
MAX_ARRAY_SIZE = 2**32 - 1


class CompressionError(FlctlError):
    """Bad compression settings, an update a codec cannot encode, or a malformed update."""


Shape = tuple[int, ...]


class Codec:
    """One compression scheme with its settings; built once per run (see make_codec).

    Subclasses set `name`, `arrays_per_delta` and implement `_encode_array`
    and `_decode_array`; `wire_params()` is what the decoder must know and
    goes into every header, so the coordinator can refuse updates encoded
    with other settings than the run's.
    """

    name: ClassVar[str] = ""
    arrays_per_delta: ClassVar[int] = 1

    @property
    def needs_state(self) -> bool:
        """True if encode() needs a per-host ErrorFeedback (lossy codecs with memory)."""
        return False

    def wire_params(self) -> dict[str, Any]:
        return {}

    def header(self) -> dict[str, Any]:
        return {"codec": self.name, "params": self.wire_params()}

    def new_state(self) -> ErrorFeedback | None:
        """A fresh per-host state for encode(): ErrorFeedback, or None if the codec keeps none."""
        return ErrorFeedback() if self.needs_state else None

    def encode(self, delta: Sequence[np.ndarray], rng: np.random.Generator,
               state: ErrorFeedback | None = None) -> tuple[list[np.ndarray], dict[str, Any]]:
        """(wire arrays, header) for one update delta; updates `state` if the codec keeps one."""
        if self.needs_state and state is None:
            raise ValueError(f"codec {self.name!r} needs an ErrorFeedback state (new_state())")
        arrays = [_checked_delta(i, d) for i, d in enumerate(delta)]
        feedback = state if self.needs_state else None
        if feedback is not None:
            arrays = feedback.add_to(arrays)
        wire: list[np.ndarray] = []
        residual: list[np.ndarray] = []
        for i, array in enumerate(arrays):
            parts, left = self._encode_array(i, array, rng, feedback is not None)
            wire.extend(parts)
            if left is not None:
                residual.append(left)
        if feedback is not None:
            feedback.keep(residual)
        return wire, self.header()

    def decode(self, header: Any, wire: Sequence[Any],
               shapes: Sequence[Shape]) -> list[np.ndarray]:
        """The float32 delta, one array per shape, after checking everything the peer sent."""
        check_header_matches(header, self)
        if len(wire) != self.arrays_per_delta * len(shapes):
            raise CompressionError(
                f"compressed update: codec {self.name!r} expects "
                f"{self.arrays_per_delta * len(shapes)} arrays for {len(shapes)} weight "
                f"arrays, got {len(wire)}")
        out = []
        for i, shape in enumerate(shapes):
            parts = wire[i * self.arrays_per_delta:(i + 1) * self.arrays_per_delta]
            for part in parts:
                if not isinstance(part, np.ndarray):
                    raise CompressionError(f"compressed update: array {i}: expected a numpy "
                                           f"array, got {type(part).__name__}")
            out.append(self._decode_array(i, tuple(shape), list(parts)))
        return out

    def _encode_array(self, index: int, array: np.ndarray, rng: np.random.Generator,
                      want_residual: bool) -> tuple[list[np.ndarray], np.ndarray | None]:
        """(wire parts, residual): the residual is `array` minus what decode will return,
        computed only if `want_residual` (then `array` is the codec's own to overwrite)."""
        raise NotImplementedError

    def _decode_array(self, index: int, shape: Shape, parts: list[np.ndarray]) -> np.ndarray:
        raise NotImplementedError


def wire_bytes(wire: Sequence[np.ndarray]) -> int:
    """Payload bytes of the wire arrays (the frame's body; the JSON header is extra)."""
    return sum(int(np.asarray(a).nbytes) for a in wire)


def check_header_matches(header: Any, codec: Codec) -> None:
    """Refuse a header from another codec or other codec settings than `codec`'s."""
    name = header_codec_name(header)
    if name != codec.name:
        raise CompressionError(f"compressed update: encoded with {name!r}, but this run "
                               f"uses {codec.name!r}")
    if header["params"] != codec.wire_params():
        raise CompressionError(f"compressed update: codec {name!r} params "
                               f"{_short(header['params'])} differ from the expected "
                               f"{codec.wire_params()}")


def header_codec_name(header: Any) -> str:
    """The codec name of a header after checking its shape (a dict with codec and params)."""
    if not isinstance(header, Mapping):
        raise CompressionError("compressed update: header must be an object")
    keys = set(header)
    if keys != HEADER_KEYS:
        raise CompressionError(f"compressed update: header keys must be codec and params, "
                               f"got {_short(sorted(map(str, keys)))}")
    name = header["codec"]
    if not isinstance(name, str):
        raise CompressionError(f"compressed update: codec name must be a string, "
                               f"got {_short(name)}")
    if not isinstance(header["params"], Mapping):
        raise CompressionError("compressed update: header params must be an object")
    return name


def expect_array(index: int, what: str, array: np.ndarray, dtype: np.dtype | type,
                 shape: Shape) -> None:
    """Refuse a wire array whose dtype or shape is not exactly what the decoder reads."""
    want = np.dtype(dtype)
    if array.dtype != want:
        raise CompressionError(f"compressed update: array {index}: {what} must be "
                               f"{want.name}, got {array.dtype.name}")
    if array.shape != shape:
        raise CompressionError(f"compressed update: array {index}: {what} must have shape "
                               f"{shape}, got {array.shape}")


def expect_finite(index: int, what: str, array: np.ndarray) -> None:
    """Refuse NaN and infinity. all_finite sums in the array's own dtype, which for
    float16 would overflow on legitimate values, so float16 is tested entry by entry."""
    finite = bool(np.isfinite(array).all()) if array.dtype == np.float16 else all_finite(array)
    if not finite:
        raise CompressionError(f"compressed update: array {index}: {what} contain NaN or "
                               f"infinity")


def expect_encodable(index: int, sent: np.ndarray, hint: str) -> None:
    """Refuse a delta whose entries overflowed the wire dtype (float16 past 65504)."""
    if not np.isfinite(sent).all():
        raise CompressionError(f"update delta {index} has entries beyond the float16 range; "
                               f"{hint}")


def array_size(shape: Shape) -> int:
    return math.prod(shape)


def _checked_delta(index: int, delta: Any) -> np.ndarray:
    """The delta as float32; weights of any float type are accepted (user tasks)."""
    if not isinstance(delta, np.ndarray) or delta.dtype.kind != "f":
        kind = delta.dtype if isinstance(delta, np.ndarray) else type(delta).__name__
        raise CompressionError(f"update delta {index}: expected a float array, got {kind}")
    if delta.size > MAX_ARRAY_SIZE:
        raise CompressionError(f"update delta {index}: {delta.size} elements exceed the "
                               f"codec limit of {MAX_ARRAY_SIZE}")
    if not all_finite(delta):
        raise CompressionError(f"update delta {index} contains NaN or infinity")
    return np.ascontiguousarray(delta, dtype=np.float32)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_real(name: str, value: Any, low: float, high: float, *, low_open: bool) -> float:
    """A numeric parameter in (low, high] or [low, high]; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {_short(value)}")
    number = float(value)
    below = number <= low if low_open else number < low
    if below or not number <= high:
        left = "(" if low_open else "["
        raise ValueError(f"{name} must be in {left}{low:g}, {high:g}], got {_short(value)}")
    return number


def check_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {_short(value)}")
    return int(value)
