"""A threaded mutual-TLS request/response server, generic over a handler.

One thread per connection, and the TLS handshake happens in that thread with
its own timeout, so a slow, silent or hostile client can never stall the
accept loop or other peers. Misbehaviour is contained to the connection that
caused it: a malformed frame closes that connection, a handler exception
becomes an "error" reply, a failed handshake is logged and dropped.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any, Callable

from flctl.core.messages import DEFAULT_LIMITS, HEARTBEAT_KIND, FrameHead, Limits, Message
from flctl.errors import FlctlError, ProtocolError
from flctl.net.framing import (
    Allocator,
    ArrayReceiver,
    ConnectionClosed,
    Receiver,
    recv_message,
    send_message,
)
from flctl.net.tls import peer_certificate, peer_common_name

_ACCEPT_POLL_SECONDS = 0.2
_ERROR_REPLY_TIMEOUT = 2.0
# A request may ask for heartbeats while it is being handled (meta
# "heartbeat_s"); intervals are clamped so a typo cannot flood the link.
HEARTBEAT_RANGE = (0.05, 600.0)


@dataclass(frozen=True)
class PeerInfo:
    """Who sent a request: the TCP address and its verified certificate (CN, DER)."""

    address: tuple[str, int]
    common_name: str | None
    certificate: bytes | None = None


Handler = Callable[[Message, PeerInfo], Message]
# Decides, once per connection after the handshake, whether this peer may send
# requests at all: None to serve it, else the reason it is refused.
Authorizer = Callable[[PeerInfo], "str | None"]
# Decides, per request, from its kind alone (before any of its body is read),
# whether this peer may send it: None to go on, else the reason it is refused.
Admitter = Callable[[str, PeerInfo], "str | None"]


class Refused(ProtocolError):
    """A request its peer may not send (Admitter); the connection closes after the reply."""


class _Admitted:
    """A Receiver that asks the Admitter at the request's head, so a refused
    request's body is never taken in (nor its transfer opened)."""

    def __init__(self, inner: Receiver, admit: Admitter, peer: PeerInfo) -> None:
        self.inner, self.admit, self.peer = inner, admit, peer

    def begin(self, head: FrameHead) -> None:
        refusal = self.admit(head.kind, self.peer)
        if refusal is not None:
            raise Refused(refusal)
        self.inner.begin(head)

    def buffer(self, index: int, offset: int, nbytes: int) -> memoryview:
        return self.inner.buffer(index, offset, nbytes)

    def received(self, index: int, offset: int, nbytes: int) -> None:
        self.inner.received(index, offset, nbytes)

    def finish(self) -> list[Any]:
        return self.inner.finish()


def error_reply(text: str, **extra: object) -> Message:
    return Message("error", {"error": text, **extra})


def heartbeat_interval(meta: dict) -> float | None:
    """The heartbeat interval a request asked for, clamped, or None."""
    value = meta.get("heartbeat_s")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        return None
    low, high = HEARTBEAT_RANGE
    return min(max(float(value), low), high)


