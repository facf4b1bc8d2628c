"""Installing the agent on an SSH host that has no internet.

The operator's machine prepares wheels for the host's Python and
architecture (pinned in the workspace's wheel lock, cached); deploy uploads
only the wheels the host lacks, the host checks their sha256, and PyPA's
installer unpacks them offline into a venv under /opt/flctl. The bundle digest written there is how a second deploy
knows there is nothing to do.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

from flctl.core.facts import (
    HELPER_FACTS_KEY,
    bootstrap_script,
    host_unfit_reason,
    parse_key_values,
    provided_key,
)
from flctl.core.inventory import Host
from flctl.core.requirements import name_of
from flctl.core.wheellock import WheelLock, merged
from flctl.deploy.bundle import (
    Bundle,
    HostEnv,
    all_requirements,
    install_script,
    prepare_bundle,
)
from flctl.deploy.connector import Connector, upload_files
from flctl.deploy.remote import StepFailed, helper_argv

INSTALL_DIR = "/opt/flctl"
WHEEL_DIR = f"{INSTALL_DIR}/wheels"
VENV_PYTHON = f"{INSTALL_DIR}/venv/bin/python"
_VERSION = re.compile(r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}")

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

    def get(self, env: HostEnv) -> Bundle:
        key = env.target
        with self._lock:
            if key not in self._bundles:
                self._bundles[key] = prepare_bundle(env, self.cache_dir,
                                                    self.wheel_lock.targets.get(key))
            return self._bundles[key]

    def updated_lock(self) -> WheelLock | None:
        """The lock with every target this run prepared; None if nothing changed."""
        with self._lock:
            updates = [(key, bundle.lock_target()) for key, bundle in self._bundles.items()]
        lock = merged(self.wheel_lock, updates)
        return None if lock.render() == self.wheel_lock.render() else lock


def gather_bootstrap_facts(connector: Connector, host: Host, projects: Sequence[str] = (),
                           facts_args: Sequence[str] = ()) -> dict[str, str]:
    """What deploy must know before installing (flctl.core.facts.bootstrap_script).

    With `facts_args`, an installed agent's helper answers `facts` in the same
    round trip when it can: that answer stays under HELPER_FACTS_KEY (for the
    caller to check), and the Python version it reports fills in "python".
    """
    facts_argv = helper_argv(VENV_PYTHON, *facts_args) if facts_args else ()
    result = connector.run_shell(bootstrap_script(host.python, INSTALL_DIR, projects=projects,
                                                  facts_argv=facts_argv), timeout=60)
    if result.returncode != 0:
        raise StepFailed(f"facts: {result.stderr.strip() or 'sh failed'}")
    facts = parse_key_values(result.stdout)
    if HELPER_FACTS_KEY in facts:
        version = _helper_python(facts[HELPER_FACTS_KEY])
        if version is None:   # no answer to build on: ask the interpreter itself
            return gather_bootstrap_facts(connector, host, projects)
        facts.update(python=version, python_venv="yes")
    return facts


def _helper_python(answer: str) -> str | None:
    """The interpreter version in the helper's `facts` answer, if it is one."""
    try:
        document = json.loads(answer)
    except ValueError:
        return None
    if not isinstance(document, dict) or "error" in document:
        return None
    version = document.get("python")
    return version if isinstance(version, str) and _VERSION.fullmatch(version) else None


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
                          check: bool, step: StepFn,
                          task_requirements: Sequence[str] = (),
                          tell: Callable[[str], None] = lambda line: None,
                          facts_args: Sequence[str] = ()) -> dict[str, str]:
    """Refuse an unfit host, else make /opt/flctl hold this bundle: the agent's
    and the task's requirements, around what the host's interpreter already has
    when the inventory sets `python:` for it (a layered agent).

    Returns the bootstrap facts. Afterwards host-side commands run with the
    venv's Python. With `facts_args`, they hold the helper's answer to them
    under HELPER_FACTS_KEY when the installed bundle was already this one
    (gathered in the same round trip); after an install they never do.
    """
    projects = sorted({name_of(r) for r in all_requirements(task_requirements)}) \
        if host.python_layered else []
    facts = gather_bootstrap_facts(connector, host, projects, facts_args)
    reason = host_unfit_reason(facts, host.become)
    if reason is not None:
        raise StepFailed(reason)
    provided = tuple((name, facts[provided_key(name)]) for name in projects
                     if facts.get(provided_key(name)))
    bundle = bundles.get(HostEnv(facts["python"], facts["arch"], host.python_layered,
                                 provided, tuple(task_requirements)))
    from_host = ", ".join(f"{n} {v}" for n, v in bundle.provided)
    if facts.get("bundle") == bundle.digest:
        step("agent software", False, f"flctl bundle {bundle.digest[:12]}"
             + (f"; from the interpreter: {from_host}" if from_host else ""))
    elif check:
        facts.pop(HELPER_FACTS_KEY, None)
        step("agent software", True, "would install")
    else:
        facts.pop(HELPER_FACTS_KEY, None)   # the answer of the software being replaced
        have = remote_wheel_hashes(connector)
        missing = [w for w in bundle.wheels if have.get(w.name) != w.sha256]
        connector.run_shell(f"mkdir -p {WHEEL_DIR} && chmod 755 {INSTALL_DIR}")
        upload_files(connector, [(w.path, f"{WHEEL_DIR}/{w.name}") for w in missing],
                     f"{len(missing)} wheels", tell)
        connector.put(f"{INSTALL_DIR}/install.sh",
                      install_script(bundle, INSTALL_DIR, host.python).encode(), 0o700)
        done = connector.run(["sh", f"{INSTALL_DIR}/install.sh"], timeout=600)
        if done.returncode != 0:
            tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["failed"]
            raise StepFailed(f"install: {tail[0]}")
        shipped = ", ".join(f"{w.project} {w.name.split('-')[1]}" for w in bundle.wheels
                            if w.project != "installer")
        step("agent software", True,
             f"installed {shipped} ({len(missing)} of {len(bundle.wheels)} wheels uploaded, "
             f"Python {facts['python']}, {facts['arch']})"
             + (f"; from the interpreter: {from_host}" if from_host else ""))
    connector.python = VENV_PYTHON
    return facts


def installed(connector: Connector) -> bool:
    """Whether flctl's venv exists (teardown and status before/after deploy)."""
    return connector.run(["test", "-x", VENV_PYTHON], timeout=30).returncode == 0
