"""Project CA and certificates for mutual TLS between coordinator and agents.

Every flctl peer is both a TLS server and client of the same project CA, so
leaf certificates carry both SERVER_AUTH and CLIENT_AUTH. Keys are generated
where they are used (the CSR flow) so private keys never travel. ECDSA P-256
keeps handshakes cheap on hundreds of hosts. Everything is PEM bytes so the
callers decide where (and with which permissions) things are written.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flctl.errors import FlctlError

_HASH = hashes.SHA256
# Backdate validity a little so peers with slightly skewed clocks accept new certs.
_CLOCK_SKEW = datetime.timedelta(minutes=5)


class PKIError(FlctlError):
    """A key, CSR or certificate is unusable (bad signature, wrong type, unparsable)."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def load_private_key(key_pem: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise PKIError(f"cannot load private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError("private key is not an EC key")
    return key


def _load_cert(cert_pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise PKIError(f"cannot load certificate: {exc}") from exc


def _cn(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None


def _san_list(dns_names: Sequence[str], ip_addresses: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    for ip in ip_addresses:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError as exc:
            raise PKIError(f"invalid IP address for certificate: {ip!r}") from exc
    return names


def make_private_key() -> bytes:
    """A fresh P-256 key as unencrypted PKCS8 PEM (the caller stores it 0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(common_name: str, days: int = 3650) -> tuple[bytes, bytes]:
    """Self-signed project CA; path_length=0 so it can only sign leaves."""
    key_pem = make_private_key()
    key = load_private_key(key_pem)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, _HASH())
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def make_csr(key_pem: bytes, common_name: str, dns_names: Sequence[str] = (),
             ip_addresses: Sequence[str] = ()) -> bytes:
    """A CSR made on the host that owns the key, so only the CSR has to travel."""
    key = load_private_key(key_pem)
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    sans = _san_list(dns_names, ip_addresses)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, _HASH()).public_bytes(serialization.Encoding.PEM)


def sign_csr(ca_key_pem: bytes, ca_cert_pem: bytes, csr_pem: bytes, days: int = 825) -> bytes:
    """Issue a leaf for a CSR. Only CN and SANs are taken from the CSR; all other
    extensions are ours, so a crafted CSR cannot ask for CA powers."""
    ca_key = load_private_key(ca_key_pem)
    ca_cert = _load_cert(ca_cert_pem)
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise PKIError(f"cannot load CSR: {exc}") from exc
    if not csr.is_signature_valid:
        raise PKIError("CSR signature is invalid")
    common_name = _cn(csr.subject)
    if not common_name:
        raise PKIError("CSR has no common name")
    try:
        san_ext: x509.SubjectAlternativeName | None = csr.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except x509.ExtensionNotFound:
        san_ext = None

    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False  # type: ignore[arg-type]
        )
    )
    if san_ext is not None and len(san_ext) > 0:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(san_ext)), critical=False)
    return builder.sign(ca_key, _HASH()).public_bytes(serialization.Encoding.PEM)


def issue_certificate(ca_key_pem: bytes, ca_cert_pem: bytes, common_name: str,
                      dns_names: Sequence[str] = (),
                      ip_addresses: Sequence[str] = ()) -> tuple[bytes, bytes]:
    """Key + leaf in one step, for peers whose key is made on the workstation."""
    key_pem = make_private_key()
    csr_pem = make_csr(key_pem, common_name, dns_names, ip_addresses)
    return key_pem, sign_csr(ca_key_pem, ca_cert_pem, csr_pem)


def _not_after(cert: x509.Certificate) -> datetime.datetime:
    # not_valid_after_utc only exists from cryptography 42; older ones return naive UTC.
    value = getattr(cert, "not_valid_after_utc", None)
    if value is None:
        value = cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)
    return value


def certificate_info(cert_pem: bytes) -> dict[str, Any]:
    """What status/inspection code needs to show, without exposing cryptography types."""
    cert = _load_cert(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
        ip_addresses = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        dns_names, ip_addresses = [], []
    return {
        "subject_cn": _cn(cert.subject),
        "issuer_cn": _cn(cert.issuer),
        "not_after": _not_after(cert).isoformat(),
        "dns_names": dns_names,
        "ip_addresses": ip_addresses,
        "fingerprint_sha256": cert.fingerprint(hashes.SHA256()).hex(),
    }


def verify_issued_by(cert_pem: bytes, ca_cert_pem: bytes) -> bool:
    """True when the CA's key signed this cert (signature check, not full path validation)."""
    cert = _load_cert(cert_pem)
    ca_cert = _load_cert(ca_cert_pem)
    if cert.issuer != ca_cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
