"""Who may send this agent what.

The coordinator may send anything. A site aggregator (a ROLE_SITE
certificate, flctl.core.pki) may send only a `fit`, and what resuming that
fit's transfer needs, and only when the site and host its certificate names
are the ones this agent's config names: an aggregator commands its own
members and no one else. TLS already refuses a host certificate as a client
(server auth only); these checks refuse anything else whatever OpenSSL let by.
The per-request check reads only the request's kind, at its head, so a
refused request's model is never taken in (FrameServer's `admit`).
"""

from __future__ import annotations

from flctl.core import pki
from flctl.core.agentconfig import AgentConfig
from flctl.net.server import Admitter, Authorizer, PeerInfo

# What a site aggregator may ask of its members.
SITE_KINDS = frozenset({"fit", "transfer_status", "resend"})


def _role(peer: PeerInfo) -> str | None:
    return pki.certificate_role(peer.certificate) if peer.certificate else None


def connection_refusal(config: AgentConfig, peer: PeerInfo) -> str | None:
    """Once per connection: None to serve this peer at all, else why not."""
    role = _role(peer)
    if role == pki.ROLE_COORDINATOR:
        return None
    if role == pki.ROLE_SITE:
        assert peer.certificate is not None
        identity = pki.site_identity(peer.certificate)
        mine = (config.site, config.site_aggregator)
        if config.site is not None and identity == mine:
            return None
        site, host = identity or (None, None)
        obeys = (f"it obeys site {config.site}'s aggregator {config.site_aggregator}"
                 if config.site else "it is in no site")
        return (f"the site certificate of {host} (site {site}) may not command "
                f"{config.name}: {obeys}")
    return (f"only the coordinator may send requests; this peer's certificate is "
            f"{'a ' + role + ' certificate' if role else 'not a coordinator certificate'}")


def request_refusal(config: AgentConfig, kind: str, peer: PeerInfo) -> str | None:
    """Per request, on a connection already served, from its kind (read before
    its body): None, or why it is refused."""
    role = _role(peer)
    if role == pki.ROLE_COORDINATOR:
        return None
    refusal = connection_refusal(config, peer)
    if refusal is not None:
        return refusal
    if kind not in SITE_KINDS:
        return (f"a site aggregator may only ask for fit, not {kind[:64]!r}; "
                f"only the coordinator may")
    return None


def authorizer(config: AgentConfig) -> Authorizer:
    """The FrameServer's per-connection check for this agent."""
    return lambda peer: connection_refusal(config, peer)


def admitter(config: AgentConfig) -> Admitter:
    """The FrameServer's per-request check for this agent."""
    return lambda kind, peer: request_refusal(config, kind, peer)
