"""Installing the agent on an SSH host that has no internet.

The operator's machine prepares wheels for the host's Python and
architecture (pinned in the workspace's wheel lock, cached); deploy uploads
only the wheels the host lacks, the host checks their sha256, and PyPA's
installer unpacks them offline into a venv under /opt/flctl. The bundle digest written there is how a second deploy
knows there is nothing to do.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

from flctl.core.facts import bootstrap_script, host_unfit_reason, parse_key_values
from flctl.core.inventory import Host
from flctl.core.wheellock import WheelLock, merged
from flctl.deploy.bundle import Bundle, host_target, install_script, prepare_bundle
from flctl.deploy.connector import Connector
from flctl.deploy.remote import StepFailed

INSTALL_DIR = "/opt/flctl"
WHEEL_DIR = f"{INSTALL_DIR}/wheels"
VENV_PYTHON = f"{INSTALL_DIR}/venv/bin/python"

StepFn = Callable[[str, bool, str], None]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flctl" / "wheels"


class BundleCache:
    """One bundle per (Python X.Y, arch) per deploy run, shared by host threads.

    Reads this workspace's wheel lock and remembers what each target came to,
    so deploy can record it (`updated_lock`) once all hosts are done.
    """

    def __init__(self, cache_dir: Path | None = None, lock: WheelLock | None = None) -> None:
        self.cache_dir = cache_dir or default_cache_dir()
        self.wheel_lock = lock or WheelLock()
        self._lock = threading.Lock()
        self._bundles: dict[str, Bundle] = {}

    def get(self, python_version: str, arch: str) -> Bundle:
        key = host_target(python_version, arch)
        with self._lock:
            if key not in self._bundles:
                self._bundles[key] = prepare_bundle(python_version, arch, self.cache_dir,
                                                    self.wheel_lock.targets.get(key))
            return self._bundles[key]

    def updated_lock(self) -> WheelLock | None:
        """The lock with every target this run prepared; None if nothing changed."""
        with self._lock:
            updates = [(key, bundle.lock_target()) for key, bundle in self._bundles.items()]
        lock = merged(self.wheel_lock, updates)
        return None if lock.render() == self.wheel_lock.render() else lock


def gather_bootstrap_facts(connector: Connector, host: Host) -> dict[str, str]:
    result = connector.run_shell(bootstrap_script(host.python, INSTALL_DIR), timeout=60)
    if result.returncode != 0:
        raise StepFailed(f"facts: {result.stderr.strip() or 'sh failed'}")
    return parse_key_values(result.stdout)


def remote_wheel_hashes(connector: Connector) -> dict[str, str]:
    listing = connector.run_shell(
        f"[ -d {WHEEL_DIR} ] && cd {WHEEL_DIR} && sha256sum -- *.whl 2>/dev/null || true")
    hashes: dict[str, str] = {}
    for line in listing.stdout.splitlines():
        digest, _, name = line.partition("  ")
        if digest and name:
            hashes[name.strip()] = digest.strip()
    return hashes


def ensure_agent_software(connector: Connector, host: Host, bundles: BundleCache, *,
                          check: bool, step: StepFn) -> dict[str, str]:
    """Refuse an unfit host, else make /opt/flctl hold this bundle.

    Returns the bootstrap facts. Afterwards host-side commands run with the
    venv's Python.
    """
    facts = gather_bootstrap_facts(connector, host)
    reason = host_unfit_reason(facts, host.become)
    if reason is not None:
        raise StepFailed(reason)
    bundle = bundles.get(facts["python"], facts["arch"])
    if facts.get("bundle") == bundle.digest:
        step("agent software", False, f"flctl bundle {bundle.digest[:12]}")
    elif check:
        step("agent software", True, "would install")
    else:
        have = remote_wheel_hashes(connector)
        missing = [w for w in bundle.wheels if have.get(w.name) != w.sha256]
        connector.run_shell(f"mkdir -p {WHEEL_DIR} && chmod 755 {INSTALL_DIR}")
        for wheel in missing:
            connector.put_file(wheel.path, f"{WHEEL_DIR}/{wheel.name}", 0o644)
        connector.put(f"{INSTALL_DIR}/install.sh",
                      install_script(bundle, INSTALL_DIR, host.python).encode(), 0o700)
        done = connector.run(["sh", f"{INSTALL_DIR}/install.sh"], timeout=600)
        if done.returncode != 0:
            tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["failed"]
            raise StepFailed(f"install: {tail[0]}")
        step("agent software", True,
             f"installed ({len(missing)} of {len(bundle.wheels)} wheels uploaded, Python "
             f"{facts['python']}, {facts['arch']})")
    connector.python = VENV_PYTHON
    return facts


def installed(connector: Connector) -> bool:
    """Whether flctl's venv exists (teardown and status before/after deploy)."""
    return connector.run(["test", "-x", VENV_PYTHON], timeout=30).returncode == 0
