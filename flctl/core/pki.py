"""Project CA and certificates for mutual TLS between coordinator and agents.

Three roles, told apart by what a certificate may be used for:

* the coordinator: CN `coordinator`, extended key usage *client auth only*.
  It may send an agent anything (TLS checks the usage at the handshake; the
  agent checks the role again before it reads a request).
* hosts: CN and SANs = the host's inventory name and addresses, *server
  auth only*, so a host certificate can never open a connection an agent
  would accept, whoever holds its key. Hosts also sign their
  secure-aggregation keys with it.
* site aggregators: CN = the aggregator host's name, *client auth only*,
  and one SAN URI `flctl-site:<site>` naming its site (flctl.core.sites).
  An agent serves it only `fit` (and what resuming a fit's transfer needs),
  and only when the site and host are the ones its own config names: an
  aggregator commands its own members and no one else. Its key is a second
  one made on the aggregator host, apart from that host's server key.

The CA signs a host's CSR only for the exact name and addresses deploy
expects for that host. Revocation is a CRL signed by the CA, loaded by the
coordinator and every agent. Keys are generated where they are used (the
CSR flow) so private keys never travel. ECDSA P-256 keeps handshakes cheap
on hundreds of hosts. Everything is PEM bytes so the callers decide where
(and with which permissions) things are written.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flctl.errors import FlctlError

_HASH = hashes.SHA256
# Backdate validity a little so peers with slightly skewed clocks accept new certs.
CLOCK_SKEW = datetime.timedelta(minutes=5)

COORDINATOR_CN = "coordinator"
ROLE_COORDINATOR = "coordinator"
ROLE_HOST = "host"
ROLE_SITE = "site"
SITE_URI_PREFIX = "flctl-site:"
LEAF_DAYS = 825                 # what browsers accept for a leaf; deploy renews long before
RENEW_BEFORE_DAYS = 30          # deploy reissues a leaf with less validity left than this
_ROLE_USAGE = {ROLE_COORDINATOR: ExtendedKeyUsageOID.CLIENT_AUTH,
               ROLE_HOST: ExtendedKeyUsageOID.SERVER_AUTH,
               ROLE_SITE: ExtendedKeyUsageOID.CLIENT_AUTH}
# What a site name may be (inventory group names are stricter still), so the
# URI we write reads back as the same name.
_SITE_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,63}\Z")


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


def _load_cert(cert: bytes) -> x509.Certificate:
    """A certificate from PEM, or from DER (what a TLS peer presents)."""
    try:
        if cert.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(cert)
        return x509.load_der_x509_certificate(cert)
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
        .not_valid_before(now - CLOCK_SKEW)
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


def _site_uri(site: str | None, common_name: str, role: str) -> list[x509.GeneralName]:
    """The SAN naming a site certificate's site; checks the role/site pairing."""
    if role != ROLE_SITE:
        if site is not None:
            raise PKIError(f"only a site certificate names a site, not a {role} certificate")
        return []
    if site is None or not _SITE_NAME_RE.match(site):
        raise PKIError(f"a site certificate needs a site name (letters, digits, '_', '.', '-'), "
                       f"got {site!r}")
    if common_name == COORDINATOR_CN:
        raise PKIError(f"a site aggregator cannot be named {COORDINATOR_CN!r}")
    return [x509.UniformResourceIdentifier(SITE_URI_PREFIX + site)]


