"""The host's side of secure aggregation: one SecAggClient per round.

A round takes four requests (advertise keys, share them, fit and send the
masked update, unmask); the client object carrying the round's secrets
lives here between them, in memory only. The host signs its keys with its
own TLS key, which never leaves it, and checks every peer's certificate
against the project CA, so a coordinator cannot slip in keys of its own.
Only the last few rounds are kept: an abandoned round's secrets are dropped.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from flctl.core.agentconfig import AgentConfig
from flctl.core.pki import revoked_serials
from flctl.core.secagg import FixedPointParams, SecAggClient, flatten
from flctl.errors import FlctlError

ROUNDS_KEPT = 4
ROUND_IDS_REMEMBERED = 4096


class SecureRounds:
    def __init__(self, config: AgentConfig) -> None:
        self.host = config.name
        self._config = config
        self._lock = threading.Lock()
        self._clients: OrderedDict[str, SecAggClient] = OrderedDict()
        # A round id is advertised once: fresh keys for a round already played
        # would let a coordinator collect two masked inputs and two sets of
        # shares for it.
        self._seen: OrderedDict[str, None] = OrderedDict()

    @functools.cached_property
    def _credentials(self) -> tuple[bytes, bytes, bytes]:
        """Key, certificate and CA, read once: the TLS context holds the same files
        for the agent's lifetime (deploy restarts the agent when they change)."""
        c = self._config
        return Path(c.key).read_bytes(), Path(c.cert).read_bytes(), Path(c.ca_cert).read_bytes()

    @functools.cached_property
    def _revoked(self) -> frozenset[int]:
        """Serials the CA's revocation list names: a peer signing its round keys with
        a revoked certificate is refused like one from another CA."""
        if not self._config.crl or not Path(self._config.crl).exists():
            return frozenset()
        return revoked_serials(Path(self._config.crl).read_bytes(), self._credentials[2])

    def _client(self, meta: dict[str, Any]) -> tuple[str, SecAggClient]:
        round_id = str(meta.get("round_id"))
        with self._lock:
            client = self._clients.get(round_id)
        if client is None:
            raise FlctlError(f"secure aggregation round {round_id!r} is unknown here "
                             f"(never advertised, finished, or forgotten after a restart)")
        return round_id, client

    def advertise(self, meta: dict[str, Any]) -> dict[str, Any]:
        round_id = str(meta.get("round_id"))
        with self._lock:
            if round_id in self._seen:
                raise FlctlError(f"secure aggregation round {round_id!r} was already "
                                 f"advertised here; a round's keys are made once")
            self._seen[round_id] = None
            while len(self._seen) > ROUND_IDS_REMEMBERED:
                self._seen.popitem(last=False)
        params = FixedPointParams.from_dict(meta.get("params") or {})
        # Degree and threshold are fixed before any key is seen; the roster must repeat them.
        client = SecAggClient(self.host, round_id, *self._credentials, params,
                              degree=_optional_int(meta.get("degree")),
                              threshold=_optional_int(meta.get("threshold")),
                              revoked=self._revoked)
        with self._lock:
            self._clients[round_id] = client
            while len(self._clients) > ROUNDS_KEPT:
                self._clients.popitem(last=False)
        return client.advertise()

    def share(self, meta: dict[str, Any]) -> dict[str, Any]:
        _, client = self._client(meta)
        return {"boxes": client.share(meta.get("roster") or {})}

    def open_shares(self, meta: dict[str, Any]) -> SecAggClient:
        """Before training: a round whose shares do not open is refused up front."""
        _, client = self._client(meta)
        client.receive_shares(meta.get("shares") or {})
        return client

    @staticmethod
    def mask(client: SecAggClient, delta: list[np.ndarray], num_examples: int) -> np.ndarray:
        return client.masked_input(flatten(delta), float(num_examples))

    def unmask(self, meta: dict[str, Any]) -> dict[str, Any]:
        round_id, client = self._client(meta)
        try:
            return client.unmask(list(meta.get("dropped") or []),
                                 list(meta.get("survivors") or []))
        finally:
            with self._lock:  # answered (or refused) once: the secrets go
                self._clients.pop(round_id, None)


def _optional_int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise FlctlError(f"secure aggregation: expected an integer, got {value!r}")
    return value
