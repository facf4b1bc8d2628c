"""Processes on this host, read from /proc: the one place that does it.

Every pidfile flctl writes (supervisor, agent, firewall rollback timer) is
checked here before a pid is trusted: the process must be alive (not a
zombie waiting to be reaped), be what the caller expects (its command
line), and, where given, belong to the expected user and network
namespace. A stale pidfile must never make flctl signal someone else's
process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from flctl.core.facts import ProcStat, parse_proc_stat


def proc_stat(pid: int) -> ProcStat | None:
    """The process's stat, or None when there is no such process."""
    try:
        return parse_proc_stat(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, IndexError, ValueError):
        return None


def is_alive(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat.alive


def command_line(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def owner_uid(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def same_network_namespace(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return False


def matching_pid(pid: int, needles: Sequence[bytes], *, uid: int | None = None,
                 same_netns: bool = False) -> bool:
    """Whether `pid` is alive and is ours: every needle appears in its command
    line, and it runs as `uid` and in this network namespace when asked."""
    if not is_alive(pid):
        return False
    argv = b"\0".join(command_line(pid))
    if not all(needle in argv for needle in needles):
        return False
    if uid is not None and owner_uid(pid) != uid:
        return False
    return not same_netns or same_network_namespace(pid)


def pid_from_file(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def owned_processes(uid: int, *, same_netns: bool = False) -> list[int]:
    """Every process of `uid`, zombies included (in this network namespace only,
    with `same_netns`)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if owner_uid(pid) == uid and (not same_netns or same_network_namespace(pid)):
            found.append(pid)
    return found
