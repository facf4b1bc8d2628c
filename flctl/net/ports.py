"""Finding free loopback ports for agents that share this machine."""

from __future__ import annotations

import socket

from flctl.errors import FlctlError

LOOPBACK = "127.0.0.1"


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port_block(count: int, attempts: int = 200) -> int:
    """A base port such that base .. base+count-1 are all free on loopback."""
    for _ in range(attempts):
        with socket.socket() as probe:
            probe.bind((LOOPBACK, 0))
            base = probe.getsockname()[1]
        if base + count < 65000 and all(_free(p) for p in range(base, base + count)):
            return base
    raise FlctlError(f"no block of {count} free ports on {LOOPBACK}")
