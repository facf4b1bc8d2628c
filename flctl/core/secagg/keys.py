"""Who is who in a secure-aggregation round, and the secrets two hosts share.

The server relays every public key, so a host must not take one on the
server's word: each advertisement is signed with the host's TLS key (EC
P-256, issued by the project CA) over (round, host, c_pk, s_pk), and a peer
checks CA signature, validity window, CN == claimed host and the signature
before using any key. Two X25519 key pairs per host and round (Bonawitz et
al., CCS 2017, section 4): c for the share-encryption channel, s for the
pairwise masks, so revealing s_sk of a dropped host never opens its channel.
The advertisement also commits to the host's self-mask seed (`commit_seed`)
so a wrong share of it cannot silently corrupt the sum.

Bytes inside payload dicts are standard base64 (RFC 4648, with padding) in
ASCII strings; certificates are PEM text.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import functools
import os
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from flctl.core.pki import (
    ROLE_HOST,
    PKIError,
    certificate_role,
    load_private_key,
    verify_issued_by,
)
from flctl.errors import FlctlError

KEY_BYTES = 32
_NONCE_BYTES = 12
_DOMAIN = b"flctl-secagg/v1"


class SecAggError(FlctlError):
    """The round cannot complete safely (too few hosts, protocol misuse, bad state)."""


class PeerError(SecAggError):
    """One host's keys, certificate, signature or ciphertext is not acceptable."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"secure aggregation: host {host!r}: {reason}")
        self.host = host
        self.reason = reason


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: Any, host: str, what: str, size: int | None = None) -> bytes:
    """Decode a peer's field; a malformed value is that peer's error."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise PeerError(host, f"{what} is not valid base64") from exc
    if size is not None and len(data) != size:
        raise PeerError(host, f"{what} must be {size} bytes, got {len(data)}")
    return data


def canonical(*parts: bytes | str) -> bytes:
    """Length-prefixed concatenation: no two part lists encode the same bytes."""
    out = bytearray(_DOMAIN)
    for part in parts:
        raw = part.encode("utf-8") if isinstance(part, str) else part
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def advert_message(round_id: str, host: str, c_pk: bytes, s_pk: bytes,
                   b_commit: bytes) -> bytes:
    return canonical(b"advertise", round_id, host, c_pk, s_pk, b_commit)


def commit_seed(round_id: str, host: str, seed: bytes) -> bytes:
    """SHA-256 commitment to a self-mask seed: lets the server check that the
    seed it rebuilt from shares is the one the host used (the seed is 256
    random bits, so the hash reveals nothing usable about it)."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(canonical(b"self-mask", round_id, host, seed))
    return digest.finalize()


def sign(signing_key_pem: bytes, message: bytes) -> bytes:
    """ECDSA-SHA256 with the host's own TLS key (peers check it with its certificate)."""
    try:
        key = load_private_key(signing_key_pem)
    except PKIError as exc:
        raise SecAggError(f"cannot use the signing key: {exc.message}") from exc
    return key.sign(message, ec.ECDSA(hashes.SHA256()))


@dataclass(frozen=True)
class PeerKeys:
    """A peer's verified public keys (raw X25519 bytes)."""

    host: str
    c_pk: bytes
    s_pk: bytes
    b_commit: bytes


def _utc(cert: x509.Certificate, field: str) -> datetime.datetime:
    # The *_utc properties only exist from cryptography 42; older ones are naive UTC.
    value = getattr(cert, field + "_utc", None)
    if value is None:
        value = getattr(cert, field).replace(tzinfo=datetime.timezone.utc)
    return value


