"""What an agent keeps so that a cut connection costs only the bytes not yet moved.

The coordinator names each fit and evaluation it sends with a transfer id
(meta "transfer": run, round, attempt, kind). The agent keeps:

* the inbox: that request's model as it streams in. When the connection
  drops mid-model, the coordinator reconnects, asks how far it got
  (`transfer_status`) and sends the rest as a resumed stream into the same
  buffers;
* the outbox: the request's reply once it is ready (an error reply too).
  When the connection drops mid-update, the coordinator asks for it again
  from where its own copy stops (`resend`); a request still being worked
  on when asked is waited for.

One transfer at a time, as the coordinator sends them: a new transfer's
model drops the previous reply, so an agent holds at most one model and
one reply. Nothing here is trusted beyond its shape: a resumed stream must
match the interrupted one's kind, layout and position exactly.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flctl.core.messages import ArraySpec, FrameHead, Message, Position, check_position
from flctl.errors import FlctlError, ProtocolError
from flctl.net.framing import ArrayReceiver

RESUMABLE_KINDS = ("init", "fit", "evaluate")
# How long `resend` waits for a request received whole to be started.
START_WAIT_S = 10.0
MAX_TRANSFER_CHARS = 200


def transfer_key(meta: dict[str, Any]) -> str | None:
    """The request's transfer id, or None when it has none (or a malformed one)."""
    key = meta.get("transfer")
    if isinstance(key, str) and 0 < len(key) <= MAX_TRANSFER_CHARS:
        return key
    return None


@dataclass
class _Inbox:
    key: str
    kind: str
    head: FrameHead
    arrays: list[np.ndarray]
    position: Position = (0, 0)
    complete: bool = False


@dataclass
class _Outbox:
    key: str
    reply: Message | None = None           # None while the request is worked on
    done: threading.Event = field(default_factory=threading.Event)


def _unshared(arrays: list[np.ndarray]) -> bool:
    """True when nothing but `arrays` holds these arrays (no view, no task
    state, no tensor sharing their memory): they may be written over."""
    # references while counted: the list, the loop variable, the call's argument
    return all(sys.getrefcount(a) <= 3 for a in arrays)


