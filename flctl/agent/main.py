"""`flctl-agent`: serve the training protocol for one host.

Runs in the foreground and logs to stderr; the supervisor (or systemd)
owns daemonising, restarts and the log file.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from flctl.agent import gpu
from flctl.agent.requests import RequestHandler
from flctl.core import pki
from flctl.core.agentconfig import parse_agent_config
from flctl.core.messages import Limits
from flctl.errors import FlctlError
from flctl.net.server import FrameServer, PeerInfo
from flctl.net.tls import server_context


def coordinator_only(peer: PeerInfo) -> str | None:
    """Only the coordinator commands an agent. TLS already refuses a host
    certificate as a client (its usage is server auth only); this refuses
    anything that is not exactly the coordinator's role, whatever OpenSSL let by."""
    role = pki.certificate_role(peer.certificate) if peer.certificate else None
    if role == pki.ROLE_COORDINATOR:
        return None
    return (f"only the coordinator may send requests; this peer's certificate is "
            f"{'a ' + role + ' certificate' if role else 'not a coordinator certificate'}")


def build_server(config_path: Path) -> FrameServer:
    config = parse_agent_config(config_path.read_text(), str(config_path))
    gpu.apply(config)   # before the task (and torch) is imported
    service = RequestHandler(config)
    context = server_context(Path(config.ca_cert), Path(config.cert), Path(config.key),
                             Path(config.crl) if config.crl else None)
    limits = Limits(max_body_bytes=config.max_message_mb << 20)
    return FrameServer(
        config.bind_address,
        config.port,
        context,
        service.handle,
        limits=limits,
        logger=logging.getLogger("flctl.agent.server"),
        authorize=coordinator_only,
        receiver=service.transfers.receiver,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flctl-agent", description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="agent.json written by deploy")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        server = build_server(args.config)
    except (FlctlError, OSError) as exc:
        logging.getLogger("flctl.agent").error("cannot start: %s", exc)
        return 2
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    try:
        server.start()
    except OSError as exc:
        logging.getLogger("flctl.agent").error("cannot listen: %s", exc)
        return 3
    logging.getLogger("flctl.agent").info("listening on %s:%s", *server.address)
    while not stopping.wait(3600):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
