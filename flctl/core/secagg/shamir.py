"""t-of-n Shamir secret sharing of short secrets (keys and seeds).

Shamir, "How to share a secret", CACM 1979. The secret is the constant term
of a random polynomial of degree t-1 over GF(p); share i is the polynomial at
x = i. Any t shares fix the polynomial (Lagrange interpolation at 0); any t-1
are consistent with every possible secret, so fewer than t shares carry no
information at all - `reconstruct` refuses them rather than return noise.

p = 2^521 - 1 (a Mersenne prime) holds any 32-byte secret in one field
element, so there is no chunking; a share is 66 bytes. Python integers do
the arithmetic: a round shares two secrets per host, which is microseconds.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from flctl.errors import FlctlError

PRIME = 2 ** 521 - 1
SHARE_BYTES = (PRIME.bit_length() + 7) // 8  # 66
MAX_SECRET_BYTES = (PRIME.bit_length() - 1) // 8  # 65: every such integer is < PRIME


class ShamirError(FlctlError):
    """Too few shares, duplicate evaluation points, or a malformed share."""


@dataclass(frozen=True)
class Share:
    """One evaluation (x, f(x)); `threshold` travels along so reconstruction can refuse."""

    x: int
    y: int
    threshold: int

    def y_bytes(self) -> bytes:
        return self.y.to_bytes(SHARE_BYTES, "big")

    @classmethod
    def from_bytes(cls, x: int, data: bytes, threshold: int) -> Share:
        if len(data) != SHARE_BYTES:
            raise ShamirError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
        y = int.from_bytes(data, "big")
        if y >= PRIME:
            raise ShamirError("share value is outside the field")
        return cls(x, y, threshold)


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> list[Share]:
    """Shares of `secret` at the evaluation points `xs` (distinct, 1 <= x < p)."""
    if len(secret) > MAX_SECRET_BYTES:
        raise ShamirError(f"secret is {len(secret)} bytes, at most {MAX_SECRET_BYTES} fit")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ShamirError("evaluation points must be distinct and in 1..p-1")
    if not 1 <= threshold <= len(xs):
        raise ShamirError(f"threshold {threshold} must be between 1 and {len(xs)} shares")
    coeffs = [int.from_bytes(secret, "big")]
    coeffs += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares.append(Share(x, y, threshold))
    return shares


def reconstruct(shares: Sequence[Share], secret_bytes: int = 32) -> bytes:
    """The secret from any `threshold` of its shares; fewer is an error.

    Uses the first `threshold` shares by x; extra shares are not cross-checked.
    """
    if not shares:
        raise ShamirError("no shares to reconstruct from")
    threshold = shares[0].threshold
    if any(s.threshold != threshold for s in shares):
        raise ShamirError("shares disagree on the threshold")
    by_x = {s.x: s for s in shares}
    if len(by_x) != len(shares):
        raise ShamirError("two shares have the same evaluation point")
    if len(by_x) < threshold:
        raise ShamirError(f"{len(by_x)} shares cannot reconstruct a secret that needs {threshold}")
    used = [by_x[x] for x in sorted(by_x)[:threshold]]
    secret = 0
    for i, si in enumerate(used):
        num, den = 1, 1
        for j, sj in enumerate(used):
            if i != j:
                num = num * sj.x % PRIME
                den = den * (sj.x - si.x) % PRIME
        secret = (secret + si.y * num * pow(den, -1, PRIME)) % PRIME
    if secret.bit_length() > 8 * secret_bytes:
        raise ShamirError("shares are inconsistent: reconstructed value is not a secret")
    return secret.to_bytes(secret_bytes, "big")
