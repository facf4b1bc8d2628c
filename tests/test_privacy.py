"""DP-FedAvg and its Rényi-DP accountant (flctl.core.privacy).

Reference values, all published with the libraries' own tests or tutorials:

* TensorFlow Privacy, tensorflow_privacy/privacy/analysis/rdp_accountant_test.py:
  compute_rdp(q=0.1, noise_multiplier=2, steps=10, orders=5) = 0.07737 (places=5);
  compute_rdp(1, 10, 1, 20) = 0.1; compute_rdp(0, 10, 1, 20) = 0;
  compute_rdp(0.01, 2.5, 50, [1.5, 2.5, 5, 50, 100, inf])
      = [0.00065, 0.001085, 0.00218075, 0.023846, 167.416307, inf] (delta=1e-5).
* Google dp_accounting (the successor), rdp/rdp_privacy_accountant_test.py: the same
  sequence as [6.70579741e-04, 1.08548710e-03, 2.18075656e-03, 2.38460375e-02,
  1.67416308e02, inf] (rtol=1e-4). At the integer orders both agree with us. At the
  fractional orders 1.5 and 2.5 dp_accounting now sums the absolute values of the
  alternating series (an upper bound), so it is 3% looser there; ours is the exact
  series, which TF Privacy's original values and a direct numerical integration of
  A_alpha (test below) both confirm.
  Conversion checks from the same files: RDP 1.1 at orders 2..32 and delta=1e-5 gives
  epsilon 1.32783806176 at order 32; the Gaussian with sigma=4.530877117 (q=1) at
  orders 1.000..99.999 is exactly (1, 1e-6)-DP (both assertAlmostEqual, 7 places).
* TF Privacy, compute_dp_sgd_privacy_test.py (tight conversion, orders
  [1.25..4.5, 5..63, 128, 256, 512], steps = ceil(epochs n / batch)):
  (n=60000, batch=150, sigma=1.3, 15 epochs, delta=1e-5) -> 0.7242234026109595 @ 19;
  (100000, 100, 1.0, 30, 1e-7) -> 1.4154988495444842 @ 13;
  (1e8, 1024, 0.1, 10, 1e-7) -> 5907982.3113978775 @ 1.25.
* Opacus, opacus/tests/accountants_test.py: sigma=1.5, q=0.04, int(90/0.04) steps,
  delta=1e-5, orders [1.1..10.9, 12..63] -> epsilon 7.32911117143 (7 places).
* TF Privacy tutorials/README.md (the DP-SGD MNIST tutorial, after Abadi et al. 2016):
  q=256/60000, noise 1.12, 60 epochs of 60000 // 256 steps, delta=1e-5 -> epsilon 2.92
  (2 decimals; the tutorial's orders [1.1..10.9, 12..63] and its then classic conversion
  rdp - log(delta)/(alpha-1)); the flag default sigma=1.1 gives 3.01, "about 3".
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from flctl.core.aggregation import update_distance
from flctl.core.privacy import (
    DEFAULT_ORDERS,
    CentralDP,
    PrivacyError,
    RdpAccountant,
    clip_update,
    compute_rdp,
    epsilon_from_rdp,
    local_accounting,
    privatize_locally,
    sgm_rdp,
)
from flctl.core.privacy.mechanism import NOISE_SEED_KEY
from flctl.core.strategies import FedAvg, FedAvgM, FedMedian, StrategyError

TF_DPSGD_ORDERS = [1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5,
                   *range(5, 64), 128, 256, 512]
TUTORIAL_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


# ---------------------------------------------------------------- published values


def test_rdp_matches_tf_privacy_reference_values() -> None:
    assert compute_rdp(0.1, 2, 10, [5])[0] == pytest.approx(0.07737, abs=5e-6)
    assert compute_rdp(1, 10, 1, [20])[0] == 0.1
    assert compute_rdp(0, 10, 1, [20])[0] == 0.0
    rdp = compute_rdp(0.01, 2.5, 50, [1.5, 2.5, 5, 50, 100, math.inf])
    published = [0.00065, 0.001085, 0.00218075, 0.023846, 167.416307]
    np.testing.assert_allclose(rdp[:5], published, rtol=0, atol=1e-5)
    assert rdp[5] == math.inf
    # dp_accounting's integer-order values, to its published rtol.
    np.testing.assert_allclose(rdp[2:5], [2.18075656e-03, 2.38460375e-02, 1.67416308e02],
                               rtol=1e-4)


def _numeric_log_a(q: float, sigma: float, alpha: float) -> float:
    """log E_{z~N(0,s^2)}[((1-q) + q exp((2z-1)/(2s^2)))^alpha] by the trapezoid rule.

    Integrates mu0 * ((ratio)^alpha - 1) and adds 1, so tiny values keep their digits.
    """
    z = np.linspace(-40 * sigma, 40 * sigma + alpha + 1, 400_001)
    mu0 = np.exp(-z * z / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
    ratio_log = np.log1p(q * np.expm1((2 * z - 1) / (2 * sigma**2)))
    f = mu0 * np.expm1(alpha * ratio_log)
    return math.log1p(float(np.sum((f[1:] + f[:-1]) / 2) * (z[1] - z[0])))


@pytest.mark.parametrize("q,sigma,alpha", [(0.01, 2.5, 1.5), (0.01, 2.5, 2.5),
                                           (0.01, 2.5, 3.9), (0.2, 0.7, 2.75),
                                           (0.05, 1.0, 7.5)])
def test_fractional_orders_match_numerical_integration(q: float, sigma: float,
                                                       alpha: float) -> None:
    expected = _numeric_log_a(q, sigma, alpha) / (alpha - 1)
    assert sgm_rdp(q, sigma, alpha) == pytest.approx(expected, rel=1e-7)


def test_conversion_matches_published_values() -> None:
    orders = list(range(2, 33))
    eps, order = epsilon_from_rdp(orders, [1.1] * len(orders), 1e-5)
    assert eps == pytest.approx(1.32783806176, abs=5e-8)
    assert order == 32
    fine = [0.001 * i for i in range(1001, 100000)]
    eps, _ = epsilon_from_rdp(fine, compute_rdp(1, 4.530877117, 1, fine), 1e-6)
    assert eps == pytest.approx(1.0, abs=5e-8)


@pytest.mark.parametrize("n,batch,sigma,epochs,delta,published,order", [
    (60000, 150, 1.3, 15, 1e-5, 0.7242234026109595, 19),
    (100000, 100, 1.0, 30, 1e-7, 1.4154988495444842, 13),
    (100_000_000, 1024, 0.1, 10, 1e-7, 5907982.3113978775, 1.25),
])
def test_dp_sgd_epsilons_match_tf_privacy(n: int, batch: int, sigma: float, epochs: int,
                                          delta: float, published: float,
                                          order: float) -> None:
    accountant = RdpAccountant.after_rounds(batch / n, sigma, math.ceil(epochs * n / batch),
                                            orders=TF_DPSGD_ORDERS)
    eps, best = accountant.epsilon_and_order(delta)
    # 7 places as published; relative for the 5.9e6 case, beyond float64's digits there.
    assert eps == pytest.approx(published, abs=5e-8, rel=1e-11)
    assert best == order


def test_opacus_reference_epsilon() -> None:
    accountant = RdpAccountant(TUTORIAL_ORDERS)
    for _ in range(int(90 / 0.04)):  # step by step, as Opacus's test does
        accountant.compose(0.04, 1.5)
    assert accountant.segments == ((0.04, 1.5, 2250),)
    assert accountant.epsilon(1e-5) == pytest.approx(7.32911117143, abs=5e-8)


def test_mnist_dp_sgd_tutorial_epsilon() -> None:
    steps = 60 * (60000 // 256)
    classic = RdpAccountant.after_rounds(256 / 60000, 1.12, steps, TUTORIAL_ORDERS,
                                         conversion="standard")
    assert round(classic.epsilon(1e-5), 2) == 2.92
    default_flag = RdpAccountant.after_rounds(256 / 60000, 1.1, steps, TUTORIAL_ORDERS,
                                              conversion="standard")
    assert round(default_flag.epsilon(1e-5), 2) == 3.01
    tight = RdpAccountant.after_rounds(256 / 60000, 1.12, steps, TUTORIAL_ORDERS)
    assert 2.5 < tight.epsilon(1e-5) < classic.epsilon(1e-5)


# ---------------------------------------------------------------- accountant behaviour


def test_full_participation_is_the_plain_gaussian_mechanism() -> None:
    sigma, rounds, delta = 1.7, 12, 1e-5
    accountant = RdpAccountant.after_rounds(1.0, sigma, rounds)
    alphas = np.array(DEFAULT_ORDERS)
    rdp = rounds * alphas / (2 * sigma**2)
    np.testing.assert_allclose(accountant.rdp(), rdp, rtol=1e-15)
    by_hand = rdp + np.log1p(-1 / alphas) - (math.log(delta) + np.log(alphas)) / (alphas - 1)
    assert accountant.epsilon(delta) == pytest.approx(float(by_hand.min()), rel=1e-12)
    classic = RdpAccountant.after_rounds(1.0, sigma, rounds, conversion="standard")
    assert classic.epsilon(delta) == pytest.approx(
        float((rdp - math.log(delta) / (alphas - 1)).min()), rel=1e-12)
    assert classic.epsilon(delta) > accountant.epsilon(delta)


def test_epsilon_grows_with_rounds_and_sampling_and_shrinks_with_noise() -> None:
    def eps(q: float, sigma: float, rounds: int) -> float:
        return RdpAccountant.after_rounds(q, sigma, rounds).epsilon(1e-5)

    by_rounds = [eps(0.1, 1.0, t) for t in (1, 10, 100, 1000)]
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 4
    by_noise = [eps(0.1, s, 100) for s in (0.5, 1.0, 2.0, 4.0)]
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == 4
    by_rate = [eps(q, 1.0, 100) for q in (0.01, 0.1, 0.5, 1.0)]
    assert by_rate == sorted(by_rate) and len(set(by_rate)) == 4
    assert eps(0.0, 1.0, 100) == 0.0
    assert RdpAccountant.after_rounds(0.0, 1.0, 100, conversion="standard").epsilon(1e-5) == 0
    assert eps(0.1, 0.0, 1) == math.inf
    assert RdpAccountant().epsilon(1e-5) == 0.0


def test_target_epsilon_stops_before_the_round_that_would_exceed_it() -> None:
    q, sigma, delta, target = 0.01, 1.1, 1e-5, 2.0
    accountant = RdpAccountant()
    fits = accountant.rounds_within(target, delta, q, sigma, limit=10_000)
    assert 1000 < fits < 10_000
    assert RdpAccountant.after_rounds(q, sigma, fits).epsilon(delta) <= target
    assert RdpAccountant.after_rounds(q, sigma, fits + 1).epsilon(delta) > target
    # Round by round, as the coordinator asks before each round.
    run = RdpAccountant()
    while not run.would_exceed(target, delta, q, sigma):
        run.compose(q, sigma)
    assert run.steps == fits
    assert run.epsilon(delta) <= target
    # A resumed run rebuilt from its round count answers the same.
    half = RdpAccountant.after_rounds(q, sigma, fits // 2)
    assert half.rounds_within(target, delta, q, sigma, limit=10_000) == fits - fits // 2
    assert half.rounds_within(target, delta, q, sigma, limit=3) == 3
    assert not half.would_exceed(target, delta, q, sigma, rounds=fits - fits // 2)
    assert half.would_exceed(target, delta, q, sigma, rounds=fits - fits // 2 + 1)
    # Eight hosts, all every round, little noise: not even the first round fits.
    assert RdpAccountant().rounds_within(1.0, delta, 1.0, 0.5, limit=20) == 0
    assert RdpAccountant().would_exceed(1.0, delta, 1.0, 0.5)


def test_accountant_refuses_bad_settings() -> None:
    accountant = RdpAccountant()
    for bad in (0.0, 1.0, -1e-5, float("nan"), True):
        with pytest.raises(PrivacyError, match="delta"):
            accountant.epsilon(bad)
    with pytest.raises(PrivacyError, match="sampling rate"):
        accountant.compose(1.5, 1.0)
    with pytest.raises(PrivacyError, match="noise multiplier"):
        accountant.compose(0.1, -1.0)
    with pytest.raises(PrivacyError, match="target epsilon"):
        accountant.would_exceed(0.0, 1e-5, 0.1, 1.0)
    with pytest.raises(PrivacyError, match="orders"):
        RdpAccountant(orders=[0.5, 2.0])


# ---------------------------------------------------------------- clipping and local DP


def _model(rng: np.random.Generator, dtype: type = np.float32) -> list[np.ndarray]:
    return [rng.normal(size=(64, 10)).astype(dtype), rng.normal(size=10).astype(dtype)]


def _shifted(base: list[np.ndarray], rng: np.random.Generator, norm: float) -> list[np.ndarray]:
    """`base` plus a random delta of exactly L2 norm `norm` (in float64)."""
    deltas = [rng.normal(size=b.shape) for b in base]
    scale = norm / math.sqrt(sum(float((d * d).sum()) for d in deltas))
    return [(b.astype(np.float64) + d * scale).astype(b.dtype) for b, d in zip(base, deltas)]


@pytest.mark.parametrize("dtype,rel", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_clipping_bounds_the_joint_norm_and_keeps_direction(dtype: type, rel: float) -> None:
    rng = np.random.default_rng(1)
    g = _model(rng, dtype)
    w = _shifted(g, rng, 7.0)
    clipped, norm = clip_update(g, w, 2.0)
    assert norm == pytest.approx(7.0, rel=rel)
    assert update_distance(clipped, g) == pytest.approx(2.0, rel=rel)
    assert update_distance(clipped, g) <= 2.0 * (1 + rel)
    assert all(c.dtype == dtype for c in clipped)
    # Same direction: the clipped delta is the delta scaled by 2/7.
    for c, x, base in zip(clipped, w, g):
        np.testing.assert_allclose(c.astype(np.float64) - base,
                                   (x.astype(np.float64) - base) * (2.0 / norm),
                                   atol=1e-6 if dtype == np.float32 else 1e-13)


def test_clipping_leaves_small_updates_unchanged() -> None:
    rng = np.random.default_rng(2)
    g = _model(rng)
    w = _shifted(g, rng, 0.5)
    clipped, norm = clip_update(g, w, 1.0)
    assert norm == pytest.approx(0.5, rel=1e-5)
    for c, x in zip(clipped, w):
        np.testing.assert_array_equal(c, x)
    with pytest.raises(PrivacyError, match="clip norm"):
        clip_update(g, w, 0.0)
    with pytest.raises(PrivacyError, match="not finite"):
        clip_update(g, [np.full_like(w[0], np.nan), w[1]], 1.0)


def test_local_privatisation_clips_then_adds_noise_of_the_stated_std() -> None:
    rng = np.random.default_rng(3)
    g = [np.zeros(200_000, np.float64)]
    w = _shifted(g, rng, 10.0)
    clip, z = 1.0, 0.8
    sent = privatize_locally(g, w, clip, z, np.random.default_rng(4))
    clipped, _ = clip_update(g, w, clip)
    noise = sent[0] - clipped[0]
    assert noise.mean() == pytest.approx(0.0, abs=5 * z * clip / math.sqrt(noise.size))
    assert noise.std() == pytest.approx(z * clip, rel=0.01)
    assert local_accounting(z) == (1.0, z / 2)
    again = privatize_locally(g, w, clip, z, np.random.default_rng(4))
    np.testing.assert_array_equal(again[0], sent[0])
    quiet = privatize_locally(g, w, clip, 0.0, np.random.default_rng(5))
    np.testing.assert_allclose(quiet[0], clipped[0], rtol=0, atol=1e-15)


# ---------------------------------------------------------------- central DP


def _round(strategy: CentralDP | FedAvg | FedAvgM, g: list[np.ndarray],
           updates: list[list[np.ndarray]], round_number: int = 1,
           examples: list[int] | None = None) -> list[np.ndarray]:
    aggregator = strategy.start_round(g, round_number)
    for i, u in enumerate(updates):
        aggregator.add(f"host{i}", u, examples[i] if examples else 1)
    return aggregator.result()


def test_central_noise_on_the_average_has_std_z_clip_over_m() -> None:
    rng = np.random.default_rng(5)
    g = [np.zeros((200, 100), np.float64), np.zeros(1000, np.float64)]
    updates = [_shifted(g, rng, 0.5) for _ in range(4)]  # inside the clip: unchanged
    clip, z, m = 1.0, 1.3, 10  # 4 of 10 expected hosts answer: the denominator stays 10
    strategy = CentralDP(FedAvg(), clip, z, expected_participants=m, noise_seed=7)
    clean = [sum(u[i] for u in updates) / m for i in range(2)]
    draws = []
    for round_number in range(1, 6):  # 5 rounds x 21000 coordinates
        result = _round(strategy, g, updates, round_number)
        draws.append(np.concatenate([(r - c).ravel() for r, c in zip(result, clean)]))
    noise = np.concatenate(draws)
    assert strategy.noise_std == pytest.approx(z * clip / m)
    assert noise.std() == pytest.approx(z * clip / m, rel=0.01)
    assert abs(noise.mean()) < 5 * strategy.noise_std / math.sqrt(noise.size)
    assert not np.array_equal(draws[0], draws[1])  # fresh noise every round


def test_central_clipping_bounds_each_hosts_influence() -> None:
    rng = np.random.default_rng(6)
    g = _model(rng, np.float64)
    hostile = _shifted(g, rng, 1e6)
    strategy = CentralDP(FedAvg(), 2.0, 0.0, expected_participants=5, noise_seed=1)
    aggregator = strategy.start_round(g, 1)
    aggregator.add("hostile", hostile, 10**9)  # the example count buys nothing
    result = aggregator.result()
    assert update_distance(result, g) == pytest.approx(2.0 / 5, rel=1e-12)
    assert aggregator.norms == (pytest.approx(1e6, rel=1e-9),)
    assert aggregator.clipped_fraction == 1.0


def test_without_noise_and_clipping_it_is_uniform_fedavg_exactly() -> None:
    rng = np.random.default_rng(7)
    g = _model(rng)
    updates = [_shifted(g, rng, float(n)) for n in (0.5, 1.0, 3.0, 8.0, 0.1, 2.0, 4.0, 1.5)]
    dp = _round(CentralDP(FedAvg(), 1e9, 0.0, expected_participants=8, noise_seed=0),
                g, updates, examples=[5, 50, 500, 1, 2, 3, 4, 9])
    uniform = _round(FedAvg(), g, updates, examples=[1] * 8)
    weighted = _round(FedAvg(), g, updates, examples=[5, 50, 500, 1, 2, 3, 4, 9])
    for a, b, c in zip(dp, uniform, weighted):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)


def test_server_optimiser_steps_from_the_noised_average() -> None:
    rng = np.random.default_rng(8)
    g = _model(rng, np.float64)
    rounds = [[_shifted(g, rng, 0.3) for _ in range(3)] for _ in range(2)]
    dp = CentralDP(FedAvgM(momentum=0.9), 1e9, 0.0, expected_participants=3, noise_seed=0)
    plain = FedAvgM(momentum=0.9)
    w_dp = w_plain = g
    for r, updates in enumerate(rounds, start=1):
        shifted_dp = [[w + (u - g0) for w, u, g0 in zip(w_dp, up, g)] for up in updates]
        shifted_plain = [[w + (u - g0) for w, u, g0 in zip(w_plain, up, g)] for up in updates]
        w_dp = _round(dp, w_dp, shifted_dp, r)
        w_plain = _round(plain, w_plain, shifted_plain, r)
    for a, b in zip(w_dp, w_plain):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    state = dp.state()
    assert set(state) == {"momentum", NOISE_SEED_KEY}
    np.testing.assert_allclose(state["momentum"][0], plain.state()["momentum"][0], atol=1e-12)


def test_noise_is_reproducible_from_seed_and_round_and_survives_resume() -> None:
    rng = np.random.default_rng(9)
    g = _model(rng)
    updates = [_shifted(g, rng, 3.0) for _ in range(3)]

    def run(strategy: CentralDP, round_number: int) -> list[np.ndarray]:
        return _round(strategy, g, updates, round_number)

    first = run(CentralDP(FedAvg(), 1.0, 1.0, 3, noise_seed=42), 4)
    same = run(CentralDP(FedAvg(), 1.0, 1.0, 3, noise_seed=42), 4)
    other_round = run(CentralDP(FedAvg(), 1.0, 1.0, 3, noise_seed=42), 5)
    other_seed = run(CentralDP(FedAvg(), 1.0, 1.0, 3, noise_seed=43), 4)
    for a, b, c, d in zip(first, same, other_round, other_seed):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c) and not np.array_equal(a, d)
    # Default seed: secret OS entropy, carried by state() into the checkpoint.
    original = CentralDP(FedAvgM(), 1.0, 1.0, 3)
    resumed = CentralDP(FedAvgM(), 1.0, 1.0, 3)
    assert original.noise_seed != resumed.noise_seed
    run(original, 1)
    resumed.load_state(original.state())
    assert resumed.noise_seed == original.noise_seed
    for a, b in zip(run(original, 2), run(resumed, 2)):
        np.testing.assert_array_equal(a, b)


def test_central_dp_refuses_what_would_break_the_guarantee() -> None:
    rng = np.random.default_rng(10)
    g = _model(rng)
    with pytest.raises(PrivacyError, match="FedAvg-family"):
        CentralDP(FedMedian(), 1.0, 1.0, 3)
    with pytest.raises(PrivacyError, match="clip norm"):
        CentralDP(FedAvg(), -1.0, 1.0, 3)
    with pytest.raises(PrivacyError, match="expected participants"):
        CentralDP(FedAvg(), 1.0, 1.0, 0)
    strategy = CentralDP(FedAvg(), 1.0, 1.0, 3, noise_seed=3)
    aggregator = strategy.start_round(g, 1)
    aggregator.add("a", _shifted(g, rng, 1.0), 10)
    with pytest.raises(StrategyError, match="second update"):
        aggregator.add("a", _shifted(g, rng, 1.0), 10)
    with pytest.raises(StrategyError, match="NaN"):
        aggregator.add("b", [np.full_like(g[0], np.inf), g[1]], 10)
    with pytest.raises(StrategyError, match="num_examples"):
        aggregator.add("c", _shifted(g, rng, 1.0), -1)
    assert aggregator.count == 1
    aggregator.result()
    # A second aggregate for round 1 would publish the same noise twice.
    again = strategy.start_round(g, 1)
    again.add("a", _shifted(g, rng, 1.0), 10)
    with pytest.raises(StrategyError, match="already released"):
        again.result()
    with pytest.raises(StrategyError, match="no updates"):
        strategy.start_round(g, 2).result()
    with pytest.raises(StrategyError, match="dtype"):
        strategy.start_round([np.zeros(3, np.int64)], 3)
