"""Room for one connection per host: the coordinator's open-file limit.

The coordinator keeps a connection to each host it has talked to (a TLS
handshake per round would cost more than the round's own work for a small
model), so a run over a thousand hosts holds a thousand sockets, past the
soft limit of 1024 many systems start a shell with. The soft limit may be
raised to the hard one without privileges: the run does that when it may
need more, and says so when even the hard limit is short.
"""

from __future__ import annotations

import resource

# Besides one socket per host: the run's files, spooled updates, tracking, the interpreter's.
SPARE_FILES = 256


def files_needed(hosts: int) -> int:
    return hosts + SPARE_FILES


def ensure_open_files(hosts: int) -> str | None:
    """Raise the soft RLIMIT_NOFILE towards the hard one when `hosts` need
    more; a line to tell the operator when they cannot have it, else None."""
    need = files_needed(hosts)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return None
    target = need if hard == resource.RLIM_INFINITY else min(hard, max(need, soft))
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft >= need:
        return None
    return (f"this process may open {soft} files (ulimit -n, hard limit {hard}); a run over "
            f"{hosts} hosts keeps a connection to each and may need {need}: hosts past the "
            f"limit fail to connect (raise the hard limit, e.g. in limits.conf)")
