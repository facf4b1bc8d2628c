"""Overlay and firewall as text: the WireGuard configs and the nftables
ruleset against golden files (regenerate with FLCTL_UPDATE_GOLDEN=1), their
parsers on captured output, and nft's own verdict on the ruleset."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from flctl.core.facts import (
    normalise_nft_listing,
    parse_nft_counter,
    parse_wg_dump,
    parse_wg_quick_config,
)
from flctl.core.renderers import (
    SitePeer,
    WgPeer,
    interface_name,
    is_wg_key,
    render_nft_ruleset,
    render_wg_config,
    render_wg_sync_config,
    site_wg_peers,
)

GOLDEN = Path(__file__).parent / "golden"

HUB_KEY = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="
ALPHA_KEY = "CAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAg="
BETA_KEY = "Dw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8PDw8="
SECRET_A = "FhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhY="
SECRET_B = "HR0dHR0dHR0dHR0dHR0dHR0dHR0dHR0dHR0dHR0dHR0="


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("FLCTL_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text()


def host_config() -> str:
    hub = WgPeer(public_key=HUB_KEY, allowed_ips=("198.19.0.1/32",),
                 preshared_key_file="/var/lib/flctl/demo/wg/hub.psk",
                 endpoint="198.18.0.1:51820", keepalive=25, comment="hub")
    return render_wg_config(address="198.19.0.11/24", listen_port=51820,
                            private_key_file="/var/lib/flctl/demo/wg/private.key",
                            peers=[hub], comment="flctl overlay of demo (host alpha)")


def hub_config(peers: list[WgPeer] | None = None) -> str:
    if peers is None:
        peers = [
            WgPeer(public_key=BETA_KEY, allowed_ips=("198.19.0.12/32",),
                   preshared_key_file="/root/.flctl/wg/psk/beta.psk", comment="beta"),
            WgPeer(public_key=ALPHA_KEY, allowed_ips=("198.19.0.11/32",),
                   preshared_key_file="/root/.flctl/wg/psk/alpha.psk", comment="alpha"),
        ]
    return render_wg_config(address="198.19.0.1/24", listen_port=51820,
                            private_key_file="/root/.flctl/wg/private.key", peers=peers,
                            comment="flctl overlay of demo (hub)")


def test_host_wg_config_golden() -> None:
    check_golden("wg-host.conf", host_config())


def test_hub_wg_config_golden() -> None:
    check_golden("wg-hub.conf", hub_config())


# A site {alpha, beta, gamma} whose aggregator is beta: beta lists alpha and
# gamma beside the hub, alpha (and gamma) list beta.
GAMMA_KEY = "KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio="
SITE = {"alpha": SitePeer("alpha", ALPHA_KEY, "198.19.0.11", "198.18.0.11:51820"),
        "beta": SitePeer("beta", BETA_KEY, "198.19.0.12", "198.18.0.12:51820"),
        "gamma": SitePeer("gamma", GAMMA_KEY, "198.19.0.13", "198.18.0.13:51820")}
HUB_PEER = WgPeer(public_key=HUB_KEY, allowed_ips=("198.19.0.1/32",),
                  preshared_key_file="/var/lib/flctl/demo/wg/hub.psk",
                  endpoint="198.18.0.1:51820", keepalive=25, comment="hub")


def site_host_config(me: str, peers: list[str]) -> str:
    return render_wg_config(address=f"{SITE[me].overlay_ip}/24", listen_port=51820,
                            private_key_file="/var/lib/flctl/demo/wg/private.key",
                            peers=[HUB_PEER, *site_wg_peers([SITE[p] for p in peers])],
                            comment=f"flctl overlay of demo (host {me})")


def test_site_wg_configs_golden() -> None:
    check_golden("wg-host-site-aggregator.conf", site_host_config("beta", ["gamma", "alpha"]))
    check_golden("wg-host-site-member.conf", site_host_config("alpha", ["beta"]))


def test_site_peers_reach_only_their_own_address_at_their_underlay() -> None:
    parsed = parse_wg_quick_config(site_host_config("beta", ["gamma", "alpha"])).peers
    assert [(p["public_key"], p["allowed_ips"], p["endpoint"], p["keepalive"]) for p in parsed] \
        == [(HUB_KEY, ["198.19.0.1/32"], "198.18.0.1:51820", 25),
            (ALPHA_KEY, ["198.19.0.11/32"], "198.18.0.11:51820", None),
            (GAMMA_KEY, ["198.19.0.13/32"], "198.18.0.13:51820", None)]
    # no PSK file for a site pair: only the hub's is loaded
    assert parse_wg_quick_config(site_host_config("beta", ["alpha"])).preshared_key_files == \
        {HUB_KEY: "/var/lib/flctl/demo/wg/hub.psk"}
    with pytest.raises(ValueError):
        site_wg_peers([SitePeer("x", ALPHA_KEY, "not-an-ip", "198.18.0.11:51820")])


def test_wg_config_holds_no_secret_and_no_saveconfig() -> None:
    for text in (host_config(), hub_config()):
        keys = {line.split("=", 1)[0].strip().lower() for line in text.splitlines()
                if "=" in line and not line.startswith("#")}
        assert "privatekey" not in keys and "presharedkey" not in keys
        assert "saveconfig" not in keys
        assert "PostUp = wg set %i private-key /" in text


def test_hub_peers_sorted_whatever_the_input_order() -> None:
    text = hub_config()
    assert text.index(ALPHA_KEY + "\n") < text.index(BETA_KEY + "\n")
    reversed_peers = parse_wg_quick_config(text).peers
    assert [p["public_key"] for p in reversed_peers] == [ALPHA_KEY, BETA_KEY]
    # hub side: no endpoint, no keepalive (hosts dial in and keep the path open)
    assert all(p["endpoint"] is None and p["keepalive"] is None for p in reversed_peers)


def test_wg_config_parses_back_to_what_was_rendered() -> None:
    parsed = parse_wg_quick_config(host_config())
    assert parsed.addresses == ("198.19.0.11/24",)
    assert parsed.listen_port == 51820
    assert parsed.private_key_file == "/var/lib/flctl/demo/wg/private.key"
    assert parsed.preshared_key_files == {HUB_KEY: "/var/lib/flctl/demo/wg/hub.psk"}
    assert parsed.peers == ({"public_key": HUB_KEY, "allowed_ips": ["198.19.0.1/32"],
                             "endpoint": "198.18.0.1:51820", "keepalive": 25},)


def test_key_paths_are_quoted_for_wg_quicks_shell() -> None:
    text = render_wg_config(address="198.19.0.2/24", listen_port=None,
                            private_key_file="/keys/my key", peers=[])
    assert "PostUp = wg set %i private-key '/keys/my key'" in text
    assert "ListenPort" not in text
    assert parse_wg_quick_config(text).private_key_file == "/keys/my key"


@pytest.mark.parametrize("bad", ["relative/key", "/a#b", "/a%i", "/a\nb"])
def test_unsafe_key_paths_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        render_wg_config(address="198.19.0.2/24", listen_port=None, private_key_file=bad, peers=[])


@pytest.mark.parametrize("peer", [
    WgPeer(public_key="not-a-key", allowed_ips=("198.19.0.1/32",)),
    WgPeer(public_key=HUB_KEY, allowed_ips=()),
    WgPeer(public_key=HUB_KEY, allowed_ips=("198.19.0.1/32",), endpoint="198.18.0.1"),
    WgPeer(public_key=HUB_KEY, allowed_ips=("198.19.0.1/32",), keepalive=0),
])
def test_bad_peers_are_refused(peer: WgPeer) -> None:
    with pytest.raises(ValueError):
        render_wg_config(address="198.19.0.2/24", listen_port=51820,
                         private_key_file="/k", peers=[peer])


def test_duplicate_peer_keys_are_refused() -> None:
    twice = [WgPeer(public_key=ALPHA_KEY, allowed_ips=("198.19.0.11/32",), comment=name)
             for name in ("a", "b")]
    with pytest.raises(ValueError, match="same public key"):
        hub_config(twice)


@pytest.mark.parametrize(("project", "expected"), [
    ("demo", "fl-demo"),
    ("federation-of-hospitals", "fl-federation-o"),
    ("my proj/x", "fl-my-proj-x"),
    ("", "fl-x"),
])
def test_interface_name(project: str, expected: str) -> None:
    name = interface_name(project)
    assert name == expected
    assert len(name) <= 15 and "/" not in name and " " not in name
    assert interface_name(project) == name      # stable


def test_sync_config_adds_secrets_and_keeps_the_port() -> None:
    stripped = ("[Interface]\n\n[Peer]\nPublicKey = " + ALPHA_KEY +
                "\nAllowedIPs = 198.19.0.11/32\n\n[Peer]\npublickey = " + BETA_KEY +
                "\nAllowedIPs = 198.19.0.12/32\n")
    text = render_wg_sync_config(stripped, private_key=SECRET_A,
                                 preshared_keys={ALPHA_KEY: SECRET_B}, listen_port=40000)
    lines = text.splitlines()
    assert lines[:3] == ["[Interface]", f"PrivateKey = {SECRET_A}", "ListenPort = 40000"]
    alpha = lines.index(f"PublicKey = {ALPHA_KEY}")
    assert lines[alpha + 1] == f"PresharedKey = {SECRET_B}"
    assert text.count("PresharedKey") == 1      # beta has no PSK file: none invented
    with_port = render_wg_sync_config("[Interface]\nListenPort = 51820\n", private_key=SECRET_A,
                                      preshared_keys={}, listen_port=40000)
    assert "ListenPort = 40000" not in with_port and "ListenPort = 51820" in with_port


def test_is_wg_key() -> None:
    assert is_wg_key(HUB_KEY)
    assert not is_wg_key(HUB_KEY[:-2] + "==")
    assert not is_wg_key(HUB_KEY + "\n")


# ------------------------------------------------------------------ wg show dump

# Captured from `wg show fl-test dump` (keys replaced): interface line, one
# peer with a handshake, one that never handshook.
WG_DUMP = (
    f"{SECRET_A}\t{HUB_KEY}\t51820\toff\n"
    f"{ALPHA_KEY}\t{SECRET_B}\t198.18.0.11:51820\t198.19.0.11/32\t1795827044\t348\t584\t25\n"
    f"{BETA_KEY}\t(none)\t(none)\t198.19.0.12/32,198.19.1.0/24\t0\t0\t0\toff\n"
)


def test_parse_wg_dump() -> None:
    parsed = parse_wg_dump(WG_DUMP)
    assert parsed["interface"] == {"public_key": HUB_KEY, "listen_port": 51820, "fwmark": None}
    alpha, beta = parsed["peers"]
    assert alpha == {"public_key": ALPHA_KEY, "preshared_key": True,
                     "endpoint": "198.18.0.11:51820", "allowed_ips": ["198.19.0.11/32"],
                     "latest_handshake": 1795827044, "rx_bytes": 348, "tx_bytes": 584,
                     "keepalive": 25}
    assert beta["endpoint"] is None and beta["latest_handshake"] == 0
    assert beta["keepalive"] is None and beta["preshared_key"] is False
    assert beta["allowed_ips"] == ["198.19.0.12/32", "198.19.1.0/24"]


def test_parse_wg_dump_never_returns_secrets() -> None:
    assert SECRET_A not in repr(parse_wg_dump(WG_DUMP))
    assert SECRET_B not in repr(parse_wg_dump(WG_DUMP))


def test_parse_wg_dump_refuses_foreign_text() -> None:
    with pytest.raises(ValueError):
        parse_wg_dump("interface: fl-test\n  listening port: 51820\n")


# ------------------------------------------------------------------ nftables

RULESET_ARGS = {"interface": "fl-demo", "hub_overlay_ip": "198.19.0.1", "agent_port": 7443,
                "wg_port": 51820}


def rule_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_nft_ruleset_golden() -> None:
    check_golden("flctl.nft", render_nft_ruleset(**RULESET_ARGS))


def test_nft_ruleset_touches_only_its_own_table() -> None:
    lines = rule_lines(render_nft_ruleset(**RULESET_ARGS))
    assert "flush ruleset" not in "\n".join(lines)
    tables = [line for line in lines if line.startswith(("table", "delete", "flush", "add"))]
    assert tables == ["table inet flctl {}", "delete table inet flctl", "table inet flctl {"]


def test_nft_rules_in_order_ssh_first_agent_last() -> None:
    lines = rule_lines(render_nft_ruleset(**RULESET_ARGS, ssh_port=2222))
    start = lines.index("type filter hook input priority filter; policy accept;") + 1
    assert lines[start:start + 5] == [
        "tcp dport 2222 accept",
        "ct state established,related accept",
        "udp dport 51820 accept",
        'iifname "fl-demo" ip saddr 198.19.0.1 tcp dport 7443 accept',
        'tcp dport 7443 counter name "agent_dropped" drop',
    ]


def test_nft_site_member_ruleset_golden() -> None:
    check_golden("flctl-site-member.nft",
                 render_nft_ruleset(**RULESET_ARGS, site_aggregator_ip="198.19.0.12"))


def test_nft_site_member_admits_its_aggregator_then_drops_the_rest() -> None:
    lines = rule_lines(render_nft_ruleset(**RULESET_ARGS, site_aggregator_ip="198.19.0.12"))
    start = lines.index("type filter hook input priority filter; policy accept;") + 1
    assert lines[start:start + 6] == [
        "tcp dport 22 accept",
        "ct state established,related accept",
        "udp dport 51820 accept",
        'iifname "fl-demo" ip saddr 198.19.0.1 tcp dport 7443 accept',
        'iifname "fl-demo" ip saddr 198.19.0.12 tcp dport 7443 accept',
        'tcp dport 7443 counter name "agent_dropped" drop',
    ]
    # a loose host: the hub only
    assert "198.19.0.12" not in render_nft_ruleset(**RULESET_ARGS)


def test_nft_site_aggregator_admits_itself_through_loopback_only() -> None:
    text = render_nft_ruleset(**RULESET_ARGS, aggregator_self_ip="198.19.0.12")
    check_golden("flctl-site-aggregator.nft", text)
    lines = rule_lines(text)
    assert 'iifname "lo" ip daddr 198.19.0.12 tcp dport 7443 accept' in lines
    assert not any("saddr 198.19.0.1" in line and "198.19.0.12" in line for line in lines)
    assert lines.index('iifname "lo" ip daddr 198.19.0.12 tcp dport 7443 accept') < \
        lines.index('tcp dport 7443 counter name "agent_dropped" drop')


@pytest.mark.parametrize("override", [
    {"site_aggregator_ip": "198.19.0.1"},                      # the hub itself
    {"site_aggregator_ip": "fd00::12"},                        # another family
    {"site_aggregator_ip": "198.19.0.12", "interface": None},  # not through a tunnel
    {"aggregator_self_ip": "198.19.0.12", "interface": None},
    {"aggregator_self_ip": "198.19.0.12", "site_aggregator_ip": "198.19.0.13"},
    {"aggregator_self_ip": "198.19.0.1"},
])
def test_nft_site_aggregator_refused_where_it_means_nothing(override: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        render_nft_ruleset(**{**RULESET_ARGS, **override})  # type: ignore[arg-type]


@pytest.mark.parametrize("override", [
    {"interface": "bad name"}, {"interface": "x" * 16}, {"hub_overlay_ip": "198.19.0"},
    {"agent_port": 0}, {"wg_port": 70000}, {"agent_port": 22},
])
def test_nft_ruleset_refuses_bad_input(override: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        render_nft_ruleset(**{**RULESET_ARGS, **override})  # type: ignore[arg-type]


def test_normalise_nft_listing_ignores_counts_only() -> None:
    a = "table inet flctl {\n\tcounter agent_dropped {\n\t\tpackets 12 bytes 720\n\t}\n}\n"
    b = "table inet flctl {\n\tcounter agent_dropped {\n\t\tpackets 0 bytes 0\n\t}\n}"
    assert normalise_nft_listing(a) == normalise_nft_listing(b)
    assert normalise_nft_listing(a) != normalise_nft_listing(a.replace("agent_dropped", "x"))


def test_parse_nft_counter() -> None:
    listing = ('{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"counter": {"family": "inet",'
               ' "name": "agent_dropped", "table": "flctl", "handle": 2, "packets": 3,'
               ' "bytes": 180}}]}')
    assert parse_nft_counter(listing, "agent_dropped") == {"packets": 3, "bytes": 180}
    assert parse_nft_counter(listing, "other") is None


def _can_check_nft() -> str | None:
    if shutil.which("nft") is None or shutil.which("unshare") is None:
        return "needs nft and unshare"
    if os.geteuid() != 0:
        return "nft -c needs root"
    return None


@pytest.mark.lab
@pytest.mark.skipif(_can_check_nft() is not None, reason=_can_check_nft() or "")
def test_nft_accepts_the_ruleset(tmp_path: Path) -> None:
    """`nft -c` in a throwaway network namespace: the kernel's own parser, no
    table of this machine touched. Also loaded twice there: the create-delete
    idiom must replace, not fail, when the table exists."""
    path = tmp_path / "flctl.nft"
    path.write_text(render_nft_ruleset(**RULESET_ARGS))
    check = subprocess.run(["unshare", "--net", "nft", "-c", "-f", str(path)],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    for site_args in ({"site_aggregator_ip": "198.19.0.12"},
                      {"aggregator_self_ip": "198.19.0.12"}):
        site_file = tmp_path / "site.nft"
        site_file.write_text(render_nft_ruleset(**RULESET_ARGS, **site_args))
        check = subprocess.run(["unshare", "--net", "nft", "-c", "-f", str(site_file)],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
    twice = subprocess.run(
        ["unshare", "--net", "sh", "-c", 'nft -f "$1" && nft -f "$1" && nft list ruleset', "sh",
         str(path)], capture_output=True, text=True, timeout=30)
    assert twice.returncode == 0, twice.stderr
    assert twice.stdout.count("table inet flctl") == 1
    assert 'tcp dport 7443 counter name "agent_dropped" drop' in twice.stdout
    broken = tmp_path / "broken.nft"
    broken.write_text(path.read_text().replace("tcp dport 7443 accept", "tcp dport seven accept"))
    refused = subprocess.run(["unshare", "--net", "nft", "-c", "-f", str(broken)],
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0
