"""Mutual-TLS contexts pinned to the project CA.

The project CA is the only trust anchor (never the system store): a
certificate from any other CA, or none at all, fails the handshake. TLS 1.3
only, which also means ECDHE forward secrecy and AEAD ciphers by construction.
OpenSSL also checks each certificate's usage for its side (a server needs
server auth, a client client auth) and, given the CA's revocation list,
refuses revoked certificates.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Union

PathLike = Union[str, Path]


def _base(protocol: int, ca_cert: PathLike, cert: PathLike, key: PathLike,
          crl: PathLike | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(ca_cert))
    if crl is not None:
        ctx.load_verify_locations(cafile=str(crl))   # the CA's CRL: a PEM file like the CA's
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    return ctx


def server_context(ca_cert: PathLike, cert: PathLike, key: PathLike,
                   crl: PathLike | None = None) -> ssl.SSLContext:
    """Server side: a client certificate signed by the project CA is required."""
    ctx = _base(ssl.PROTOCOL_TLS_SERVER, ca_cert, cert, key, crl)
    # flctl clients never resume sessions; not issuing tickets saves a round of
    # post-handshake messages and means every connection re-proves its certificate.
    ctx.num_tickets = 0
    return ctx


def client_context(ca_cert: PathLike, cert: PathLike, key: PathLike,
                   crl: PathLike | None = None) -> ssl.SSLContext:
    """Client side: the server's cert must come from the project CA and match the
    hostname/IP dialled; our own cert is presented for the server to check."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT, ca_cert, cert, key, crl)
    ctx.check_hostname = True
    return ctx


def peer_common_name(ssl_sock: ssl.SSLSocket) -> str | None:
    """The CN of the verified peer certificate, or None if there is none."""
    try:
        cert = ssl_sock.getpeercert()
    except (ValueError, OSError):
        return None
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for attr, value in rdn:
            if attr == "commonName":
                return str(value)
    return None


def peer_certificate(ssl_sock: ssl.SSLSocket) -> bytes | None:
    """The verified peer certificate (DER), or None if there is none."""
    try:
        return ssl_sock.getpeercert(binary_form=True)
    except (ValueError, OSError):
        return None