class FrameServer:
    def __init__(self, host: str, port: int, context: ssl.SSLContext, handler: Handler,
                 limits: Limits = DEFAULT_LIMITS, handshake_timeout: float = 10.0,
                 idle_timeout: float | None = None,
                 logger: logging.Logger | None = None,
                 allocate: Allocator | None = None, max_connections: int = 256,
                 authorize: Authorizer | None = None,
                 receiver: Callable[[], Receiver] | None = None,
                 admit: Admitter | None = None) -> None:
        self.host = host
        self.port = port
        self.context = context
        self.handler = handler
        self.limits = limits
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.allocate = allocate
        self.receiver = receiver  # makes a Receiver per request (else `allocate` is used)
        self.max_connections = max_connections
        self.authorize = authorize
        self.admit = admit
        self.log = logger or logging.getLogger("flctl.net.server")

        self.connections_total = 0
        self.protocol_errors_total = 0
        self.handshake_failures_total = 0
        self.requests_total = 0
        self.refused_total = 0  # over max_connections
        self.unauthorized_total = 0  # verified peers whose role may not send requests

        self._listener: socket.socket | None = None
        self._bound: tuple[str, int] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._open: dict[int, socket.socket] = {}
        self._threads: set[threading.Thread] = set()
        self._accept_thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        if self._bound is None:
            raise RuntimeError("server is not bound; call start() first")
        return self._bound

    @property
    def active_connections(self) -> int:
        with self._lock:
            return len(self._open)

    def _bind(self) -> None:
        if self._listener is not None:
            return
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.create_server((self.host, self.port), family=family, backlog=128)
        listener.settimeout(_ACCEPT_POLL_SECONDS)
        self._listener = listener
        host, port = listener.getsockname()[:2]
        self._bound = (str(host), int(port))
        self.log.info("listening on %s:%d", *self.address)

    def start(self) -> None:
        """Bind now (so address is known on return) and accept in a daemon thread."""
        self._bind()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="flctl-accept", daemon=True
        )
        self._accept_thread.start()

    def serve_forever(self) -> None:
        """Blocking alternative to start(); returns after stop() from another thread."""
        self._bind()
        self._accept_loop()

    def stop(self, join_timeout: float = 5.0) -> None:
        """Close the listener and every open connection, then join the threads."""
        self._stopping.set()
        if self._listener is not None:
            try:  # wakes a blocked accept() at once on Linux; the poll timeout covers others
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._accept_thread is not None and self._accept_thread is not threading.current_thread():
            self._accept_thread.join(join_timeout)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            for sock in self._open.values():
                try:
                    # The plain-socket shutdown wakes a thread blocked in recv or in
                    # the handshake without touching the SSL object it is using.
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass
            threads = list(self._threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(join_timeout)

    def __enter__(self) -> FrameServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- accepting ---------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                raw, addr = self._listener.accept()
            except socket.timeout:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    break
                # EMFILE and friends: back off instead of spinning or dying.
                self.log.warning("accept failed: %s", exc)
                self._stopping.wait(0.1)
                continue
            with self._lock:
                self.connections_total += 1
                full = len(self._threads) >= self.max_connections
                if full:
                    self.refused_total += 1
            if full:
                # Bound threads and memory; the peer sees a reset and may retry.
                self.log.warning("refusing %s:%d: %d connections open", addr[0], addr[1],
                                 self.max_connections)
                raw.close()
                continue
            thread = threading.Thread(
                target=self._serve_connection, args=(raw, addr),
                name=f"flctl-conn-{addr[0]}:{addr[1]}", daemon=True,
            )
            with self._lock:
                self._threads.add(thread)
            thread.start()

    # -- one connection ----------------------------------------------------
    def _serve_connection(self, raw: socket.socket, addr: tuple) -> None:
        address = (str(addr[0]), int(addr[1]))
        tls: ssl.SSLSocket | None = None
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(self.handshake_timeout)
            tls = self.context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            with self._lock:
                if self._stopping.is_set():
                    return
                self._open[id(tls)] = tls
            try:
                tls.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                with self._lock:
                    self.handshake_failures_total += 1
                if not self._stopping.is_set():
                    self.log.warning("TLS handshake with %s:%d failed: %s", *address, exc)
                return
            tls.settimeout(self.idle_timeout)
            peer = PeerInfo(address=address, common_name=peer_common_name(tls),
                            certificate=peer_certificate(tls))
            self.log.debug("peer %s (%s) connected", address, peer.common_name)
            refusal = self.authorize(peer) if self.authorize is not None else None
            if refusal is not None:
                with self._lock:
                    self.unauthorized_total += 1
                self.log.warning("refused %s:%d (certificate %r): %s", *address,
                                 peer.common_name, refusal)
                self._try_send(tls, error_reply(f"refused: {refusal}", unauthorized=True))
                return
            self._request_loop(tls, peer)
        except Exception:  # never let one connection's bug take the thread noisily
            self.log.exception("unexpected error on connection from %s:%d", *address)
        finally:
            with self._lock:
                if tls is not None:
                    self._open.pop(id(tls), None)
                self._threads.discard(threading.current_thread())
            (tls or raw).close()

    def _request_loop(self, tls: ssl.SSLSocket, peer: PeerInfo) -> None:
        while not self._stopping.is_set():
            receive: Receiver | Allocator | None = (self.receiver() if self.receiver
                                                    else self.allocate)
            if self.admit is not None:
                inner = receive if isinstance(receive, Receiver) else ArrayReceiver(receive)
                receive = _Admitted(inner, self.admit, peer)
            try:
                request, _ = recv_message(tls, self.limits, receive)
            except ConnectionClosed as exc:
                if not exc.clean:
                    self._count_protocol_error(peer, exc)
                return
            except Refused as exc:   # its body is left unread: the connection ends
                self._refuse(tls, peer, str(exc))
                return
            except ProtocolError as exc:
                self._count_protocol_error(peer, exc)
                self._try_send(tls, error_reply(str(exc), protocol_error=True))
                return
            except socket.timeout:
                self.log.debug("closing idle connection from %s", peer.address)
                return
            except OSError as exc:  # includes ssl.SSLError: reset, bad record MAC, ...
                if not self._stopping.is_set():
                    self.log.warning("connection from %s:%d failed: %s", *peer.address, exc)
                return
            # a request without arrays never reaches a receiver: asked here
            refusal = self.admit(request.kind, peer) if self.admit is not None else None
            if refusal is not None:
                self._refuse(tls, peer, refusal)
                return
            with self._lock:
                self.requests_total += 1
            reply = self._handle_with_heartbeats(tls, request, peer)
            try:
                send_message(tls, reply, self.limits)
            except ProtocolError as exc:  # the handler built an unsendable reply
                self.log.warning("reply to %r could not be encoded: %s", request.kind, exc)
                if not self._try_send(tls, error_reply(f"server reply invalid: {exc}")):
                    return
            except OSError as exc:
                self.log.debug("sending reply to %s failed: %s", peer.address, exc)
                return
            # Not held while the next request arrives: its receiver may reuse
            # this one's buffers once nothing holds them (agent.transfers).
            del request, reply

    def _handle_with_heartbeats(self, tls: ssl.SSLSocket, request: Message,
                                peer: PeerInfo) -> Message:
        """Handle `request`; if it asks for heartbeats, send one every interval until
        the reply is ready, so the peer tells a long fit from a dead host."""
        interval = heartbeat_interval(request.meta)
        if interval is None:
            return self._handle(request, peer)
        done = threading.Event()

        def beat() -> None:
            while not done.wait(interval):
                try:
                    send_message(tls, Message(HEARTBEAT_KIND))
                except OSError:
                    return  # the peer is gone; the reply will find out as well

        thread = threading.Thread(target=beat, name="flctl-heartbeat", daemon=True)
        thread.start()
        try:
            return self._handle(request, peer)
        finally:
            done.set()
            thread.join()  # no heartbeat may interleave with the reply's bytes

    def _handle(self, request: Message, peer: PeerInfo) -> Message:
        try:
            reply = self.handler(request, peer)
            if not isinstance(reply, Message):
                raise TypeError(f"handler returned {type(reply).__name__}, not Message")
            return reply
        except FlctlError as exc:
            self.log.warning("handler for %r failed: %s", request.kind, exc.message)
            return error_reply(exc.message, type=type(exc).__name__)
        except Exception as exc:
            self.log.warning("handler for %r raised", request.kind, exc_info=True)
            return error_reply(str(exc) or type(exc).__name__, type=type(exc).__name__)

    def _refuse(self, tls: ssl.SSLSocket, peer: PeerInfo, reason: str) -> None:
        with self._lock:
            self.unauthorized_total += 1
        self.log.warning("refused a request from %s:%d (certificate %r): %s", *peer.address,
                         peer.common_name, reason)
        self._try_send(tls, error_reply(f"refused: {reason}", unauthorized=True))

    def _count_protocol_error(self, peer: PeerInfo, exc: ProtocolError) -> None:
        with self._lock:
            self.protocol_errors_total += 1
        self.log.warning("protocol error from %s:%d (%s): %s", *peer.address,
                         peer.common_name, exc)

    def _try_send(self, tls: ssl.SSLSocket, msg: Message) -> bool:
        """Best effort: tell the peer why we are hanging up (e.g. version mismatch)."""
        try:
            tls.settimeout(_ERROR_REPLY_TIMEOUT)
            send_message(tls, msg)
            return True
        except (OSError, ProtocolError):
            return False
        finally:
            try:
                tls.settimeout(self.idle_timeout)
            except OSError:
                pass
