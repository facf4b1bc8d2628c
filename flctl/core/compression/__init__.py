"""Compressed model updates: codecs by name (one codec per module).

A host sends DELTA = trained weights - the global weights it was sent,
encoded by the run's codec (training.compression, training.compression_params):

    float32  identity, the reference                      1    x float32 bytes
    float16  cast                                          1/2
    int8     per-chunk scale, stochastic rounding          ~1/4 (+4 bytes per chunk)
    topk     k largest per array + error feedback          2 x fraction (float32 values)

Use:
    codec = make_codec(name, params)           # once per run; CompressionError if bad
    state = codec.new_state()                  # host: once per task; None if not needed
    wire, header = codec.encode(delta, rng, state)   # host; header is small and JSON-able
    delta = codec.decode(header, wire, shapes)       # coordinator; checks everything

`encode`/`decode` below are the same as functions of the codec name. The
coordinator should decode with the run's own codec (Codec.decode), which
also refuses an update encoded with another codec or other settings.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flctl.core.compression.base import (
    Codec,
    CompressionError,
    Shape,
    header_codec_name,
    wire_bytes,
)
from flctl.core.compression.cast import Float16Codec, Float32Codec
from flctl.core.compression.feedback import ErrorFeedback
from flctl.core.compression.int8 import Int8Codec
from flctl.core.compression.topk import TopKCodec, top_k_count

CODECS: dict[str, type[Codec]] = {
    cls.name: cls for cls in (Float32Codec, Float16Codec, Int8Codec, TopKCodec)
}

__all__ = ["CODECS", "Codec", "CompressionError", "ErrorFeedback", "Float16Codec",
           "Float32Codec", "Int8Codec", "TopKCodec", "check_compression_params", "decode",
           "encode", "make_codec", "top_k_count", "wire_bytes"]


def make_codec(name: str, params: Mapping[str, Any] | None = None) -> Codec:
    """The codec `name` with `params` (training.compression_params), checked."""
    cls = CODECS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise CompressionError(f"unknown compression {str(name)[:40]!r}; valid: "
                               f"{', '.join(CODECS)}")
    if params is not None and not isinstance(params, Mapping):
        raise CompressionError(f"compression_params must be a mapping, got "
                               f"{type(params).__name__}")
    given = {str(key): value for key, value in (params or {}).items()}
    accepted = _accepted_params(cls)
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise CompressionError(f"compression {name!r} takes no parameter "
                               f"{', '.join(repr(k[:40]) for k in unknown)} "
                               f"(accepts: {', '.join(accepted) or 'none'})")
    try:
        return cls(**given)
    except ValueError as exc:
        raise CompressionError(f"compression {name!r}: {exc}") from None


def check_compression_params(name: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate training.compression and compression_params; return the params in full.

    Keys the codec does not take are refused (a fraction under int8 is a
    typo or a forgotten switch, not something to ignore). The result has
    every parameter of the codec, defaults filled in.
    """
    codec = make_codec(name, params)
    return {key: getattr(codec, key) for key in _accepted_params(type(codec))}


def encode(codec_name: str, params: Mapping[str, Any] | None, delta: Sequence[np.ndarray],
           rng: np.random.Generator, state: ErrorFeedback | None,
           ) -> tuple[list[np.ndarray], dict[str, Any]]:
    """(wire arrays, header) of one update delta; see Codec.encode."""
    return make_codec(codec_name, params).encode(delta, rng, state)


def decode(header: Any, wire: Sequence[Any], shapes: Sequence[Shape]) -> list[np.ndarray]:
    """The float32 delta described by a peer's header (codec and its wire params), checked."""
    name = header_codec_name(header)
    if name not in CODECS:
        raise CompressionError(f"compressed update: unknown codec {name[:40]!r}")
    try:
        codec = make_codec(name, header["params"])
    except CompressionError as exc:
        raise CompressionError(f"compressed update: bad header: {exc}") from None
    return codec.decode(header, wire, shapes)


def _accepted_params(cls: type[Codec]) -> list[str]:
    """The codec's keyword parameters, in constructor order (its settings keys)."""
    return [p.name for p in inspect.signature(cls).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
