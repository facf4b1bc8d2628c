"""The workspace's certificates: what the project CA issued, what it revoked.

The CA key lives in the workspace (pki/ca.key), so issuing happens here, on
the operator's machine. This module keeps the record deploy needs to keep
trust current:

* pki/issued.json: every leaf the CA signed (serial, name, role, expiry),
  and when it was revoked, if it was;
* pki/ca.crl: the CA's revocation list, which the coordinator loads and
  deploy ships to every agent;
* the coordinator's own certificate, renewed when it has under
  pki.RENEW_BEFORE_DAYS left or predates roles;
* a rotation mark: host certificates issued before it are reissued, with
  new keys, at their next deploy (`flctl pki rotate`).
"""

from __future__ import annotations

import datetime
import json
import threading
from dataclasses import dataclass
from typing import Any

from flctl.core import pki
from flctl.core.fsutil import atomic_write, write_secret
from flctl.errors import WorkspaceError
from flctl.workspace import WorkspacePaths


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@dataclass(frozen=True)
class Reissue:
    """Why a host needs a new certificate, and whether with a new key."""

    reason: str
    new_key: bool = False


class CertificateStore:
    """Issued certificates, revocations and the CRL of one workspace.

    Deploy's host threads share one store; its lock serialises their writes.
    """

    def __init__(self, paths: WorkspacePaths) -> None:
        self.paths = paths
        self._lock = threading.Lock()
        self.ca_key = paths.ca_key.read_bytes()
        self.ca_cert = paths.ca_cert.read_bytes()
        self._record = self._load()

    # ------------------------------------------------------------ the record

    def _load(self) -> dict[str, Any]:
        try:
            record = json.loads(self.paths.issued.read_text())
        except FileNotFoundError:
            return {"certificates": [], "rotate_before": None}
        except (OSError, ValueError) as exc:
            raise WorkspaceError(f"{self.paths.issued} is unreadable ({exc}): restore it "
                                 "from a backup or remove it (revocations would be lost)") \
                from None
        if not isinstance(record, dict) or not isinstance(record.get("certificates"), list):
            raise WorkspaceError(f"{self.paths.issued} is not a certificate record")
        return record

    def _save(self) -> None:
        atomic_write(self.paths.issued, json.dumps(self._record, indent=2, sort_keys=True),
                     0o600)

    def _entry(self, serial: int) -> dict[str, Any] | None:
        wanted = format(serial, "x")
        return next((e for e in self._record["certificates"] if e.get("serial") == wanted),
                    None)

    def record(self, cert_pem: bytes) -> None:
        info = pki.certificate_info(cert_pem)
        with self._lock:
            if self._entry(info["serial"]) is None:
                self._record["certificates"].append({
                    "serial": format(info["serial"], "x"), "cn": info["subject_cn"],
                    "role": info["role"], "not_after": info["not_after"],
                    "fingerprint_sha256": info["fingerprint_sha256"],
                    "issued_at": _now().isoformat(), "revoked_at": None})
                self._save()

    def certificates(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(e) for e in self._record["certificates"]]

    def revoked(self) -> set[int]:
        with self._lock:
            return {int(e["serial"], 16) for e in self._record["certificates"]
                    if e.get("revoked_at")}

    def revoke_name(self, common_name: str, reason: str) -> list[int]:
        """Revoke every unrevoked certificate issued to `common_name`; their serials."""
        stamp = _now().isoformat()
        with self._lock:
            hits = [e for e in self._record["certificates"]
                    if e.get("cn") == common_name and not e.get("revoked_at")]
            for entry in hits:
                entry["revoked_at"], entry["revocation_reason"] = stamp, reason
            if hits:
                self._save()
        self.write_crl()
        return [int(e["serial"], 16) for e in hits]

    def request_rotation(self) -> None:
        """Host (and site) certificates issued before now are replaced, with new keys, at their
        next deploy; their current ones are revoked now (a host missed by that
        deploy is refused until it is deployed again: that is what rotating means)."""
        stamp = _now().isoformat()
        with self._lock:
            self._record["rotate_before"] = stamp
            for entry in self._record["certificates"]:
                if entry.get("role") in (pki.ROLE_HOST, pki.ROLE_SITE) \
                        and not entry.get("revoked_at"):
                    entry["revoked_at"], entry["revocation_reason"] = stamp, "rotated"
            self._save()
        self.write_crl()

    # ------------------------------------------------------------ the CRL

    def current_crl(self, *, write: bool = True) -> bytes:
        """The revocation list hosts should have; without `write` (check mode)
        nothing is written, and a missing list is made in memory only."""
        if write:
            return self.write_crl()
        if self.paths.crl.exists():
            return self.paths.crl.read_bytes()
        return pki.make_crl(self.ca_key, self.ca_cert, self.revoked())

    def write_crl(self) -> bytes:
        """The current revocation list (PEM), written to pki/ca.crl if it changed."""
        revoked = self.revoked()
        with self._lock:
            current = self.paths.crl.read_bytes() if self.paths.crl.exists() else None
            if current is not None:
                try:
                    if pki.revoked_serials(current, self.ca_cert) == revoked:
                        return current
                except pki.PKIError:
                    pass  # another CA's list (init --force), or damaged: write ours
            crl = pki.make_crl(self.ca_key, self.ca_cert, revoked)
            atomic_write(self.paths.crl, crl)
            return crl

    # ------------------------------------------------------------ the coordinator

    def coordinator_reason(self) -> str | None:
        """Why the coordinator's certificate must be reissued, or None."""
        path = self.paths.coordinator_cert
        if not path.exists() or not self.paths.coordinator_key.exists():
            return "missing"
        cert = path.read_bytes()
        if not pki.verify_issued_by(cert, self.ca_cert):
            return "issued by another CA"
        if pki.certificate_role(cert) != pki.ROLE_COORDINATOR:
            return "made before certificate roles (client and server use)"
        if pki.certificate_info(cert)["serial"] in self.revoked():
            return "revoked"
        left = pki.days_left(cert)
        if left < pki.RENEW_BEFORE_DAYS:
            return f"expires in {max(left, 0):.0f} days" if left > 0 else "expired"
        return None

    def renew_coordinator(self, *, revoke_old: bool = False) -> None:
        """A new coordinator key and certificate (the old one revoked if asked)."""
        if revoke_old and self.paths.coordinator_cert.exists():
            old = pki.certificate_info(self.paths.coordinator_cert.read_bytes())["serial"]
            with self._lock:
                entry = self._entry(old)
                if entry is not None and not entry.get("revoked_at"):
                    entry["revoked_at"], entry["revocation_reason"] = _now().isoformat(), \
                        "rotated"
                    self._save()
                elif entry is None:
                    self._record["certificates"].append({
                        "serial": format(old, "x"), "cn": pki.COORDINATOR_CN, "role": None,
                        "revoked_at": _now().isoformat(), "revocation_reason": "rotated"})
                    self._save()
            self.write_crl()
        key, cert = pki.coordinator_certificate(self.ca_key, self.ca_cert)
        write_secret(self.paths.coordinator_key, key)
        atomic_write(self.paths.coordinator_cert, cert)
        self.record(cert)

    # ------------------------------------------------------------ hosts

    def host_reissue(self, host: str, cert_pem: str | None, key_exists: bool,
                     dns_names: list[str], ip_addresses: list[str]) -> Reissue | None:
        """Why `host` needs a new certificate (from what the host has), or None."""
        if not key_exists:
            return Reissue("no key yet")
        if not cert_pem:
            return Reissue("no certificate yet")
        cert = cert_pem.encode()
        try:
            info = pki.certificate_info(cert)
        except pki.PKIError:
            return Reissue("its certificate is unreadable")
        if not pki.verify_issued_by(cert, self.ca_cert):
            return Reissue("issued by another CA")
        if info["serial"] in self.revoked():
            return Reissue("revoked", new_key=True)
        rotate_before = self._record.get("rotate_before")
        if rotate_before and self._issued_before(cert, rotate_before):
            return Reissue("rotation requested", new_key=True)
        if info["role"] != pki.ROLE_HOST:
            return Reissue("made before certificate roles (client and server use)")
        if info["subject_cn"] != host or sorted(info["dns_names"]) != sorted(dns_names) \
                or sorted(info["ip_addresses"]) != sorted(ip_addresses):
            return Reissue("names changed")
        left = pki.days_left(cert)
        if left < pki.RENEW_BEFORE_DAYS:
            return Reissue(f"expires in {max(left, 0):.0f} days" if left > 0 else "expired")
        return None

    def site_reissue(self, host: str, site: str, cert_pem: bytes | None,
                     key_exists: bool) -> Reissue | None:
        """Why `site`'s aggregator `host` needs a new site certificate, or None."""
        if not key_exists or not cert_pem:
            return Reissue("none yet")
        try:
            info = pki.certificate_info(cert_pem)
        except pki.PKIError:
            return Reissue("its site certificate is unreadable")
        if not pki.verify_issued_by(cert_pem, self.ca_cert):
            return Reissue("issued by another CA")
        if info["serial"] in self.revoked():
            return Reissue("revoked", new_key=True)
        rotate_before = self._record.get("rotate_before")
        if rotate_before and self._issued_before(cert_pem, rotate_before):
            return Reissue("rotation requested", new_key=True)
        if pki.site_identity(cert_pem) != (site, host):
            return Reissue("its site changed")
        left = pki.days_left(cert_pem)
        if left < pki.RENEW_BEFORE_DAYS:
            return Reissue(f"expires in {max(left, 0):.0f} days" if left > 0 else "expired")
        return None

    def issue_site(self, host: str, site: str) -> tuple[bytes, bytes]:
        """Key and site certificate for a local aggregator (this machine uses the key)."""
        key, cert = pki.site_certificate(self.ca_key, self.ca_cert, host, site)
        self.record(cert)
        return key, cert

    def sign_site(self, host: str, site: str, csr_pem: bytes) -> bytes:
        """The site certificate for a CSR made on the aggregator host (SSH hosts)."""
        cert = pki.sign_site_csr(self.ca_key, self.ca_cert, csr_pem, host=host, site=site)
        self.record(cert)
        return cert

    @staticmethod
    def _issued_before(cert: bytes, stamp: str) -> bool:
        try:
            mark = datetime.datetime.fromisoformat(stamp)
        except ValueError:
            return False
        issued = pki.not_before(cert)
        # not_before is backdated by the clock-skew allowance: compare past it
        return issued + pki.CLOCK_SKEW < mark

    def sign_host(self, host: str, csr_pem: bytes, dns_names: list[str],
                  ip_addresses: list[str]) -> bytes:
        cert = pki.sign_csr(self.ca_key, self.ca_cert, csr_pem, host=host,
                            dns_names=dns_names, ip_addresses=ip_addresses)
        self.record(cert)
        return cert
