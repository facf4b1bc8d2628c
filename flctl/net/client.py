"""A mutual-TLS request/response client for one flctl peer.

Connection-level failures (refused, handshake rejected, reset, timeout) are
raised as TransportError, which is both a FlctlError (one clear CLI line) and
a ConnectionError (so `except OSError` keeps working). After one, the client
is closed; reconnecting is the caller's decision.
"""

from __future__ import annotations

import socket
import ssl

from flctl.core.messages import (
    DEFAULT_LIMITS,
    HEARTBEAT_KIND,
    PROTOCOL_VERSION,
    Limits,
    Message,
    VersionMismatch,
)
from flctl.errors import FlctlError, ProtocolError
from flctl.net.framing import ConnectionClosed, Receive, recv_message, send_message

# A peer that asked to be kept informed is declared dead after this many
# heartbeat intervals of silence.
HEARTBEAT_MISSES = 3

# In TLS 1.3 the server checks the client certificate after the client's side of
# the handshake is done, so a rejection only shows up on the first exchange.
_REJECTED_HINT = (" before the first reply on this connection; if this persists the peer"
                  " may not accept our certificate (is it signed by the project CA?)")


class TransportError(FlctlError, ConnectionError):
    """Could not reach or keep talking to the peer."""


class TransportTimeout(TransportError, TimeoutError):
    """The peer did not answer within the client's timeout."""


class RemoteError(FlctlError):
    """The peer answered with an "error" message; the connection stays usable."""

    def __init__(self, message: str, meta: dict | None = None) -> None:
        super().__init__(message)
        self.meta = meta or {}


def upgrade_hint(where: str, peer: int) -> str:
    """One line for a peer of another protocol version, saying which side to
    upgrade (the client here is always the coordinator, the peer an agent)."""
    if peer < PROTOCOL_VERSION:
        return (f"{where}: its agent speaks protocol {peer}, this flctl {PROTOCOL_VERSION}: "
                "run `flctl deploy` to upgrade the agent")
    return (f"{where}: its agent speaks protocol {peer}, this flctl {PROTOCOL_VERSION}: "
            "upgrade flctl on this machine to the agent's release (or redeploy the agent "
            "with this one)")


class FrameClient:
    def __init__(self, host: str, port: int, context: ssl.SSLContext, server_hostname: str,
                 timeout: float | None = 30.0, limits: Limits = DEFAULT_LIMITS,
                 connect_timeout: float | None = 10.0) -> None:
        self.host = host
        self.port = port
        self.context = context
        self.server_hostname = server_hostname
        self.timeout = timeout
        # A peer behind a dead tunnel drops SYNs silently: connecting must fail
        # fast even when a request may legitimately take the whole round.
        self.connect_timeout = connect_timeout if timeout is None else (
            timeout if connect_timeout is None else min(timeout, connect_timeout))
        self.limits = limits
        self.bytes_sent = 0
        self.bytes_received = 0
        self.sending = 0   # bytes of the message going out now, for progress views
        self._sock: ssl.SSLSocket | None = None
        self._fresh = False  # connected, no reply received yet

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def _where(self) -> str:
        return f"{self.server_hostname} ({self.host}:{self.port})"

    def connect(self) -> None:
        if self._sock is not None:
            return
        try:
            raw = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except socket.timeout as exc:
            raise TransportTimeout(f"connecting to {self._where()} timed out") from exc
        except OSError as exc:
            raise TransportError(f"cannot connect to {self._where()}: {exc}") from exc
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = self.context.wrap_socket(raw, server_hostname=self.server_hostname)
            self._sock.settimeout(self.timeout)
            self._fresh = True
        except socket.timeout as exc:
            raw.close()
            raise TransportTimeout(f"TLS handshake with {self._where()} timed out") from exc
        except (ssl.SSLError, OSError) as exc:
            raw.close()
            raise TransportError(f"TLS handshake with {self._where()} failed: {exc}") from exc

    def request(self, msg: Message, receive: Receive = None, *,
                heartbeat_s: float | None = None) -> Message:
        """Send one message and return the reply; an "error" reply raises RemoteError.

        With `heartbeat_s` the peer sends a heartbeat every `heartbeat_s` seconds
        while it works, and the peer is given up on after HEARTBEAT_MISSES
        intervals of silence instead of the (much longer) client timeout: a frozen
        or unplugged host is noticed in seconds, a long fit is not cut short.
        """
        self.connect()
        assert self._sock is not None
        silence: float | None = None
        if heartbeat_s:
            msg = Message(msg.kind, {**msg.meta, "heartbeat_s": heartbeat_s}, msg.arrays,
                          msg.resume)
            silence = HEARTBEAT_MISSES * heartbeat_s
            if self.timeout is not None:
                silence = min(silence, self.timeout)
            self._sock.settimeout(silence)
        try:
            try:
                self.bytes_sent += send_message(self._sock, msg, self.limits,
                                                on_sent=self._sent_so_far)
            finally:
                self.sending = 0
            while True:
                reply, received = recv_message(self._sock, self.limits, receive)
                self.bytes_received += received
                if silence is None or reply.kind != HEARTBEAT_KIND:
                    break
        except socket.timeout as exc:
            self.close()
            if silence is not None:
                raise TransportTimeout(f"{self._where()} went silent: no heartbeat for "
                                       f"{silence:g} s") from exc
            raise TransportTimeout(f"{self._where()} did not answer {msg.kind!r} in time") from exc
        except ConnectionClosed as exc:
            hint = _REJECTED_HINT if self._fresh else ""
            self.close()
            raise TransportError(f"{self._where()} closed the connection{hint}") from exc
        except VersionMismatch as exc:
            self.close()
            raise ProtocolError(upgrade_hint(self._where(), exc.peer)) from None
        except ProtocolError:
            self.close()
            raise
        except OSError as exc:  # ssl.SSLError (e.g. our certificate rejected), reset
            fresh = self._fresh
            self.close()
            hint = _REJECTED_HINT if fresh else ""
            raise TransportError(f"connection to {self._where()} failed: {exc}{hint}") from exc
        except BaseException:  # e.g. the receiver refused: the stream is out of step now
            self.close()
            raise
        if silence is not None and self._sock is not None:
            self._sock.settimeout(self.timeout)
        self._fresh = False
        if reply.kind == "error":
            if reply.meta.get("protocol_error") or reply.meta.get("unauthorized"):
                self.close()  # the server hangs up after either
            raise RemoteError(str(reply.meta.get("error", "unknown remote error")), reply.meta)
        return reply

    def _sent_so_far(self, count: int) -> None:
        self.sending = count

    def set_timeout(self, timeout: float | None) -> None:
        """Change the per-operation timeout, also on an open connection (round deadlines)."""
        self.timeout = timeout
        sock = self._sock
        if sock is not None:
            sock.settimeout(timeout)

    def abort(self) -> None:
        """Cut the connection from another thread: a request blocked in send/recv fails
        at once with TransportError. Only the TCP socket is shut down (the SSL object
        and the fd stay with the requesting thread, which closes them)."""
        sock = self._sock
        if sock is not None:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def __enter__(self) -> FrameClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