def _leaf(ca_key_pem: bytes, ca_cert_pem: bytes, public_key: Any, common_name: str,
          dns_names: Sequence[str], ip_addresses: Sequence[str], role: str,
          days: float, site: str | None = None) -> bytes:
    """Issue a leaf of `role`: every field is ours, none is copied from a request."""
    if role not in _ROLE_USAGE:
        raise PKIError(f"unknown certificate role {role!r}")
    site_names = _site_uri(site, common_name, role)
    ca_key = load_private_key(ca_key_pem)
    ca_cert = _load_cert(ca_cert_pem)
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
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
        .add_extension(x509.ExtendedKeyUsage([_ROLE_USAGE[role]]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    sans = _san_list(dns_names, ip_addresses) + site_names
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, _HASH()).public_bytes(serialization.Encoding.PEM)


def _csr_names(csr: x509.CertificateSigningRequest) -> tuple[set[str], set[str]]:
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set(), set()
    others = [n for n in san if not isinstance(n, (x509.DNSName, x509.IPAddress))]
    if others:
        raise PKIError(f"asks for names of another kind ({type(others[0]).__name__})")
    return ({str(n) for n in san.get_values_for_type(x509.DNSName)},
            {str(ip) for ip in san.get_values_for_type(x509.IPAddress)})


def _csr_of(host: str, csr_pem: bytes, what: str) -> x509.CertificateSigningRequest:
    """`host`'s CSR, loaded, its signature valid and its CN `host`, or PKIError."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise PKIError(f"{host}: cannot load its {what}: {exc}") from exc
    if not csr.is_signature_valid:
        raise PKIError(f"{host}: its {what}'s signature is invalid")
    common_name = _cn(csr.subject)
    if common_name != host:
        raise PKIError(f"{host}: its {what} asks for the name {common_name!r}, not {host!r}; "
                       "refusing to sign it")
    return csr


def sign_csr(ca_key_pem: bytes, ca_cert_pem: bytes, csr_pem: bytes, *, host: str,
             dns_names: Sequence[str], ip_addresses: Sequence[str],
             days: float = LEAF_DAYS) -> bytes:
    """Issue `host`'s certificate for a CSR made on that host.

    The CSR must ask for exactly the name and addresses deploy expects for
    this host: another CN (`coordinator`, another host) or an extra SAN
    (`*.example.org`) is refused, naming the host. Only its public key is
    taken; the issued certificate is a host's (server auth only).
    """
    csr = _csr_of(host, csr_pem, "CSR")
    try:
        dns, ips = _csr_names(csr)
    except PKIError as exc:
        raise PKIError(f"{host}: its CSR {exc.message}; refusing to sign it") from None
    want_ips = {str(ipaddress.ip_address(ip)) for ip in ip_addresses}
    extra = sorted((dns - set(dns_names)) | (ips - want_ips))
    if extra:
        raise PKIError(f"{host}: its CSR asks for names deploy does not expect for it "
                       f"({', '.join(extra)}); refusing to sign it")
    return _leaf(ca_key_pem, ca_cert_pem, csr.public_key(), host, list(dns_names),
                 sorted(want_ips), ROLE_HOST, days)


def sign_site_csr(ca_key_pem: bytes, ca_cert_pem: bytes, csr_pem: bytes, *, host: str,
                  site: str, days: float = LEAF_DAYS) -> bytes:
    """Issue the site certificate of `site`'s aggregator `host` for a CSR made
    on that host. The CSR must ask for the CN `host`; only its public key is
    taken: the site, the usage (client auth only) and every other field are ours."""
    csr = _csr_of(host, csr_pem, "site CSR")
    return _leaf(ca_key_pem, ca_cert_pem, csr.public_key(), host, [], [], ROLE_SITE, days,
                 site=site)


def issue_certificate(ca_key_pem: bytes, ca_cert_pem: bytes, common_name: str,
                      dns_names: Sequence[str] = (), ip_addresses: Sequence[str] = (), *,
                      role: str = ROLE_HOST, days: float = LEAF_DAYS,
                      site: str | None = None) -> tuple[bytes, bytes]:
    """Key + leaf in one step, for peers whose key is made on this machine (the
    coordinator; local hosts, site certificates of local aggregators included)."""
    key_pem = make_private_key()
    public_key = load_private_key(key_pem).public_key()
    return key_pem, _leaf(ca_key_pem, ca_cert_pem, public_key, common_name, dns_names,
                          ip_addresses, role, days, site=site)


def site_certificate(ca_key_pem: bytes, ca_cert_pem: bytes, host: str, site: str,
                     days: float = LEAF_DAYS) -> tuple[bytes, bytes]:
    """Key and site certificate for a local aggregator (this machine uses the key)."""
    return issue_certificate(ca_key_pem, ca_cert_pem, host, role=ROLE_SITE, days=days,
                             site=site)


def coordinator_certificate(ca_key_pem: bytes, ca_cert_pem: bytes,
                            days: float = LEAF_DAYS) -> tuple[bytes, bytes]:
    """The coordinator's key and certificate: the one client identity agents serve."""
    return issue_certificate(ca_key_pem, ca_cert_pem, COORDINATOR_CN, [COORDINATOR_CN],
                             role=ROLE_COORDINATOR, days=days)


def _not_after(cert: x509.Certificate) -> datetime.datetime:
    # not_valid_after_utc only exists from cryptography 42; older ones return naive UTC.
    value = getattr(cert, "not_valid_after_utc", None)
    if value is None:
        value = cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)
    return value


