"""flctl's nftables table on this machine, changed without ever locking the
operator out.

Every change goes: check the file with `nft -c`; save the table as it is
now (or note that there is none) in a file that restores exactly that; ARM
a detached timer that loads the saved file after `timeout_s`; only then
load the new table, atomically. The timer is disarmed by `confirm`, which
deploy calls over a *new* SSH connection: if the new rules had cut SSH, no
new connection would get in, nothing would confirm, and the host would go
back to its previous table by itself. Only the table `inet flctl` is ever
read or written.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flctl.core.facts import normalise_nft_listing, parse_nft_counter
from flctl.core.fsutil import atomic_write
from flctl.core.renderers import NFT_DROP_COUNTER, NFT_FAMILY, NFT_TABLE
from flctl.errors import FlctlError

TABLE = f"{NFT_FAMILY} {NFT_TABLE}"
ROLLBACK_FILE = "rollback.nft"
PIDFILE = "rollback.pid"
APPLIED_FILE = "applied.json"
ROLLED_BACK_FILE = "rolled-back"
TIMER_LOG = "rollback.log"
LOCK_FILE = "lock"
TIMER_TAG = "flctl-fw-rollback"     # $0 of the timer: how we recognise ours
COMMAND_TIMEOUT_S = 30.0
KILL_WAIT_S = 2.0

# Absent table restored: create-then-delete loads cleanly whether or not a
# table exists at that moment, in one transaction.
ABSENT = f"table {TABLE} {{}}\ndelete table {TABLE}\n"

# The timer ($1 seconds, $2 state dir, $3 nft): sleep, restore, leave a
# mark. It removes the pidfile only while that still names it (a newer timer
# may have replaced it).
_TIMER_SCRIPT = """\
sleep "$1" || exit 0
if "$3" -f "$2/rollback.nft"; then date +%s > "$2/rolled-back"; fi
[ "$(cat "$2/rollback.pid" 2>/dev/null)" = "$$" ] && rm -f "$2/rollback.pid"
exit 0
"""


class FirewallError(FlctlError):
    """nft refused a ruleset or a command."""


def _nft(*args: str, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    if shutil.which("nft") is None:
        raise FirewallError("nft not found on this host: install nftables")
    return subprocess.run(["nft", *args], capture_output=True, text=True, input=input_text,
                          timeout=COMMAND_TIMEOUT_S)


def _nft_checked(*args: str, input_text: str | None = None) -> str:
    done = _nft(*args, input_text=input_text)
    if done.returncode != 0:
        raise FirewallError(f"nft {' '.join(args)}: {done.stderr.strip() or 'failed'}")
    return done.stdout


def _sha256(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def table_present() -> bool:
    listing = _nft_checked("list", "tables", NFT_FAMILY)
    return any(line.split()[-1:] == [NFT_TABLE] for line in listing.splitlines())


def current_table() -> str | None:
    """`nft list table inet flctl` as text, None if there is no such table."""
    if not table_present():
        return None
    return _nft_checked("list", "table", NFT_FAMILY, NFT_TABLE)


def check(ruleset_path: Path) -> None:
    """`nft -c`: the kernel's own verdict on the file, nothing loaded."""
    done = _nft("-c", "-f", str(ruleset_path))
    if done.returncode != 0:
        raise FirewallError(f"{ruleset_path.name} rejected by nft -c: {done.stderr.strip()}")


# ------------------------------------------------------------------ the timer


def _timer_pid(state_dir: Path) -> int | None:
    """The armed timer's pid, if it is alive and really ours: its command is
    our script for this state dir and it lives in this network namespace
    (PIDs can be shared with other namespaces, and get reused)."""
    try:
        pid = int((state_dir / PIDFILE).read_text().strip())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
        same_netns = os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    except (OSError, ValueError):
        return None
    if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
        return None
    ours = TIMER_TAG.encode() in argv and str(state_dir.resolve()).encode() in argv
    return pid if ours and same_netns else None


