"""The one error type users see.

Every expected failure (bad input, unreachable host, refused handshake) is
raised as a FlctlError subclass carrying the process exit code, so the CLI
can show it as one red line without a traceback. Anything else is a bug.
"""

from __future__ import annotations

EXIT_INTERRUPTED = 130  # Ctrl-C: the shell's convention (128 + SIGINT)


class FlctlError(Exception):
    """An expected failure, shown to the user as one line."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(FlctlError):
    """A workspace file (flctl.yaml, inventory.yaml, task spec) is invalid.

    Carries the file, line and field so the message can point at the typo.
    """

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        where = ""
        if file is not None:
            where = f"{file}:{line}: " if line is not None else f"{file}: "
        prefix = f"{field}: " if field else ""
        super().__init__(f"{where}{prefix}{message}")
        self.file = file
        self.line = line
        self.field = field
        self.reason = message


class WorkspaceError(FlctlError):
    """No workspace here, or refusing to overwrite one."""

    exit_code = 3


class ProtocolError(FlctlError):
    """A peer sent a frame that breaks the wire protocol."""

    exit_code = 4


class HostError(FlctlError):
    """One or more hosts failed or were unreachable."""

    exit_code = 5


class TrainingError(FlctlError):
    """A run could not complete (too few hosts answered, bad resume state)."""

    exit_code = 6
