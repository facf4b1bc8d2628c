"""Update codecs: error bounds, unbiasedness, top-k selection, error feedback, refusals, bytes.

The int8 unbiasedness check is run against two biased roundings as well
(round-to-nearest and truncation), which it must reject: that is what shows
the tolerance is tight enough to mean something.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from flctl.core.compression import (
    CODECS,
    CompressionError,
    ErrorFeedback,
    check_compression_params,
    decode,
    encode,
    int8,
    make_codec,
    top_k_count,
    wire_bytes,
)
from flctl.errors import FlctlError

SHAPES = [(50, 20), (7,), (3, 4, 5)]


def random_delta(rng: np.random.Generator, shapes: list[tuple[int, ...]] = SHAPES,
                 scale: float = 0.01) -> list[np.ndarray]:
    return [(rng.standard_normal(s) * scale).astype(np.float32) for s in shapes]


def round_trip(name: str, params: dict, delta: list[np.ndarray],
               seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    codec = make_codec(name, params)
    wire, header = codec.encode(delta, np.random.default_rng(seed), codec.new_state())
    return codec.decode(header, wire, [d.shape for d in delta]), wire, header


# --- dense codecs -------------------------------------------------------------------------

def test_float32_is_exact_and_float16_within_half_precision() -> None:
    rng = np.random.default_rng(1)
    delta = random_delta(rng)
    delta[0][0, :5] = [1e-7, -3e-6, 2.5, -700.0, 0.0]  # subnormal in float16, large, zero
    exact, _, _ = round_trip("float32", {}, delta)
    assert all(np.array_equal(a, b) for a, b in zip(exact, delta))
    half, wire, _ = round_trip("float16", {}, delta)
    assert all(w.dtype == np.float16 for w in wire)
    for got, want in zip(half, delta):
        assert got.dtype == np.float32 and got.shape == want.shape
        bound = np.maximum(np.abs(want) * 2.0**-11, 2.0**-25)
        assert np.all(np.abs(got - want) <= bound)
    # The bound is not vacuous: float16 does lose precision here.
    assert max(float(np.abs(g - w).max()) for g, w in zip(half, delta)) > 0


def test_float16_carries_large_entries_near_its_limit() -> None:
    # 70,000 entries of 60,000 sum far past float16's range: the finiteness checks
    # must look at entries, not at a float16 sum.
    delta = [np.full(70_000, 60_000.0, dtype=np.float32)]
    for name, params in [("float16", {}), ("topk", {"fraction": 1.0, "values": "float16"})]:
        decoded, _, _ = round_trip(name, params, delta)
        assert np.all(np.abs(decoded[0] - 60_000.0) <= 60_000.0 * 2.0**-11)


def test_float16_refuses_entries_past_its_range() -> None:
    delta = [np.array([1.0, 7e4], dtype=np.float32)]
    with pytest.raises(CompressionError, match="beyond the float16 range"):
        encode("float16", {}, delta, np.random.default_rng(0), None)


def test_encode_refuses_non_finite_or_non_float_deltas() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(CompressionError, match="NaN or infinity"):
        encode("int8", {}, [np.array([1.0, np.nan], dtype=np.float32)], rng, None)
    with pytest.raises(CompressionError, match="expected a float array"):
        encode("float32", {}, [np.array([1, 2])], rng, None)


# --- int8 ---------------------------------------------------------------------------------

def int8_bias(rng_seed: int = 0, draws: int = 4000) -> tuple[float, float]:
    """(largest |mean error| in standard errors, mean |mean error| in scale steps).

    512 entries share one scale (max 1.0, so one step is 1/127) and sit at
    fractional positions spread over (0, 1) of a step. Each row of the
    (draws, 512) input is one independent encoding of the same vector.
    """
    frac = (np.arange(511) + 0.5) / 511
    levels = np.arange(511) % 120 - 60
    x = np.append((levels + frac) / 127, 1.0).astype(np.float32)
    batch = np.tile(x, (draws, 1))
    decoded, wire, _ = round_trip("int8", {"chunk": x.size}, [batch], rng_seed)
    step = float(wire[1][0])
    assert np.all(wire[1] == np.float32(1.0) / np.float32(127))
    bias = decoded[0].astype(np.float64).mean(axis=0) - x
    std_error = step * 0.5 / math.sqrt(draws)  # sd of one draw is <= step / 2
    return float(np.abs(bias).max() / std_error), float(np.abs(bias).mean() / step)


def test_int8_stochastic_rounding_is_unbiased() -> None:
    sigmas, mean_steps = int8_bias()
    assert sigmas < 5.0
    assert mean_steps < 0.02


@pytest.mark.parametrize("biased", [np.round, np.floor], ids=["round-to-nearest", "truncate"])
def test_the_unbiasedness_check_fails_a_biased_rounding(monkeypatch: pytest.MonkeyPatch,
                                                        biased) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(int8, "stochastic_round", lambda y, rng: biased(y))
    sigmas, mean_steps = int8_bias()
    assert sigmas > 5.0
    assert mean_steps > 0.2


def test_int8_error_is_below_one_scale_step_per_chunk() -> None:
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(1037) * np.repeat([1e-4, 1.0, 30.0], [400, 400, 237])).astype(
        np.float32)
    x[100:200] = 0.0  # an all-zero chunk
    chunk = 100
    decoded, wire, header = round_trip("int8", {"chunk": chunk}, [x.reshape(61, 17)])
    codes, scales = wire
    assert codes.dtype == np.int8 and codes.shape == (61, 17)
    assert header == {"codec": "int8", "params": {"chunk": chunk}}
    assert scales.dtype == np.float32 and scales.shape == (11,)  # ceil(1037 / 100)
    peaks = np.array([np.abs(x[i:i + chunk]).max() for i in range(0, x.size, chunk)])
    np.testing.assert_allclose(scales, peaks / 127, rtol=1e-6)
    assert np.all(np.abs(codes) <= 127)
    error = np.abs(decoded[0].reshape(-1) - x)
    per_entry_scale = np.repeat(scales, chunk)[:x.size]
    assert np.all(error <= per_entry_scale * (1 + 1e-5))
    assert np.all(decoded[0].reshape(-1)[100:200] == 0)
    # Per-chunk scales matter: the small entries keep their precision.
    assert float(error[:100].max()) < 1e-5


# --- top-k and error feedback ---------------------------------------------------------------

@pytest.mark.parametrize("fraction,size,k", [(0.05, 1000, 50), (0.07, 100, 7), (0.01, 10, 1),
                                             (0.1, 7, 1), (0.5, 7, 4), (1.0, 7, 7),
                                             (0.3, 0, 0)])
def test_top_k_count(fraction: float, size: int, k: int) -> None:
    assert top_k_count(fraction, size) == k


@pytest.mark.parametrize("values", ["float32", "float16"])
def test_topk_sends_exactly_the_k_largest(values: str) -> None:
    rng = np.random.default_rng(3)
    delta = random_delta(rng)
    before = [d.copy() for d in delta]
    decoded, wire, header = round_trip("topk", {"fraction": 0.1, "values": values}, delta)
    assert header == {"codec": "topk", "params": {"fraction": 0.1, "values": values}}
    assert all(np.array_equal(a, b) for a, b in zip(delta, before))  # input untouched
    for i, (got, want) in enumerate(zip(decoded, delta)):
        indices, sent = wire[2 * i], wire[2 * i + 1]
        k = math.ceil(0.1 * want.size)
        assert indices.dtype == np.uint32 and sent.dtype == np.dtype(values)
        assert indices.shape == sent.shape == (k,)
        assert np.all(np.diff(indices.astype(np.int64)) > 0)
        flat_got, flat_want = got.reshape(-1), want.reshape(-1)
        assert np.count_nonzero(flat_got) == k
        np.testing.assert_array_equal(flat_got[indices], flat_want[indices].astype(values))
        unsent = np.delete(np.abs(flat_want), indices)
        if unsent.size:
            assert np.abs(flat_want[indices]).min() >= unsent.max()


@pytest.mark.parametrize("values", ["float32", "float16"])
def test_error_feedback_conserves_the_sum_of_deltas(values: str) -> None:
    rng = np.random.default_rng(4)
    codec = make_codec("topk", {"fraction": 0.1, "values": values})
    state = codec.new_state()
    assert isinstance(state, ErrorFeedback)
    shapes = [s for s in SHAPES]
    total_delta = [np.zeros(s) for s in shapes]
    total_sent = [np.zeros(s) for s in shapes]
    for _ in range(12):
        delta = random_delta(rng, shapes, scale=1.0)
        wire, header = codec.encode(delta, rng, state)
        sent = codec.decode(header, wire, shapes)
        for acc, d in zip(total_delta, delta):
            acc += d
        for acc, s in zip(total_sent, sent):
            acc += s
    assert state.residual is not None
    for want, got, left in zip(total_delta, total_sent, state.residual):
        np.testing.assert_allclose(got + left, want, atol=1e-5)
        assert np.abs(left).max() > 0.1  # a real residual, not an empty one


def test_error_feedback_delivers_what_plain_topk_never_sends() -> None:
    # Five large coordinates fill k = 5 every round; coordinate 50 gets 0.1 per round.
    delta = np.zeros(100, dtype=np.float32)
    delta[:5] = 1.0
    delta[50] = 0.1
    rounds = 20

    def sent_on_50(error_feedback: bool) -> float:
        codec = make_codec("topk", {"fraction": 0.05, "error_feedback": error_feedback})
        state = codec.new_state()
        total = 0.0
        for r in range(rounds):
            wire, header = codec.encode([delta], np.random.default_rng(r), state)
            total += float(codec.decode(header, wire, [(100,)])[0][50])
        return total

    assert sent_on_50(False) == 0.0
    # With memory the coordinate's 0.1 per round gets through (all but the last residual).
    assert sent_on_50(True) == pytest.approx(0.1 * rounds, abs=1.01)
    assert make_codec("topk", {"error_feedback": False}).new_state() is None


def test_error_feedback_drops_a_residual_of_another_model() -> None:
    state = ErrorFeedback()
    codec = make_codec("topk", {"fraction": 0.5})
    codec.encode([np.ones(4, dtype=np.float32)], np.random.default_rng(0), state)
    assert state.residual is not None and state.residual[0].shape == (4,)
    corrected = state.add_to([np.ones(3, dtype=np.float32)])
    assert state.residual is None
    np.testing.assert_array_equal(corrected[0], np.ones(3))


def test_a_failed_encode_keeps_the_previous_residual() -> None:
    codec = make_codec("topk", {"fraction": 0.5, "values": "float16"})
    state = codec.new_state()
    codec.encode([np.arange(4, dtype=np.float32)], np.random.default_rng(0), state)
    kept = [r.copy() for r in state.residual]
    with pytest.raises(CompressionError):
        codec.encode([np.array([1e5, 0, 0, 0], dtype=np.float32)], np.random.default_rng(0),
                     state)
    np.testing.assert_array_equal(state.residual[0], kept[0])


def test_topk_with_error_feedback_needs_a_state() -> None:
    with pytest.raises(ValueError, match="ErrorFeedback"):
        encode("topk", {}, [np.ones(3, dtype=np.float32)], np.random.default_rng(0), None)


# --- decode refuses malformed updates -----------------------------------------------------

def valid(name: str, params: dict | None = None) -> tuple[dict, list[np.ndarray]]:
    delta = [np.linspace(-1, 1, 40, dtype=np.float32).reshape(4, 10),
             np.array([0.5, -0.25, 0.125], dtype=np.float32)]
    codec = make_codec(name, params)
    wire, header = codec.encode(delta, np.random.default_rng(0), codec.new_state())
    return header, wire


DECODE_SHAPES = [(4, 10), (3,)]


def _replace(wire: list[np.ndarray], i: int, array: object) -> list:
    out = list(wire)
    out[i] = array
    return out


def _cases() -> list[tuple[str, dict, list, str]]:
    cases = []
    h, w = valid("float32")
    cases += [
        ("header not a dict", ["float32"], w, "header must be an object"),
        ("header missing params", {"codec": "float32"}, w, "header keys"),
        ("header extra key", {**h, "x": 1}, w, "header keys"),
        ("unknown codec", {"codec": "gzip", "params": {}}, w, "unknown codec 'gzip'"),
        ("codec not a string", {"codec": 3, "params": {}}, w, "codec name must be a string"),
        ("params not a dict", {"codec": "float32", "params": []}, w, "params must be an object"),
        ("unknown param", {"codec": "float32", "params": {"x": 1}}, w, "bad header"),
        ("too few arrays", h, w[:1], "expects 2 arrays"),
        ("not an array", h, _replace(w, 0, [1.0] * 40), "expected a numpy array"),
        ("float32 wrong dtype", h, _replace(w, 0, w[0].astype(np.float64)), "must be float32"),
        ("float32 wrong shape", h, _replace(w, 0, w[0].reshape(10, 4)), "must have shape"),
        ("float32 NaN", h, _replace(w, 1, np.array([0, np.nan, 0], np.float32)), "NaN"),
    ]
    h, w = valid("float16")
    cases += [("float16 inf", h, _replace(w, 1, np.array([0, np.inf, 0], np.float16)), "NaN")]
    h, w = valid("int8", {"chunk": 16})
    scales = w[1]
    cases += [
        ("int8 NaN scale", h, _replace(w, 1, np.full_like(scales, np.nan)), "NaN or infinity"),
        ("int8 inf scale", h, _replace(w, 1, np.full_like(scales, np.inf)), "NaN or infinity"),
        ("int8 negative scale", h, _replace(w, 1, -scales), "scales must be in"),
        ("int8 huge scale", h, _replace(w, 1, np.full_like(scales, 1e38)), "scales must be in"),
        ("int8 scales length", h, _replace(w, 1, scales[:-1]), "scales must have shape (3,)"),
        ("int8 codes dtype", h, _replace(w, 0, w[0].astype(np.uint8)), "must be int8"),
        ("int8 codes shape", h, _replace(w, 0, w[0].reshape(-1)), "must have shape (4, 10)"),
        ("int8 bad chunk", {"codec": "int8", "params": {"chunk": 0}}, w, "bad header"),
    ]
    h, w = valid("topk", {"fraction": 0.25})  # k = 10 of 40, 1 of 3
    idx, vals = w[0], w[1]
    dup = idx.copy()
    dup[3] = dup[2]
    unsorted = idx[::-1].copy()
    out_of_range = idx.copy()
    out_of_range[-1] = 40
    cases += [
        ("topk index out of range", h, _replace(w, 0, out_of_range), "index 40 out of range"),
        ("topk index far out of range", h,
         _replace(w, 2, np.array([2**32 - 1], np.uint32)), "out of range for 3"),
        ("topk duplicate index", h, _replace(w, 0, dup), f"duplicate index {dup[2]}"),
        ("topk unsorted", h, _replace(w, 0, unsorted), "not in increasing order"),
        ("topk length mismatch", h, _replace(w, 1, vals[:-1]), "equal length"),
        ("topk too many entries", h, _replace(_replace(w, 0, np.arange(11, dtype=np.uint32)),
                                              1, np.ones(11, np.float32)), "expected 10"),
        ("topk 2-D indices", h, _replace(w, 0, idx.reshape(2, 5)), "1-D"),
        ("topk index dtype", h, _replace(w, 0, idx.astype(np.int64)), "must be uint32"),
        ("topk values dtype", h, _replace(w, 1, vals.astype(np.float16)), "must be float32"),
        ("topk NaN value", h, _replace(w, 1, np.full_like(vals, np.nan)), "NaN"),
        ("topk fraction 0", {"codec": "topk", "params": {"fraction": 0}}, w, "bad header"),
        ("topk fraction string", {"codec": "topk", "params": {"fraction": "1"}}, w,
         "bad header"),
    ]
    return cases


CASES = _cases()


@pytest.mark.parametrize("header,wire,message", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_decode_refuses(header: dict, wire: list, message: str) -> None:
    with pytest.raises(CompressionError) as info:
        decode(header, wire, DECODE_SHAPES)
    assert isinstance(info.value, FlctlError)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_the_valid_updates_behind_the_refusal_cases_decode() -> None:
    for name, params in [("float32", None), ("float16", None), ("int8", {"chunk": 16}),
                         ("topk", {"fraction": 0.25})]:
        header, wire = valid(name, params)
        assert [a.shape for a in decode(header, wire, DECODE_SHAPES)] == DECODE_SHAPES


def test_the_run_codec_refuses_other_codecs_and_settings() -> None:
    header, wire = valid("topk", {"fraction": 0.25})
    with pytest.raises(CompressionError, match="encoded with 'topk', but this run uses 'int8'"):
        make_codec("int8").decode(header, wire, DECODE_SHAPES)
    with pytest.raises(CompressionError, match="differ from the expected"):
        make_codec("topk", {"fraction": 0.05}).decode(header, wire, DECODE_SHAPES)
    # error_feedback is the host's business: the coordinator's codec decodes either way.
    decoded = make_codec("topk", {"fraction": 0.25, "error_feedback": False}).decode(
        header, wire, DECODE_SHAPES)
    assert np.count_nonzero(decoded[0]) == 10


def test_random_garbage_only_ever_raises_compression_errors() -> None:
    rng = np.random.default_rng(5)
    dtypes = [np.int8, np.uint8, np.int64, np.uint32, np.float16, np.float32, np.float64, bool]
    headers = [valid(n, p)[0] for n, p in [("float32", None), ("float16", None),
                                          ("int8", {"chunk": 16}), ("topk", {"fraction": 0.25})]]
    refused = 0
    for trial in range(400):
        header = headers[trial % len(headers)]
        wire = []
        for _ in range(rng.integers(0, 5)):
            shape = tuple(int(n) for n in rng.integers(0, 12, size=rng.integers(0, 3)))
            dtype = dtypes[rng.integers(len(dtypes))]
            wire.append((rng.standard_normal(shape) * 50).astype(dtype))
        try:
            decode(header, wire, DECODE_SHAPES)
        except CompressionError:
            refused += 1
    assert refused == 400


def test_headers_survive_json() -> None:
    header, wire = valid("topk", {"fraction": 0.25, "values": "float16"})
    again = json.loads(json.dumps(header))
    assert again == header
    assert decode(again, wire, DECODE_SHAPES)[1].shape == (3,)


# --- settings -----------------------------------------------------------------------------

def test_check_compression_params_fills_defaults() -> None:
    assert check_compression_params("float32", None) == {}
    assert check_compression_params("int8", {}) == {"chunk": 1024}
    assert check_compression_params("topk", {"fraction": 0.1}) == {
        "fraction": 0.1, "values": "float32", "error_feedback": True}


@pytest.mark.parametrize("name,params,message", [
    ("gzip", {}, "unknown compression 'gzip'; valid: float32, float16, int8, topk"),
    ("int8", {"fraction": 0.05}, "compression 'int8' takes no parameter 'fraction' "
                                 "(accepts: chunk)"),
    ("float16", {"chunk": 8}, "accepts: none"),
    ("topk", {"fraction": 0}, "fraction must be in (0, 1]"),
    ("topk", {"fraction": 1.5}, "fraction must be in (0, 1]"),
    ("topk", {"fraction": float("nan")}, "fraction must be in (0, 1]"),
    ("topk", {"fraction": True}, "fraction must be a number"),
    ("topk", {"values": "int8"}, "values must be one of float32, float16"),
    ("topk", {"error_feedback": "yes"}, "error_feedback must be true or false"),
    ("int8", {"chunk": 0}, "chunk must be an integer"),
    ("int8", {"chunk": 2.0}, "chunk must be an integer"),
    ("int8", [("chunk", 8)], "compression_params must be a mapping"),
])
def test_check_compression_params_refuses(name: str, params: object, message: str) -> None:
    with pytest.raises(CompressionError) as info:
        check_compression_params(name, params)  # type: ignore[arg-type]
    assert message in str(info.value)


# --- bytes --------------------------------------------------------------------------------

def test_payload_bytes_for_a_million_parameters() -> None:
    rng = np.random.default_rng(6)
    shapes = [(999, 1000), (1000,)]  # 1,000,000 parameters
    delta = random_delta(rng, shapes)
    reference = wire_bytes(encode("float32", {}, delta, rng, None)[0])
    assert reference == 4_000_000

    def ratio(name: str, params: dict) -> float:
        codec = make_codec(name, params)
        return wire_bytes(codec.encode(delta, rng, codec.new_state())[0]) / reference

    assert ratio("float16", {}) == 0.5
    # int8: 1 byte per entry + one float32 scale per 1024 (976 + 1 chunks).
    assert ratio("int8", {}) == (1_000_000 + 4 * 977) / 4_000_000
    assert 0.25 < ratio("int8", {}) < 0.252
    # topk 0.05: 50,000 entries of uint32 index + float32 value.
    assert ratio("topk", {"fraction": 0.05}) == pytest.approx(0.1, abs=1e-6)
    assert ratio("topk", {"fraction": 0.05, "values": "float16"}) == pytest.approx(0.075)


def test_every_codec_is_covered() -> None:
    assert set(CODECS) == {"float32", "float16", "int8", "topk"}
