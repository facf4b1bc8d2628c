"""Masks: a 32-byte seed stretched into a uint32 vector with ChaCha20.

ChaCha20 (RFC 8439) keyed with the seed, zero nonce and counter, encrypting
zeros: the keystream is the mask. Every seed is fresh per round (new X25519
keys and self-mask seeds each round), so the fixed nonce never repeats under
one key. The keystream is produced in chunks and added straight into the
caller's accumulator, so memory stays at one chunk whatever the model size;
OpenSSL runs it at several GB/s, far above the cost of the numpy add.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms

SEED_BYTES = 32
# 64 Ki words (256 KiB) per keystream call: the chunk is still in L2 cache when it
# is added, and call overhead is noise (measured ~1 ms per 1M words with the add).
_CHUNK = 1 << 16
_SLACK = 64  # update_into wants room for one block beyond the data
_ZERO_NONCE = bytes(16)
_ZEROS = memoryview(bytes(4 * _CHUNK))


def _keystream(seed: bytes) -> CipherContext:
    if len(seed) != SEED_BYTES:
        raise ValueError(f"PRG seed must be {SEED_BYTES} bytes, got {len(seed)}")
    return Cipher(algorithms.ChaCha20(seed, _ZERO_NONCE), mode=None).encryptor()


def expand(seed: bytes, length: int) -> np.ndarray:
    """The first `length` uint32 words of the seed's keystream (little-endian)."""
    out = np.zeros(length, dtype=np.uint32)
    add_mask(out, seed, +1)
    return out


def add_mask(acc: np.ndarray, seed: bytes, sign: int) -> None:
    """acc += sign * expand(seed, len(acc)) modulo 2^32, in place."""
    if acc.dtype != np.uint32 or acc.ndim != 1:
        raise ValueError("mask accumulator must be a 1-D uint32 array")
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign}")
    stream = _keystream(seed)
    buffer = bytearray(4 * min(_CHUNK, acc.size) + _SLACK)
    for start in range(0, acc.size, _CHUNK):
        stop = min(start + _CHUNK, acc.size)
        stream.update_into(_ZEROS[:4 * (stop - start)], buffer)
        words = np.frombuffer(buffer, dtype="<u4", count=stop - start)
        if sign > 0:
            acc[start:stop] += words
        else:
            acc[start:stop] -= words
