"""Privacy budget of DP-FedAvg: a Rényi-DP accountant for the sampled Gaussian mechanism.

One round of central DP-FedAvg is the sampled Gaussian mechanism (SGM):
each host takes part with probability q, its clipped update moves the sum
by at most the clip norm, and Gaussian noise of noise_multiplier x clip is
added. Its Rényi divergence at order alpha follows Mironov, Talwar and
Zhang (2019), "Rényi Differential Privacy of the Sampled Gaussian
Mechanism", section 3.3: a finite binomial sum for integer alpha and two
series with erfc factors for fractional alpha, both in log space so that
tiny noise or huge orders do not overflow. q = 1 is the plain Gaussian
mechanism, alpha / (2 sigma^2); q = 0 costs nothing. RDP adds up over rounds.

The conversion to (epsilon, delta) is, by default, the tight one of Canonne,
Kamath and Steinke (2020), "The Discrete Gaussian for Differential Privacy",
Proposition 12 (also Balle et al. 2020, "Hypothesis Testing Interpretations
and Rényi Differential Privacy", Theorem 21):
    epsilon = rdp + log(1 - 1/alpha) - (log delta + log alpha) / (alpha - 1),
the one Google's dp_accounting and Opacus use; `conversion="standard"` gives
Mironov's (2017) classic rdp - log(delta) / (alpha - 1), always larger. Each is
minimised over the orders; an order where delta^2 > 1 - exp(-rdp) gives
epsilon 0 (total variation is at most sqrt(1 - exp(-KL)) <= sqrt(1 - exp(-rdp))).

Sampling: a coordinator that draws a fixed number of hosts per round is
accounted as Poisson sampling at the same rate q = sampled / total, the
usual approximation (DP-FedAvg and TF Privacy do the same); a run whose
hosts are drawn without replacement is not covered by the theorem exactly.

The accountant is a pure function of its (q, sigma, rounds) segments, so a
resumed run rebuilds it from the checkpoint's round count (`after_rounds`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from flctl.errors import FlctlError

# TF Privacy's compute_dp_sgd_privacy order list: fine steps near 1 (where the
# optimum lies for large epsilon), every integer to 63 for the usual regime,
# and a few large orders for small epsilon.
DEFAULT_ORDERS: tuple[float, ...] = (
    1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5,
    *(float(a) for a in range(5, 64)), 128.0, 256.0, 512.0)

CONVERSIONS = ("tight", "standard")

# Fractional-order series: stop once both terms drop below e^-30 (A >= 1, so
# this is relative accuracy ~1e-13); the cap only guards against a bug.
_LOG_TERM_FLOOR = -30.0
_MAX_SERIES_TERMS = 1_000_000
# Above this, erfc(x) is computed from its asymptotic series (math.erfc
# underflows near 26.5; at 20 the truncated series is exact to ~1e-12).
_ERFC_ASYMPTOTIC_FROM = 20.0


class PrivacyError(FlctlError):
    """Privacy settings that cannot be accounted (bad delta, clip norm, noise, rate)."""


# ---------------------------------------------------------------- parameter checks


def check_sampling_rate(q: object) -> float:
    if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0.0 <= q <= 1.0:
        raise PrivacyError(f"sampling rate must be a number in [0, 1], got {q!r}")
    return float(q)


def check_noise_multiplier(sigma: object) -> float:
    if (isinstance(sigma, bool) or not isinstance(sigma, numbers.Real)
            or not 0.0 <= sigma < math.inf):
        raise PrivacyError(f"noise multiplier must be a finite number >= 0, got {sigma!r}")
    return float(sigma)


def check_delta(delta: object) -> float:
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0.0 < delta < 1.0:
        raise PrivacyError(f"delta must be a number in (0, 1), got {delta!r}")
    return float(delta)


def check_epsilon(epsilon: object) -> float:
    if (isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real)
            or not 0.0 < epsilon < math.inf):
        raise PrivacyError(f"target epsilon must be a finite number > 0, got {epsilon!r}")
    return float(epsilon)


def _check_orders(orders: Sequence[float]) -> tuple[float, ...]:
    checked = tuple(float(a) for a in orders)
    if not checked or any(not a > 1.0 for a in checked):  # NaN fails too
        raise PrivacyError(f"RDP orders must be a non-empty list of numbers > 1, got {orders!r}")
    return checked


def _check_steps(steps: object) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise PrivacyError(f"steps must be an integer >= 0, got {steps!r}")
    return int(steps)


# ---------------------------------------------------------------- log-space helpers


def _log_add(a: float, b: float) -> float:
    """log(e^a + e^b) without overflow."""
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    high, low = (a, b) if a >= b else (b, a)
    return high + math.log1p(math.exp(low - high))


def _signed_log_add(total: tuple[float, float], term: tuple[float, float]
                    ) -> tuple[float, float]:
    """(sign, log|x|) + (sign, log|y|): the fractional series alternate in sign."""
    (s1, l1), (s2, l2) = total, term
    if l2 == -math.inf:
        return total
    if l1 == -math.inf:
        return term
    if s1 == s2:
        return s1, _log_add(l1, l2)
    high, low, sign = (l1, l2, s1) if l1 >= l2 else (l2, l1, s2)
    if high == low:
        return 1.0, -math.inf
    return sign, high + math.log(-math.expm1(low - high))


def _log_erfc(x: float) -> float:
    """log(erfc(x)), accurate far into the upper tail where erfc underflows."""
    if x < _ERFC_ASYMPTOTIC_FROM:
        return math.log(math.erfc(x))
    # erfc(x) = e^{-x^2} / (x sqrt(pi)) * (1 - 1/(2x^2) + 3/(4x^4) - 15/(8x^6) + 105/(16x^8))
    inv = 1.0 / (x * x)
    series = 1.0 - inv / 2 + 3 * inv**2 / 4 - 15 * inv**3 / 8 + 105 * inv**4 / 16
    return -x * x - math.log(x) - 0.5 * math.log(math.pi) + math.log(series)


# ---------------------------------------------------------------- RDP of one SGM step


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    """log A_alpha = log sum_k C(alpha,k) (1-q)^(alpha-k) q^k exp((k^2-k)/(2 sigma^2))."""
    log_q, log_1mq = math.log(q), math.log1p(-q)
    total = -math.inf
    for k in range(alpha + 1):
        log_binom = math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
        term = (log_binom + k * log_q + (alpha - k) * log_1mq
                + (k * k - k) / (2 * sigma * sigma))
        total = _log_add(total, term)
    return total


def _log_a_fractional(q: float, sigma: float, alpha: float) -> float:
    """log A_alpha for fractional alpha: the integral split at z0 where the densities cross.

    Both halves expand (1 - q + q e^{(2z-1)/(2 sigma^2)})^alpha in a generalised
    binomial series; the coefficients change sign past k > alpha, so the sums
    are kept as (sign, log magnitude).
    """
    log_q, log_1mq = math.log(q), math.log1p(-q)
    z0 = sigma * sigma * (math.log1p(-q) - log_q) + 0.5  # sigma^2 log(1/q - 1) + 1/2
    scale = math.sqrt(2.0) * sigma
    below: tuple[float, float] = (1.0, -math.inf)
    above: tuple[float, float] = (1.0, -math.inf)
    coef_sign, log_coef = 1.0, 0.0  # C(alpha, 0) = 1
    for k in range(_MAX_SERIES_TERMS):
        j = alpha - k
        log_s0 = (log_coef + k * log_q + j * log_1mq + (k * k - k) / (2 * sigma * sigma)
                  + math.log(0.5) + _log_erfc((k - z0) / scale))
        log_s1 = (log_coef + j * log_q + k * log_1mq + (j * j - j) / (2 * sigma * sigma)
                  + math.log(0.5) + _log_erfc((z0 - j) / scale))
        below = _signed_log_add(below, (coef_sign, log_s0))
        above = _signed_log_add(above, (coef_sign, log_s1))
        if max(log_s0, log_s1) < _LOG_TERM_FLOOR:
            break
        # C(alpha, k+1) = C(alpha, k) (alpha - k) / (k + 1)
        if j == 0:  # cannot happen for fractional alpha; keeps the log defined
            break
        coef_sign *= 1.0 if j > 0 else -1.0
        log_coef += math.log(abs(j)) - math.log(k + 1)
    else:  # pragma: no cover - the terms decay like k^-(alpha+2)
        raise PrivacyError(f"RDP series did not converge (q={q}, sigma={sigma}, "
                           f"alpha={alpha})")
    sign, value = _signed_log_add(below, above)
    if sign < 0:  # pragma: no cover - A_alpha >= 1 mathematically
        raise PrivacyError(f"RDP series lost precision (q={q}, sigma={sigma}, alpha={alpha})")
    return value


def sgm_rdp(q: float, sigma: float, alpha: float) -> float:
    """RDP at order `alpha` of ONE sampled Gaussian step (sampling rate q, noise sigma)."""
    q, sigma = check_sampling_rate(q), check_noise_multiplier(sigma)
    alpha = float(alpha)
    if not alpha > 1.0:
        raise PrivacyError(f"RDP order must be > 1, got {alpha!r}")
    if q == 0.0:
        return 0.0
    if sigma == 0.0 or alpha == math.inf:
        return math.inf
    if q == 1.0:
        return alpha / (2.0 * sigma * sigma)
    if alpha.is_integer():
        log_a = _log_a_integer(q, sigma, int(alpha))
    else:
        log_a = _log_a_fractional(q, sigma, alpha)
    return max(0.0, log_a / (alpha - 1.0))


@lru_cache(maxsize=256)
def _step_rdp(q: float, sigma: float, orders: tuple[float, ...]) -> np.ndarray:
    rdp = np.array([sgm_rdp(q, sigma, a) for a in orders], dtype=np.float64)
    rdp.setflags(write=False)
    return rdp


def compute_rdp(q: float, noise_multiplier: float, steps: int,
                orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """RDP of `steps` rounds of the SGM at each of `orders` (order inf allowed: gives inf)."""
    steps = _check_steps(steps)
    alphas = _check_orders(orders)
    q, sigma = check_sampling_rate(q), check_noise_multiplier(noise_multiplier)
    per_step = _step_rdp(q, sigma, alphas)
    if steps == 0:
        return np.zeros(len(alphas))
    with np.errstate(invalid="ignore"):  # inf * steps stays inf
        return per_step * steps


# ---------------------------------------------------------------- RDP -> (epsilon, delta)


def epsilon_from_rdp(orders: Sequence[float], rdp: Sequence[float], delta: float,
                     conversion: str = "tight") -> tuple[float, float]:
    """(epsilon, the order that gives it) for a total RDP curve at `delta`."""
    delta = check_delta(delta)
    if conversion not in CONVERSIONS:
        raise PrivacyError(f"unknown RDP conversion {conversion!r}; valid: "
                           f"{', '.join(CONVERSIONS)}")
    alphas = np.asarray(_check_orders(orders), dtype=np.float64)
    values = np.asarray(rdp, dtype=np.float64)
    if values.shape != alphas.shape:
        raise PrivacyError(f"{len(alphas)} orders but {values.size} RDP values")
    if np.isnan(values).any() or (values < 0).any():
        raise PrivacyError("RDP values must be >= 0")
    with np.errstate(invalid="ignore", over="ignore"):
        if conversion == "tight":
            eps = (values + np.log1p(-1.0 / alphas)
                   - (math.log(delta) + np.log(alphas)) / (alphas - 1.0))
        else:
            eps = values - math.log(delta) / (alphas - 1.0)
        # (0, delta)-DP already holds when delta >= sqrt(1 - exp(-KL)) >= total variation.
        eps = np.where(delta * delta + np.expm1(-values) > 0, 0.0, eps)
    eps = np.where(np.isnan(eps), math.inf, eps)
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), float(alphas[best])


# ---------------------------------------------------------------- the accountant


class RdpAccountant:
    """The privacy spent by a run so far: a list of (q, noise multiplier, rounds) segments.

    Nothing else is kept, so it is deterministic and a resumed run rebuilds
    it from the checkpoint's round count. Delta is given per question, not
    stored, so the same record answers for any delta.
    """

    def __init__(self, orders: Sequence[float] = DEFAULT_ORDERS,
                 conversion: str = "tight") -> None:
        if conversion not in CONVERSIONS:
            raise PrivacyError(f"unknown RDP conversion {conversion!r}; valid: "
                               f"{', '.join(CONVERSIONS)}")
        self.orders = _check_orders(orders)
        self.conversion = conversion
        self._segments: list[tuple[float, float, int]] = []

    @classmethod
    def after_rounds(cls, sampling_rate: float, noise_multiplier: float, rounds: int,
                     orders: Sequence[float] = DEFAULT_ORDERS,
                     conversion: str = "tight") -> RdpAccountant:
        """The accountant of a run that completed `rounds` rounds at fixed (q, sigma)."""
        accountant = cls(orders, conversion)
        accountant.compose(sampling_rate, noise_multiplier, rounds)
        return accountant

    def compose(self, sampling_rate: float, noise_multiplier: float, steps: int = 1) -> None:
        """Record `steps` more rounds at sampling rate q and noise multiplier sigma."""
        q = check_sampling_rate(sampling_rate)
        sigma = check_noise_multiplier(noise_multiplier)
        steps = _check_steps(steps)
        if steps == 0:
            return
        if self._segments and self._segments[-1][:2] == (q, sigma):
            self._segments[-1] = (q, sigma, self._segments[-1][2] + steps)
        else:
            self._segments.append((q, sigma, steps))

    @property
    def segments(self) -> tuple[tuple[float, float, int], ...]:
        return tuple(self._segments)

    @property
    def steps(self) -> int:
        return sum(steps for _, _, steps in self._segments)

    def rdp(self) -> np.ndarray:
        """Total RDP at each order."""
        total = np.zeros(len(self.orders))
        for q, sigma, steps in self._segments:
            total = total + compute_rdp(q, sigma, steps, self.orders)
        return total

    def epsilon_and_order(self, delta: float) -> tuple[float, float]:
        return epsilon_from_rdp(self.orders, self.rdp(), delta, self.conversion)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at `delta`, with the best order."""
        return self.epsilon_and_order(delta)[0]

    def rounds_within(self, target_epsilon: float, delta: float, sampling_rate: float,
                      noise_multiplier: float, limit: int) -> int:
        """How many more rounds at (q, sigma) keep epsilon <= target (at most `limit`).

        0 means the next round would already exceed the budget: do not run it.
        """
        target = check_epsilon(target_epsilon)
        delta = check_delta(delta)
        limit = _check_steps(limit)
        spent = self.rdp()
        per_round = compute_rdp(sampling_rate, noise_multiplier, 1, self.orders)

        def fits(extra: int) -> bool:
            with np.errstate(invalid="ignore"):
                total = spent + per_round * extra if extra else spent
            return epsilon_from_rdp(self.orders, total, delta, self.conversion)[0] <= target

        if limit == 0 or not fits(1):
            return 0
        # epsilon grows with the rounds: double past the budget, then bisect.
        low, high = 1, 2
        while high <= limit and fits(high):
            low, high = high, high * 2
        if high > limit:
            if fits(limit):
                return limit
            high = limit
        while high - low > 1:  # fits(low) and not fits(high)
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        return low

    def would_exceed(self, target_epsilon: float, delta: float, sampling_rate: float,
                     noise_multiplier: float, rounds: int = 1) -> bool:
        """True if `rounds` more rounds at (q, sigma) would take epsilon past the target."""
        rounds = _check_steps(rounds)
        return self.rounds_within(target_epsilon, delta, sampling_rate, noise_multiplier,
                                  rounds) < rounds
