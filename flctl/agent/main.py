"""`flctl-agent`: serve the training protocol for one host.

Runs in the foreground; the supervisor (or systemd) owns daemonising and
restarts. Given `--log`, it writes its log there itself, size-bounded
(LOG_MAX_BYTES, LOG_BACKUPS rotated files beside it), and what a user's task
prints goes there too; only output from before logging starts (or from a
hard crash) lands in the small file its starter opened for it.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import signal
import sys
import threading
from pathlib import Path

from flctl import __version__
from flctl.agent import gpu, trust
from flctl.agent.requests import RequestHandler
from flctl.core.agentconfig import parse_agent_config
from flctl.core.fsutil import atomic_write
from flctl.core.layout import AGENT_VERSION_FILE
from flctl.core.messages import Limits
from flctl.errors import FlctlError
from flctl.net.server import FrameServer
from flctl.net.tls import server_context

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_MAX_BYTES = 10 << 20
LOG_BACKUPS = 3


class LogStream:
    """sys.stdout / sys.stderr of the agent: a task's print() becomes log lines."""

    def __init__(self, logger: logging.Logger, level: int) -> None:
        self.logger, self.level, self._partial = logger, level, ""

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                self.logger.log(self.level, "%s", line)
        return len(text)

    def flush(self) -> None:
        if self._partial.strip():
            self.logger.log(self.level, "%s", self._partial)
        self._partial = ""

    def isatty(self) -> bool:
        return False


def setup_logging(log: Path | None, max_bytes: int = LOG_MAX_BYTES,
                  backups: int = LOG_BACKUPS) -> None:
    """To stderr; with `log`, to that file, rotated at max_bytes, `backups` kept."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    if log is None:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=LOG_FORMAT)
        return
    os.umask(0o077)
    handler = logging.handlers.RotatingFileHandler(log, maxBytes=max_bytes,
                                                   backupCount=backups, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    task = logging.getLogger("flctl.task")
    sys.stdout = LogStream(task, logging.INFO)    # type: ignore[assignment]
    sys.stderr = LogStream(task, logging.WARNING)  # type: ignore[assignment]


def record_version(state_file: str) -> None:
    """Say which flctl this agent runs (agent.version beside its state, in the
    one directory it may write): deploy restarts an agent whose code is older
    than the flctl installed now, local hosts included."""
    path = Path(state_file).with_name(AGENT_VERSION_FILE)
    try:
        atomic_write(path, __version__.encode(), 0o644)
    except OSError as exc:
        logging.getLogger("flctl.agent").warning("cannot record the version in %s: %s",
                                                 path, exc)


def build_server(config_path: Path) -> FrameServer:
    config = parse_agent_config(config_path.read_text(), str(config_path))
    record_version(config.state_file)
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
        authorize=trust.authorizer(config),
        admit=trust.admitter(config),
        receiver=service.transfers.receiver,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flctl-agent", description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="agent.json written by deploy")
    parser.add_argument("--log", type=Path, help="log here, rotated (default: stderr)")
    args = parser.parse_args(argv)
    try:
        setup_logging(args.log)
    except OSError as exc:
        setup_logging(None)
        logging.getLogger("flctl.agent").error("cannot write the log %s: %s", args.log, exc)
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
    logging.getLogger("flctl.agent").info("flctl %s listening on %s:%s", __version__,
                                          *server.address)
    while not stopping.wait(3600):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