@functools.lru_cache(maxsize=1024)
def _issued(cert_pem: bytes, ca_pem: bytes) -> tuple[x509.Certificate, bool, str | None]:
    """(certificate, issued by the CA?, role): fixed by the two PEMs, so computed once
    per pair. Every round re-verifies all peers' certificates (twice a `flctl stats
    --secure`), and the CA's signature check was most of a host's share step; the
    checks that change with time (validity, revocation) stay in `_check_certificate`.
    ValueError (not cached) for a PEM that is not a certificate."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert, verify_issued_by(cert_pem, ca_pem), certificate_role(cert_pem)


def _check_certificate(host: str, cert_pem: bytes, ca_pem: bytes,
                       revoked: frozenset[int] = frozenset()) -> x509.Certificate:
    try:
        cert, issued, role = _issued(cert_pem, ca_pem)
    except ValueError as exc:
        raise PeerError(host, "certificate is not a PEM certificate") from exc
    if not issued:
        raise PeerError(host, "certificate is not issued by the project CA")
    now = datetime.datetime.now(datetime.timezone.utc)
    if not _utc(cert, "not_valid_before") <= now <= _utc(cert, "not_valid_after"):
        raise PeerError(host, "certificate is expired or not yet valid")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(names[0].value) if names else None
    if common_name != host:
        raise PeerError(host, f"certificate is for {common_name!r}, not for this host")
    if role != ROLE_HOST:
        raise PeerError(host, "certificate is not a host's (its usage is not server auth only)")
    if cert.serial_number in revoked:
        raise PeerError(host, "certificate is revoked")
    return cert


def verify_advert(host: str, advert: Any, round_id: str, ca_pem: bytes,
                  revoked: frozenset[int] = frozenset()) -> PeerKeys:
    """The peer's keys, once its certificate and signature check out."""
    if not isinstance(advert, dict):
        raise PeerError(host, "advertisement is not an object")
    if advert.get("host") != host:
        raise PeerError(host, f"advertisement claims to be from {advert.get('host')!r}")
    if advert.get("round") != round_id:
        raise PeerError(host, f"advertisement is for round {advert.get('round')!r}")
    cert_pem = advert.get("cert")
    if not isinstance(cert_pem, str):
        raise PeerError(host, "advertisement has no certificate")
    cert = _check_certificate(host, cert_pem.encode("ascii", "replace"), ca_pem, revoked)
    c_pk = b64decode(advert.get("c_pk"), host, "c_pk", KEY_BYTES)
    s_pk = b64decode(advert.get("s_pk"), host, "s_pk", KEY_BYTES)
    b_commit = b64decode(advert.get("b_commit"), host, "b_commit", KEY_BYTES)
    signature = b64decode(advert.get("signature"), host, "signature")
    public_key = cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise PeerError(host, "certificate key is not an EC key")
    try:
        public_key.verify(signature, advert_message(round_id, host, c_pk, s_pk, b_commit),
                          ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise PeerError(host, "advertisement signature is invalid") from exc
    return PeerKeys(host, c_pk, s_pk, b_commit)


def _agree(own: X25519PrivateKey, peer_pk: bytes, host: str) -> bytes:
    try:
        return own.exchange(X25519PublicKey.from_public_bytes(peer_pk))
    except ValueError as exc:  # a low-order point gives the all-zero secret
        raise PeerError(host, "public key is degenerate") from exc


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def mask_seed(s_sk: X25519PrivateKey, peer_s_pk: bytes, round_id: str,
              own_host: str, peer_host: str) -> bytes:
    """s_uv: the same 32 bytes on both sides of the pair (names sorted)."""
    low, high = sorted((own_host, peer_host))
    return _hkdf(_agree(s_sk, peer_s_pk, peer_host), canonical(b"mask", round_id, low, high))


def share_aad(round_id: str, sender: str, receiver: str) -> bytes:
    return canonical(b"share-aad", round_id, sender, receiver)


def _share_cipher(c_sk: X25519PrivateKey, peer_c_pk: bytes, round_id: str,
                  sender: str, receiver: str, peer: str) -> AESGCM:
    # Directional key (sender, receiver): the two directions of a pair never share a key.
    info = canonical(b"share-key", round_id, sender, receiver)
    return AESGCM(_hkdf(_agree(c_sk, peer_c_pk, peer), info))


def seal_shares(c_sk: X25519PrivateKey, peer_c_pk: bytes, round_id: str,
                sender: str, receiver: str, plaintext: bytes) -> bytes:
    cipher = _share_cipher(c_sk, peer_c_pk, round_id, sender, receiver, receiver)
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + cipher.encrypt(nonce, plaintext, share_aad(round_id, sender, receiver))


def open_shares(c_sk: X25519PrivateKey, peer_c_pk: bytes, round_id: str,
                sender: str, receiver: str, box: bytes) -> bytes:
    cipher = _share_cipher(c_sk, peer_c_pk, round_id, sender, receiver, sender)
    if len(box) < _NONCE_BYTES + 16:
        raise PeerError(sender, "share ciphertext is truncated")
    try:
        return cipher.decrypt(box[:_NONCE_BYTES], box[_NONCE_BYTES:],
                              share_aad(round_id, sender, receiver))
    except InvalidTag as exc:
        raise PeerError(sender, "share ciphertext failed authentication") from exc
