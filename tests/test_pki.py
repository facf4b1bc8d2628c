"""Project PKI: CA shape, leaf roles, CSR checks, issuer verification, revocation."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from flctl.core import pki
from flctl.errors import FlctlError


@pytest.fixture(scope="module")
def ca() -> tuple[bytes, bytes]:
    return pki.make_ca("flctl test CA")


@pytest.fixture(scope="module")
def foreign_ca() -> tuple[bytes, bytes]:
    # Same CN on purpose: verification must rest on the signature, not the name.
    return pki.make_ca("flctl test CA")


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _ext(cert: x509.Certificate, cls: type):
    return cert.extensions.get_extension_for_class(cls)


def test_private_key_is_unencrypted_pkcs8_p256() -> None:
    pem = pki.make_private_key()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert pki.make_private_key() != pem


def test_ca_extensions(ca: tuple[bytes, bytes]) -> None:
    key_pem, cert_pem = ca
    cert = _cert(cert_pem)
    bc = _ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is True and bc.value.path_length == 0
    ku = _ext(cert, x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    ski = _ext(cert, x509.SubjectKeyIdentifier).value
    public = serialization.load_pem_private_key(key_pem, password=None).public_key()
    assert ski.digest == x509.SubjectKeyIdentifier.from_public_key(public).digest
    assert pki.verify_issued_by(cert_pem, cert_pem)  # self-signed
    info = pki.certificate_info(cert_pem)
    assert info["subject_cn"] == info["issuer_cn"] == "flctl test CA"


def test_leaf_sans_subject_and_validity(ca: tuple[bytes, bytes]) -> None:
    key_pem, cert_pem = pki.issue_certificate(
        *ca, "agent-7", dns_names=["agent-7.lab", "localhost"],
        ip_addresses=["198.19.0.7", "::1"],
    )
    info = pki.certificate_info(cert_pem)
    assert info["subject_cn"] == "agent-7"
    assert info["issuer_cn"] == "flctl test CA"
    assert info["dns_names"] == ["agent-7.lab", "localhost"]
    assert info["ip_addresses"] == ["198.19.0.7", "::1"]
    assert len(info["fingerprint_sha256"]) == 64
    int(info["fingerprint_sha256"], 16)
    not_after = datetime.datetime.fromisoformat(info["not_after"])
    expected = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=825)
    assert abs((not_after - expected).total_seconds()) < 120
    # The key returned is the one the certificate certifies.
    public = serialization.load_pem_private_key(key_pem, password=None).public_key()
    assert _cert(cert_pem).public_key() == public


def _usages(cert_pem: bytes) -> set:
    return set(_ext(_cert(cert_pem), x509.ExtendedKeyUsage).value)


def test_leaves_have_one_role_each(ca: tuple[bytes, bytes]) -> None:
    """The coordinator may only be a client, a host only a server: a host's
    certificate can never open a connection an agent would serve."""
    _, coordinator = pki.coordinator_certificate(*ca)
    _, host = pki.issue_certificate(*ca, "alpha", ["alpha"])
    assert _usages(coordinator) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert _usages(host) == {ExtendedKeyUsageOID.SERVER_AUTH}
    assert pki.certificate_role(coordinator) == pki.ROLE_COORDINATOR
    assert pki.certificate_role(host) == pki.ROLE_HOST
    # a client-only certificate under another name is not the coordinator
    _, impostor = pki.issue_certificate(*ca, "alpha", role=pki.ROLE_COORDINATOR)
    assert pki.certificate_role(impostor) is None
    cert = _cert(coordinator)
    assert _ext(cert, x509.BasicConstraints).value.ca is False
    ku = _ext(cert, x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign and not ku.crl_sign
    aki = _ext(cert, x509.AuthorityKeyIdentifier).value
    ca_ski = _ext(_cert(ca[1]), x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    # DER (what a TLS peer presents) reads the same
    der = cert.public_bytes(serialization.Encoding.DER)
    assert pki.certificate_role(der) == pki.ROLE_COORDINATOR


def test_serials_are_random(ca: tuple[bytes, bytes]) -> None:
    serials = {_cert(pki.issue_certificate(*ca, "x")[1]).serial_number for _ in range(3)}
    assert len(serials) == 3


def test_verify_issued_by_rejects_foreign_ca(ca, foreign_ca) -> None:
    _, cert_pem = pki.issue_certificate(*ca, "agent-1")
    assert pki.verify_issued_by(cert_pem, ca[1])
    assert not pki.verify_issued_by(cert_pem, foreign_ca[1])
    _, foreign_leaf = pki.issue_certificate(*foreign_ca, "agent-1")
    assert not pki.verify_issued_by(foreign_leaf, ca[1])


def test_csr_flow_keeps_key_local(ca: tuple[bytes, bytes]) -> None:
    host_key = pki.make_private_key()
    csr = pki.make_csr(host_key, "agent-3", ["agent-3"], ip_addresses=["198.19.0.3"])
    assert b"PRIVATE KEY" not in csr
    cert_pem = pki.sign_csr(*ca, csr, host="agent-3", dns_names=["agent-3"],
                            ip_addresses=["198.19.0.3"], days=30)
    info = pki.certificate_info(cert_pem)
    assert (info["subject_cn"], info["ip_addresses"]) == ("agent-3", ["198.19.0.3"])
    assert info["role"] == pki.ROLE_HOST
    public = serialization.load_pem_private_key(host_key, password=None).public_key()
    assert _cert(cert_pem).public_key() == public


@pytest.mark.parametrize("cn,dns,ips,complaint", [
    ("coordinator", ["coordinator"], [], "asks for the name 'coordinator'"),
    ("beta", ["beta"], ["198.19.0.3"], "asks for the name 'beta'"),
    ("alpha", ["alpha", "*.example.org"], ["198.19.0.3"], r"\*\.example\.org"),
    ("alpha", ["alpha"], ["198.19.0.3", "10.0.0.1"], "10.0.0.1"),
    ("alpha", ["coordinator"], ["198.19.0.3"], "coordinator"),
])
def test_the_ca_signs_only_what_deploy_expects(ca, cn, dns, ips, complaint) -> None:
    """A CSR for another CN or with extra SANs is refused, naming the host."""
    csr = pki.make_csr(pki.make_private_key(), cn, dns, ips)
    with pytest.raises(pki.PKIError, match=complaint) as refused:
        pki.sign_csr(*ca, csr, host="alpha", dns_names=["alpha"], ip_addresses=["198.19.0.3"])
    assert refused.value.message.startswith("alpha: ")


def test_a_csr_with_other_name_kinds_is_refused(ca) -> None:
    key = serialization.load_pem_private_key(pki.make_private_key(), password=None)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name.from_rfc4514_string("CN=alpha"))
           .add_extension(x509.SubjectAlternativeName(
               [x509.UniformResourceIdentifier("https://evil.example")]), critical=False)
           .sign(key, pki._HASH()).public_bytes(serialization.Encoding.PEM))
    with pytest.raises(pki.PKIError, match="alpha: .*UniformResourceIdentifier"):
        pki.sign_csr(*ca, csr, host="alpha", dns_names=["alpha"], ip_addresses=[])


def test_tampered_csr_is_refused(ca: tuple[bytes, bytes]) -> None:
    csr_pem = pki.make_csr(pki.make_private_key(), "agent-1")
    der = x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER)
    assert der.count(b"agent-1") == 1
    tampered_der = der.replace(b"agent-1", b"agent-9")
    tampered = x509.load_der_x509_csr(tampered_der).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(pki.PKIError, match="signature"):
        pki.sign_csr(*ca, tampered, host="agent-9", dns_names=[], ip_addresses=[])
    pki.sign_csr(*ca, csr_pem, host="agent-1", dns_names=[], ip_addresses=[])


def test_csr_cannot_request_ca_powers(ca: tuple[bytes, bytes]) -> None:
    key = serialization.load_pem_private_key(pki.make_private_key(), password=None)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name.from_rfc4514_string("CN=evil"))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, pki._HASH())
        .public_bytes(serialization.Encoding.PEM)
    )
    cert_pem = pki.sign_csr(*ca, csr, host="evil", dns_names=[], ip_addresses=[])
    cert = _cert(cert_pem)
    assert _ext(cert, x509.BasicConstraints).value.ca is False
    assert _usages(cert_pem) == {ExtendedKeyUsageOID.SERVER_AUTH}   # its own usage is ignored


def test_expiry_and_revocation(ca: tuple[bytes, bytes], foreign_ca) -> None:
    _, soon = pki.issue_certificate(*ca, "alpha", days=10)
    assert 9.9 < pki.days_left(soon) <= 10
    _, revoked = pki.issue_certificate(*ca, "beta")
    serial = pki.certificate_info(revoked)["serial"]
    crl = pki.make_crl(*ca, [serial])
    assert pki.revoked_serials(crl, ca[1]) == {serial}
    assert pki.revoked_serials(pki.make_crl(*ca, []), ca[1]) == frozenset()
    with pytest.raises(pki.PKIError, match="not signed by the project CA"):
        pki.revoked_serials(pki.make_crl(*foreign_ca, [serial]), ca[1])


def test_bad_inputs_raise_pki_error(ca: tuple[bytes, bytes]) -> None:
    assert issubclass(pki.PKIError, FlctlError)
    with pytest.raises(pki.PKIError):
        pki.make_csr(pki.make_private_key(), "x", ip_addresses=["not-an-ip"])
    with pytest.raises(pki.PKIError):
        pki.certificate_info(b"garbage")
    with pytest.raises(pki.PKIError):
        pki.sign_csr(*ca, b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                     host="x", dns_names=[], ip_addresses=[])
    with pytest.raises(pki.PKIError):
        pki.make_csr(b"not a key", "x")