def _arm(state_dir: Path, timeout_s: float) -> int:
    with open(state_dir / TIMER_LOG, "ab") as log:
        timer = subprocess.Popen(
            ["sh", "-c", _TIMER_SCRIPT, TIMER_TAG, f"{timeout_s:g}", str(state_dir.resolve()),
             shutil.which("nft") or "nft"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            close_fds=True, cwd="/",
        )
    atomic_write(state_dir / PIDFILE, f"{timer.pid}\n", 0o600)
    return timer.pid


def _disarm(pid: int) -> None:
    """End the timer's whole session (sh and its sleep) and wait for it."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + KILL_WAIT_S
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.01)


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """One change at a time per state dir (two deploys must not interleave
    their save-arm-apply steps). The timer does not inherit the lock."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ------------------------------------------------------------------ public API


def apply_with_rollback(ruleset_path: Path, state_dir: Path, timeout_s: float) -> dict[str, Any]:
    """Load `ruleset_path` with a rollback armed first.

    Returns {"changed", "armed"}: `armed` is the pid of a live rollback
    timer (new, or one still pending from an unconfirmed earlier apply),
    None when nothing waits for a confirmation. Unchanged (same file, table
    as flctl last left it) means nothing is loaded and nothing new is armed.
    Should the load itself fail, the timer stays armed: it restores the
    saved (last confirmed) state, which is what is loaded anyway.
    """
    if timeout_s <= 0:
        raise FirewallError("the rollback timeout must be positive")
    check(ruleset_path)
    with _locked(state_dir):
        ruleset = ruleset_path.read_bytes()
        current = current_table()
        pending = _timer_pid(state_dir)
        if _applied(state_dir) == {"ruleset_sha256": _sha256(ruleset),
                                   "table_sha256": _listing_sha(current)}:
            return {"changed": False, "armed": pending}
        if pending is None or not (state_dir / ROLLBACK_FILE).exists():
            # The state to go back to. With a timer still pending, the saved file
            # is the last *confirmed* state and must be kept, not the unconfirmed one.
            restore = ABSENT if current is None else ABSENT + "\n" + current
            atomic_write(state_dir / ROLLBACK_FILE, restore, 0o600)
            check(state_dir / ROLLBACK_FILE)
        (state_dir / ROLLED_BACK_FILE).unlink(missing_ok=True)
        armed = _arm(state_dir, timeout_s)          # the new timer first, then the old one goes
        if pending is not None:
            _disarm(pending)
        _nft_checked("-f", str(ruleset_path))
        atomic_write(state_dir / APPLIED_FILE, json.dumps(
            {"ruleset_sha256": _sha256(ruleset), "table_sha256": _listing_sha(current_table())}), 0o600)
        return {"changed": True, "armed": armed}


def _listing_sha(listing: str | None) -> str | None:
    return None if listing is None else _sha256(normalise_nft_listing(listing))


def _applied(state_dir: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads((state_dir / APPLIED_FILE).read_text()))
    except (OSError, ValueError):
        return None


def confirm(state_dir: Path) -> bool:
    """Keep the new table: disarm the timer. True if one was armed and had
    not fired; False if none was (or it already rolled back: see status)."""
    with _locked(state_dir):
        pid = _timer_pid(state_dir)
        if pid is None:
            return False
        _disarm(pid)
        (state_dir / PIDFILE).unlink(missing_ok=True)
        if (state_dir / ROLLED_BACK_FILE).exists():
            return False
        (state_dir / ROLLBACK_FILE).unlink(missing_ok=True)
        return True


def rollback_now(state_dir: Path) -> bool:
    """Disarm and restore the saved state at once; False if nothing was saved."""
    with _locked(state_dir):
        pid = _timer_pid(state_dir)
        if pid is not None:
            _disarm(pid)
            (state_dir / PIDFILE).unlink(missing_ok=True)
        saved = state_dir / ROLLBACK_FILE
        if not saved.exists():
            return False
        _nft_checked("-f", str(saved))
        atomic_write(state_dir / ROLLED_BACK_FILE, f"{int(time.time())}\n", 0o600)
        saved.unlink()
        return True


def remove(state_dir: Path | None = None) -> bool:
    """Delete the table (only ours); True if there was one. With the state
    dir, a pending timer is disarmed first (it would bring the table back)
    and the state files go too."""
    if state_dir is not None and state_dir.is_dir():
        with _locked(state_dir):
            pid = _timer_pid(state_dir)
            if pid is not None:
                _disarm(pid)
            for name in (PIDFILE, ROLLBACK_FILE, APPLIED_FILE, ROLLED_BACK_FILE, TIMER_LOG):
                (state_dir / name).unlink(missing_ok=True)
    present = table_present()
    if present:
        _nft_checked("-f", "-", input_text=ABSENT)
    return present


def status(state_dir: Path | None = None) -> dict[str, Any]:
    """The table as loaded: present, digest (counters zeroed), drops counted."""
    listing = current_table()
    out: dict[str, Any] = {"present": listing is not None, "sha256": _listing_sha(listing),
                           "dropped_packets": None, "dropped_bytes": None}
    if listing is not None:
        counter = parse_nft_counter(
            _nft_checked("-j", "list", "counter", NFT_FAMILY, NFT_TABLE, NFT_DROP_COUNTER)
            if f"counter {NFT_DROP_COUNTER}" in listing else '{"nftables": []}',
            NFT_DROP_COUNTER)
        if counter is not None:
            out["dropped_packets"], out["dropped_bytes"] = counter["packets"], counter["bytes"]
    if state_dir is not None:
        marker = state_dir / ROLLED_BACK_FILE
        out["armed"] = _timer_pid(state_dir)
        out["rolled_back_at"] = int(marker.read_text().strip() or 0) if marker.exists() else None
        applied = _applied(state_dir)
        out["as_applied"] = applied is not None and applied.get("table_sha256") == out["sha256"]
    return out
