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

Deploy arms the timer (`arm`) before it touches the tunnel too: a tunnel
interface that did not exist before is deleted by the same rollback. Where
systemd runs, the timer is a transient systemd unit (systemd-run), not a
child of the SSH session: logind may kill a session's processes when it
ends, which is exactly what happens when a bad change cuts SSH.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flctl.agent.launcher import init_system
from flctl.agent.proc import is_alive, matching_pid, pid_from_file
from flctl.core.facts import normalise_nft_listing, parse_nft_counter
from flctl.core.fsutil import atomic_write, sha256_hex
from flctl.core.renderers import NFT_DROP_COUNTER, NFT_FAMILY, NFT_TABLE
from flctl.errors import FlctlError

TABLE = f"{NFT_FAMILY} {NFT_TABLE}"
ROLLBACK_FILE = "rollback.nft"
PIDFILE = "rollback.pid"
APPLIED_FILE = "applied.json"
TUNNEL_UNDO_FILE = "tunnel-undo"   # an interface the rollback deletes (it is new)
UNIT_FILE = "rollback.unit"        # the transient systemd unit of the timer, if any
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
if [ -s "$2/tunnel-undo" ]; then ip link delete dev "$(cat "$2/tunnel-undo")"; rm -f "$2/tunnel-undo"; fi
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
    pid = pid_from_file(state_dir / PIDFILE)
    if pid is None or not matching_pid(pid, [TIMER_TAG.encode(),
                                             str(state_dir.resolve()).encode()],
                                       same_netns=True):
        return None
    return pid


def timer_command(state_dir: Path, timeout_s: float, nft: str) -> list[str]:
    """The rollback timer's argv: $0 is TIMER_TAG, so _timer_pid recognises it."""
    return ["sh", "-c", _TIMER_SCRIPT, TIMER_TAG, f"{timeout_s:g}", str(state_dir.resolve()), nft]


def systemd_timer_command(unit: str, argv: list[str]) -> list[str]:
    """The same timer as a transient systemd service, outside the SSH session."""
    return ["systemd-run", f"--unit={unit}", "--collect", "--quiet",
            "--property=KillMode=control-group", "--", *argv]


def _timer_unit(state_dir: Path) -> str:
    """A fresh unit name per timer: a re-arm starts the new one before the old goes."""
    return f"flctl-rollback-{sha256_hex(str(state_dir.resolve()))[:12]}-{time.time_ns()}"


def _unit_of(state_dir: Path) -> str | None:
    """The systemd unit of the armed timer, if it was armed through systemd."""
    try:
        return (state_dir / UNIT_FILE).read_text().strip() or None
    except OSError:
        return None


def _arm(state_dir: Path, timeout_s: float) -> int:
    argv = timer_command(state_dir, timeout_s, shutil.which("nft") or "nft")
    if init_system() == "systemd" and shutil.which("systemd-run"):
        unit = _timer_unit(state_dir)
        started = subprocess.run(systemd_timer_command(unit, argv), capture_output=True,
                                 text=True, timeout=COMMAND_TIMEOUT_S)
        if started.returncode != 0:
            raise FirewallError(f"systemd-run: {started.stderr.strip() or 'failed'}")
        shown = subprocess.run(["systemctl", "show", "-p", "MainPID", "--value", unit],
                               capture_output=True, text=True, timeout=30).stdout.strip()
        if not shown.isdigit() or int(shown) == 0:
            raise FirewallError(f"the rollback timer {unit} did not start")
        atomic_write(state_dir / UNIT_FILE, unit + "\n", 0o600)
        pid = int(shown)
    else:
        with open(state_dir / TIMER_LOG, "ab") as log:
            timer = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     start_new_session=True, close_fds=True, cwd="/")
        (state_dir / UNIT_FILE).unlink(missing_ok=True)
        pid = timer.pid
    atomic_write(state_dir / PIDFILE, f"{pid}\n", 0o600)
    return pid


def _disarm(pid: int, unit: str | None) -> None:
    """End the timer (its systemd unit, or its whole session: sh and its sleep)
    and wait for it."""
    if unit is not None:
        subprocess.run(["systemctl", "stop", unit], capture_output=True,
                       timeout=COMMAND_TIMEOUT_S)
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + KILL_WAIT_S
    while time.monotonic() < deadline and is_alive(pid):
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