def _site_uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)
            if str(u).startswith(SITE_URI_PREFIX)]


def _site_of(parsed: x509.Certificate) -> tuple[str, str] | None:
    """(site, host) of a well-formed site certificate, else None."""
    uris = _site_uris(parsed)
    host = _cn(parsed.subject)
    if len(uris) != 1 or not host or host == COORDINATOR_CN:
        return None
    site = uris[0][len(SITE_URI_PREFIX):]
    return (site, host) if _SITE_NAME_RE.match(site) else None


def certificate_role(cert: bytes) -> str | None:
    """ROLE_COORDINATOR, ROLE_HOST, ROLE_SITE, or None for anything else (a
    certificate from before roles, which allowed both usages, is neither)."""
    parsed = _load_cert(cert)
    try:
        usage = set(parsed.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return None
    if usage == {ExtendedKeyUsageOID.CLIENT_AUTH}:
        if _site_uris(parsed):
            return ROLE_SITE if _site_of(parsed) else None
        if _cn(parsed.subject) == COORDINATOR_CN:
            return ROLE_COORDINATOR
        return None
    if usage == {ExtendedKeyUsageOID.SERVER_AUTH}:
        return ROLE_HOST
    return None


def site_identity(cert: bytes) -> tuple[str, str] | None:
    """(site, aggregator host) of a site certificate (PEM or DER), None for any
    other certificate."""
    parsed = _load_cert(cert)
    if certificate_role(cert) != ROLE_SITE:
        return None
    return _site_of(parsed)


def not_before(cert: bytes) -> datetime.datetime:
    """When the certificate became valid (issuing time minus CLOCK_SKEW)."""
    parsed = _load_cert(cert)
    value = getattr(parsed, "not_valid_before_utc", None)
    if value is None:
        value = parsed.not_valid_before.replace(tzinfo=datetime.timezone.utc)
    return value


def days_left(cert: bytes, now: datetime.datetime | None = None) -> float:
    """Days until the certificate expires (negative once it has)."""
    return (_not_after(_load_cert(cert)) - (now or _now())).total_seconds() / 86400


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
        "serial": cert.serial_number,
        "not_after": _not_after(cert).isoformat(),
        "dns_names": dns_names,
        "ip_addresses": ip_addresses,
        "role": certificate_role(cert_pem),
        "site": (site_identity(cert_pem) or (None,))[0],
        "fingerprint_sha256": cert.fingerprint(hashes.SHA256()).hex(),
    }


# ------------------------------------------------------------------ revocation


def make_crl(ca_key_pem: bytes, ca_cert_pem: bytes, serials: Iterable[int]) -> bytes:
    """The CA's revocation list (PEM). It is valid as long as the CA: OpenSSL
    refuses every peer once a loaded CRL is past its next update, and flctl
    reissues the list whenever it changes rather than on a schedule."""
    ca_key = load_private_key(ca_key_pem)
    ca_cert = _load_cert(ca_cert_pem)
    now = _now()
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(ca_cert.subject)
               .last_update(now - CLOCK_SKEW)
               .next_update(_not_after(ca_cert)))
    for serial in sorted(set(serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
    return builder.sign(ca_key, _HASH()).public_bytes(serialization.Encoding.PEM)


def revoked_serials(crl_pem: bytes, ca_cert_pem: bytes) -> frozenset[int]:
    """The serials a CRL revokes, once its signature is the CA's."""
    try:
        crl = x509.load_pem_x509_crl(crl_pem)
    except ValueError as exc:
        raise PKIError(f"cannot load the revocation list: {exc}") from exc
    ca_cert = _load_cert(ca_cert_pem)
    public_key = ca_cert.public_key()
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(public_key):  # type: ignore[arg-type]
        raise PKIError("the revocation list is not signed by the project CA")
    return frozenset(entry.serial_number for entry in crl)


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
