"""What a host sends back after a fit, and how the coordinator reads it.

By default a host returns its trained weights as they are (the fastest path,
and bit for bit what the task produced). When the run compresses updates
or asks hosts to add their own privacy noise, the host instead sends the
change it made, DELTA = trained - global: noised (local DP) and then
encoded by the run's codec. The reply's "encoding" header says which; the
coordinator decodes with the run's own codec, so an update made with other
settings is refused, and rebuilds global + delta.

The spec travels in the fit config ("uplink"), so changing compression or
privacy never needs a redeploy.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from flctl.core.compression import Codec, ErrorFeedback, make_codec
from flctl.core.dtypes import cast_back
from flctl.core.privacy import privatize_locally
from flctl.core.settings import TrainingSettings
from flctl.errors import FlctlError


@dataclass(frozen=True)
class UplinkSpec:
    """How hosts send their updates this run (from training settings, via the fit config)."""

    compression: str = "float32"
    compression_params: Mapping[str, Any] | None = None
    local_clip_norm: float = 0.0  # > 0: the host clips and noises its own delta
    local_noise_multiplier: float = 0.0

    @property
    def sends_delta(self) -> bool:
        return self.compression != "float32" or self.local_clip_norm > 0

    def as_config(self) -> dict[str, Any]:
        return {"compression": self.compression,
                "compression_params": dict(self.compression_params or {}),
                "local_clip_norm": self.local_clip_norm,
                "local_noise_multiplier": self.local_noise_multiplier}

    @classmethod
    def from_config(cls, config: Any) -> UplinkSpec:
        if not isinstance(config, Mapping):
            raise FlctlError("fit config: 'uplink' must be a mapping")
        try:
            return cls(str(config.get("compression", "float32")),
                       dict(config.get("compression_params") or {}),
                       float(config.get("local_clip_norm", 0.0)),
                       float(config.get("local_noise_multiplier", 0.0)))
        except (TypeError, ValueError) as exc:
            raise FlctlError(f"fit config: bad 'uplink': {exc}") from None

    @classmethod
    def for_training(cls, training: TrainingSettings) -> UplinkSpec:
        local = training.privacy == "local"
        return cls(training.compression, dict(training.compression_params),
                   training.clip_norm if local else 0.0,
                   training.noise_multiplier if local else 0.0)

    def codec(self) -> Codec:
        return make_codec(self.compression, self.compression_params)


def host_rng(seed: int, round_number: int, host: str) -> np.random.Generator:
    """Randomness for one host's stochastic rounding: reproducible on resume,
    different for every host. (Privacy noise never comes from here: a seed the
    coordinator knows would let it subtract the noise.)"""
    return np.random.default_rng([seed, round_number, zlib.crc32(host.encode())])


def pack_update(spec: UplinkSpec, global_weights: Sequence[np.ndarray],
                trained: Sequence[np.ndarray], rng: np.random.Generator,
                feedback: ErrorFeedback | None,
                noise_rng: np.random.Generator | None = None,
                ) -> tuple[list[np.ndarray], dict[str, Any] | None]:
    """(arrays to send, encoding header or None for plain weights).

    `rng` drives the codec (stochastic rounding) and may be reproducible;
    `noise_rng` draws local privacy noise and must come from the host's own
    entropy, or whoever knows the seed could subtract the noise.
    """
    if not spec.sends_delta:
        return [np.asarray(w) for w in trained], None
    return spec.codec().encode(local_delta(spec, global_weights, trained, noise_rng), rng,
                               feedback)


def local_delta(spec: UplinkSpec, global_weights: Sequence[np.ndarray],
                trained: Sequence[np.ndarray],
                noise_rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """trained - global in float32, clipped and noised first under local DP."""
    if spec.local_clip_norm > 0:
        trained = privatize_locally(global_weights, trained, spec.local_clip_norm,
                                    spec.local_noise_multiplier,
                                    noise_rng or np.random.default_rng())
    return [np.asarray(t, np.float32) - np.asarray(g, np.float32)
            for g, t in zip(global_weights, trained)]


def unpack_update(codec: Codec, header: Any, arrays: Sequence[np.ndarray],
                  global_weights: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The host's new weights, from an encoded delta (checked by the codec)."""
    delta = codec.decode(header, arrays, [g.shape for g in global_weights])
    return [cast_back(g + d, g.dtype) for g, d in zip(global_weights, delta)]