class Transfers:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inbox: _Inbox | None = None
        self._outbox: _Outbox | None = None
        # The last model handed to a handler. The next model of the same
        # layout is received into it once nothing else holds it: fresh pages
        # for every round cost more than the bytes on a virtual machine that
        # returns freed memory to its host (see coordinator.budget).
        self._last_model: list[np.ndarray] = []

    def _model_buffers(self, head: FrameHead) -> list[np.ndarray]:
        last, self._last_model = self._last_model, []
        if len(last) == len(head.specs) and all(
                a.dtype == spec.dtype and a.shape == spec.shape
                for a, spec in zip(last, head.specs)) and _unshared(last):
            return last
        del last
        arrays = ArrayReceiver()
        arrays.begin(head)
        return arrays.finish()

    # ------------------------------------------------------------ receiving
    def receiver(self) -> TransferReceiver:
        """A framing.Receiver for one incoming request."""
        return TransferReceiver(self)

    def _open_inbox(self, head: FrameHead, key: str) -> list[np.ndarray]:
        with self._lock:
            if head.resume is None:
                if self._outbox is not None and self._outbox.key != key:
                    self._outbox = None      # the coordinator is done with that reply
                self._inbox = _Inbox(key, head.kind, head, self._model_buffers(head))
                return self._inbox.arrays
            inbox = self._inbox
            if inbox is None or inbox.key != key or inbox.kind != head.kind \
                    or inbox.head.specs != head.specs or inbox.complete:
                raise ProtocolError(f"no interrupted {head.kind} model for transfer "
                                    f"{key!r} here: send it whole")
            if inbox.position != head.resume:
                raise ProtocolError(f"resumed at {list(head.resume)}, but this agent holds "
                                    f"the model up to {list(inbox.position)}")
            return inbox.arrays

    def _advance(self, key: str, position: Position, complete: bool = False) -> None:
        with self._lock:
            if self._inbox is not None and self._inbox.key == key:
                self._inbox.position = position
                self._inbox.complete = complete or self._inbox.complete

    # ------------------------------------------------------------ working
    def start(self, key: str) -> None:
        """The request `key` is complete and being handled: its model is the
        handler's now, and its reply will wait in the outbox."""
        with self._lock:
            if self._inbox is not None and self._inbox.key == key:
                self._last_model = [a for a in self._inbox.arrays
                                    if a.flags.c_contiguous and a.base is None]
                if len(self._last_model) != len(self._inbox.arrays):
                    self._last_model = []
                self._inbox = None
            self._outbox = _Outbox(key)

    def finish(self, key: str, reply: Message) -> None:
        with self._lock:
            outbox = self._outbox
            if outbox is None or outbox.key != key:
                return
            outbox.reply = reply
            outbox.done.set()

    # ------------------------------------------------------------ the coordinator asks
    def status(self, meta: dict[str, Any]) -> Message:
        """How far transfer `meta["transfer"]` got: none, partial (model up to
        `position`), request (whole, being worked on) or result (reply ready)."""
        key = transfer_key(meta)
        with self._lock:
            inbox, outbox = self._inbox, self._outbox
            if outbox is not None and outbox.key == key:
                have = "result" if outbox.done.is_set() else "request"
                return Message("transfer_status", {"have": have, "position": None})
            if inbox is not None and inbox.key == key:
                return Message("transfer_status", {
                    "have": "request" if inbox.complete else "partial",
                    "position": list(inbox.position)})
        return Message("transfer_status", {"have": "none", "position": None})

    def resend(self, meta: dict[str, Any], wait_s: float) -> Message:
        """The reply of transfer `meta["transfer"]` again, from `meta["from"]`
        on; waits (up to wait_s) while it is still being worked on."""
        key = transfer_key(meta)
        deadline = time.monotonic() + START_WAIT_S
        while True:   # a request received whole may not have been started yet
            with self._lock:
                outbox, inbox = self._outbox, self._inbox
            waiting = inbox is not None and inbox.key == key and inbox.complete
            if not waiting or (outbox is not None and outbox.key == key) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if key is None or outbox is None or outbox.key != key:
            raise FlctlError(f"nothing to resend for transfer {str(meta.get('transfer'))[:80]!r} "
                             f"(the agent restarted, or moved on)")
        if not outbox.done.wait(wait_s):
            raise FlctlError("the reply is still being worked on")
        reply = outbox.reply
        assert reply is not None
        specs = [ArraySpec(a.dtype, tuple(a.shape), a.nbytes)
                 for a in (np.asarray(x) for x in reply.arrays)]
        start = check_position(meta.get("from"), specs) if specs else (0, 0)
        return Message(reply.kind, reply.meta, reply.arrays,
                       None if start == (0, 0) else start)



class TransferReceiver:
    """Receives one request: a fit's or evaluation's model into the inbox
    (resumable), anything else into fresh arrays."""

    def __init__(self, transfers: Transfers) -> None:
        self._transfers = transfers
        self._key: str | None = None
        self._plain = ArrayReceiver()
        self._views: list[memoryview] = []
        self._arrays: list[np.ndarray] = []

    def begin(self, head: FrameHead) -> None:
        key = transfer_key(head.meta) if head.kind in RESUMABLE_KINDS else None
        if key is None:
            self._plain.begin(head)
            return
        self._key = key
        self._arrays = self._transfers._open_inbox(head, key)
        self._views = [memoryview(a.reshape(-1).view(np.uint8)) for a in self._arrays]

    def buffer(self, index: int, offset: int, nbytes: int) -> memoryview:
        if self._key is None:
            return self._plain.buffer(index, offset, nbytes)
        return self._views[index][offset:offset + nbytes]

    def received(self, index: int, offset: int, nbytes: int) -> None:
        if self._key is not None:
            self._transfers._advance(self._key, (index, offset + nbytes))

    def finish(self) -> list[np.ndarray]:
        if self._key is None:
            return self._plain.finish()
        self._transfers._advance(self._key, (len(self._arrays), 0), complete=True)
        return list(self._arrays)
