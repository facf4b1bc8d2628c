"""What hosts send: plain weights by default, an encoded (and maybe noised) delta otherwise."""

from __future__ import annotations

import numpy as np
import pytest

from flctl.core.compression import CompressionError
from flctl.core.settings import TrainingSettings
from flctl.core.uplink import UplinkSpec, host_rng, pack_update, unpack_update
from flctl.errors import FlctlError


def model(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(64, 10)).astype(np.float32), rng.normal(size=10).astype(np.float32)]


def test_default_sends_the_trained_weights_untouched() -> None:
    spec = UplinkSpec.for_training(TrainingSettings())
    trained = model(1)
    arrays, header = pack_update(spec, model(0), trained, host_rng(0, 1, "a"), None)
    assert header is None and not spec.sends_delta
    assert all(a is t or np.shares_memory(a, t) for a, t in zip(arrays, trained))


@pytest.mark.parametrize("name,params,tolerance", [
    ("float16", {}, 2e-3), ("int8", {}, 0.05), ("topk", {"fraction": 1.0}, 1e-6)])
def test_an_encoded_delta_rebuilds_the_trained_weights(name, params, tolerance) -> None:
    spec = UplinkSpec.for_training(TrainingSettings(compression=name, compression_params=params))
    codec = spec.codec()
    base, trained = model(0), model(1)
    arrays, header = pack_update(spec, base, trained, host_rng(0, 1, "a"), codec.new_state())
    rebuilt = unpack_update(codec, header, arrays, base)
    for r, t in zip(rebuilt, trained):
        assert r.dtype == np.float32 and r.shape == t.shape
        assert np.abs(r - t).max() <= tolerance


def test_topk_sends_a_fraction_and_keeps_the_rest_for_later() -> None:
    spec = UplinkSpec("topk", {"fraction": 0.1})
    codec = spec.codec()
    state = codec.new_state()
    base, trained = model(0), model(1)
    arrays, header = pack_update(spec, base, trained, host_rng(0, 1, "a"), state)
    sent = sum(a.nbytes for a in arrays)
    assert sent < 0.25 * sum(t.nbytes for t in trained)
    rebuilt = unpack_update(codec, header, arrays, base)
    # what was sent + what is kept = the whole change
    for r, b, t, left in zip(rebuilt, base, trained, state.residual):
        np.testing.assert_allclose((r - b) + left, t - b, atol=1e-5)


def test_the_coordinator_refuses_an_update_made_with_other_settings() -> None:
    base, trained = model(0), model(1)
    sent = UplinkSpec("topk", {"fraction": 0.5})
    arrays, header = pack_update(sent, base, trained, host_rng(0, 1, "a"),
                                 sent.codec().new_state())
    with pytest.raises(CompressionError):
        unpack_update(UplinkSpec("topk", {"fraction": 0.1}).codec(), header, arrays, base)
    with pytest.raises(CompressionError):
        unpack_update(UplinkSpec("int8").codec(), header, arrays, base)


def test_the_spec_survives_the_fit_config_and_rejects_junk() -> None:
    spec = UplinkSpec.for_training(TrainingSettings(compression="int8", privacy="local",
                                                    clip_norm=2.0, noise_multiplier=0.5))
    assert UplinkSpec.from_config(spec.as_config()) == spec
    assert spec.local_clip_norm == 2.0 and spec.local_noise_multiplier == 0.5
    with pytest.raises(FlctlError, match="uplink"):
        UplinkSpec.from_config([1, 2])
    with pytest.raises(FlctlError, match="uplink"):
        UplinkSpec.from_config({"local_clip_norm": "lots"})


def test_host_randomness_is_reproducible_and_per_host() -> None:
    assert host_rng(3, 7, "a").random() == host_rng(3, 7, "a").random()
    assert host_rng(3, 7, "a").random() != host_rng(3, 7, "b").random()
    assert host_rng(3, 7, "a").random() != host_rng(3, 8, "a").random()