def _save_rollback(state_dir: Path, pending: int | None) -> None:
    """The state to go back to. With a timer still pending, the saved file is the
    last *confirmed* state and must be kept, not the unconfirmed one."""
    if pending is None or not (state_dir / ROLLBACK_FILE).exists():
        current = current_table()
        restore = ABSENT if current is None else ABSENT + "\n" + current
        atomic_write(state_dir / ROLLBACK_FILE, restore, 0o600)
        check(state_dir / ROLLBACK_FILE)


def arm(state_dir: Path, timeout_s: float, new_interface: str | None = None) -> int:
    """Arm the rollback before a change that is not (only) the table: the saved
    table comes back, and `new_interface` (one about to be created) is deleted,
    unless `confirm` runs first. Returns the timer's pid."""
    if timeout_s <= 0:
        raise FirewallError("the rollback timeout must be positive")
    with _locked(state_dir):
        pending, pending_unit = _timer_pid(state_dir), _unit_of(state_dir)
        _save_rollback(state_dir, pending)
        if new_interface is not None and not Path(f"/sys/class/net/{new_interface}").exists():
            atomic_write(state_dir / TUNNEL_UNDO_FILE, new_interface + "\n", 0o600)
        (state_dir / ROLLED_BACK_FILE).unlink(missing_ok=True)
        armed = _arm(state_dir, timeout_s)
        if pending is not None:
            _disarm(pending, pending_unit)
        return armed


def load_table(ruleset_path: Path) -> None:
    """Load flctl's table as it is (at boot: no rollback, nothing to confirm)."""
    check(ruleset_path)
    _nft_checked("-f", str(ruleset_path))


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
        pending, pending_unit = _timer_pid(state_dir), _unit_of(state_dir)
        if _applied(state_dir) == {"ruleset_sha256": sha256_hex(ruleset),
                                   "table_sha256": _listing_sha(current)}:
            return {"changed": False, "armed": pending}
        _save_rollback(state_dir, pending)
        (state_dir / ROLLED_BACK_FILE).unlink(missing_ok=True)
        armed = _arm(state_dir, timeout_s)          # the new timer first, then the old one goes
        if pending is not None:
            _disarm(pending, pending_unit)
        _nft_checked("-f", str(ruleset_path))
        atomic_write(state_dir / APPLIED_FILE, json.dumps(
            {"ruleset_sha256": sha256_hex(ruleset), "table_sha256": _listing_sha(current_table())}), 0o600)
        return {"changed": True, "armed": armed}


def _listing_sha(listing: str | None) -> str | None:
    return None if listing is None else sha256_hex(normalise_nft_listing(listing))


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
        _disarm(pid, _unit_of(state_dir))
        for name in (PIDFILE, UNIT_FILE):
            (state_dir / name).unlink(missing_ok=True)
        if (state_dir / ROLLED_BACK_FILE).exists():
            return False
        for name in (ROLLBACK_FILE, TUNNEL_UNDO_FILE):
            (state_dir / name).unlink(missing_ok=True)
        return True


def rollback_now(state_dir: Path) -> bool:
    """Disarm and restore the saved state at once; False if nothing was saved."""
    with _locked(state_dir):
        pid = _timer_pid(state_dir)
        if pid is not None:
            _disarm(pid, _unit_of(state_dir))
            for name in (PIDFILE, UNIT_FILE):
                (state_dir / name).unlink(missing_ok=True)
        saved = state_dir / ROLLBACK_FILE
        if not saved.exists():
            return False
        _nft_checked("-f", str(saved))
        undo = state_dir / TUNNEL_UNDO_FILE
        if undo.exists():
            interface = undo.read_text().strip()
            if interface and Path(f"/sys/class/net/{interface}").exists():
                subprocess.run(["ip", "link", "delete", "dev", interface], capture_output=True,
                               timeout=COMMAND_TIMEOUT_S)
            undo.unlink()
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
                _disarm(pid, _unit_of(state_dir))
            for name in (PIDFILE, UNIT_FILE, ROLLBACK_FILE, APPLIED_FILE, ROLLED_BACK_FILE,
                         TIMER_LOG, TUNNEL_UNDO_FILE):
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
