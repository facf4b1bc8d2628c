"""The site contract: the site certificate role (flctl.core.pki) and the site
fields of an agent's config (flctl.core.agentconfig)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from flctl.core import pki
from flctl.core.agentconfig import AgentConfig, parse_agent_config, render_agent_config
from flctl.errors import ConfigError


@pytest.fixture(scope="module")
def ca() -> tuple[bytes, bytes]:
    return pki.make_ca("flctl test CA")


def test_site_certificate_names_its_site_and_host(ca) -> None:
    key, cert = pki.site_certificate(*ca, "b2", "berlin")
    assert pki.certificate_role(cert) == pki.ROLE_SITE
    assert pki.site_identity(cert) == ("berlin", "b2")
    parsed = x509.load_pem_x509_certificate(cert)
    usage = parsed.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert pki.verify_issued_by(cert, ca[1])
    assert pki.certificate_info(cert)["site"] == "berlin"
    # DER, as a TLS peer presents it
    der = parsed.public_bytes(pki.serialization.Encoding.DER)
    assert pki.site_identity(der) == ("berlin", "b2")


def test_other_roles_have_no_site_and_coordinator_stays_unique(ca) -> None:
    _, coordinator = pki.coordinator_certificate(*ca)
    _, host = pki.issue_certificate(*ca, "b2", ["b2"])
    assert pki.site_identity(coordinator) is None and pki.site_identity(host) is None
    assert pki.certificate_role(coordinator) == pki.ROLE_COORDINATOR
    with pytest.raises(pki.PKIError, match="cannot be named 'coordinator'"):
        pki.site_certificate(*ca, "coordinator", "berlin")
    with pytest.raises(pki.PKIError, match="needs a site name"):
        pki.site_certificate(*ca, "b2", "no spaces")
    with pytest.raises(pki.PKIError, match="only a site certificate names a site"):
        pki.issue_certificate(*ca, "b2", site="berlin")


def test_sign_site_csr_takes_only_the_key(ca) -> None:
    key = pki.make_private_key()
    csr = pki.make_csr(key, "b2", ["evil.example.org"], ["10.0.0.1"])
    cert = pki.sign_site_csr(*ca, csr, host="b2", site="berlin")
    assert pki.site_identity(cert) == ("berlin", "b2")
    info = pki.certificate_info(cert)
    assert info["dns_names"] == [] and info["ip_addresses"] == []
    with pytest.raises(pki.PKIError, match="asks for the name 'coordinator', not 'b2'"):
        pki.sign_site_csr(*ca, pki.make_csr(key, "coordinator"), host="b2", site="berlin")


def _config(**fields) -> AgentConfig:
    base = AgentConfig(name="b2", project="p", bind_address="127.0.0.1", port=7443,
                       ca_cert="/c", cert="/d", key="/k", data_path="/data.npz", state_file="/s")
    return replace(base, **fields)


def test_site_fields_round_trip_and_old_configs_parse() -> None:
    member = _config(name="b1", site="berlin", site_aggregator="b2")
    aggregator = _config(site="berlin", site_aggregator="b2",
                         site_members={"b1": "127.0.0.1:7001", "b2": "127.0.0.1:7443"},
                         site_cert="/site.crt", site_key="/site.key")
    for config in (member, aggregator):
        assert parse_agent_config(render_agent_config(config), "agent.json") == config
    old = json.loads(render_agent_config(_config()))
    for name in ("site", "site_aggregator", "site_members", "site_cert", "site_key"):
        del old[name]
    assert parse_agent_config(json.dumps(old), "agent.json") == _config()


@pytest.mark.parametrize("fields,field,message", [
    ({"site": "berlin"}, "site_aggregator", "set together"),
    ({"site": "berlin", "site_aggregator": "b2", "site_members": {"b2": "127.0.0.1"}},
     "site_members", "ADDRESS:PORT"),
    ({"site": "berlin", "site_aggregator": "b2", "site_members": ["b2"]},
     "site_members", "expected an object"),
    ({"site": "berlin", "site_aggregator": "b2", "site_members": {"b2": "127.0.0.1:1"}},
     "site_cert", "certificate and key"),
    ({"site": "berlin", "site_aggregator": "b9", "site_members": {"b2": "127.0.0.1:1"},
      "site_cert": "/c", "site_key": "/k"}, "site_members", "only the site's aggregator"),
    ({"site": "berlin", "site_aggregator": "b2", "site_members": {"b1": "127.0.0.1:1"},
      "site_cert": "/c", "site_key": "/k"}, "site_members", "must list itself"),
    ({"site": 3, "site_aggregator": "b2"}, "site", "expected a string"),
])
def test_site_fields_are_checked(fields, field, message) -> None:
    document = json.loads(render_agent_config(_config()))
    document.update(fields)
    with pytest.raises(ConfigError, match=message) as info:
        parse_agent_config(json.dumps(document), "agent.json")
    assert info.value.field == field and "agent.json" in info.value.message
