"""A flctl workspace: the directory `flctl init` makes and every command reads.

    flctl.yaml        project and training settings
    inventory.yaml    hosts
    pki/              project CA and the coordinator's certificate (keys 0600)
    pki.backup-<UTC>/ an older pki/ that `init --force` moved aside (never deleted)
    tasks/            the user's own task modules (optional; shipped to hosts)
    frozen/           a model's frozen part (optional; shipped once to hosts)
    wheels.lock       the wheels deploy ships to hosts, with their sha256
    data/             demo shards for local hosts (init --local)
    runs/<id>/        checkpoints, metrics, final weights
    audit.jsonl       who changed hosts or runs, when and how (flctl.audit)
    .flctl/           state of local hosts (their agents' files)
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from flctl.core import pki
from flctl.core.ansible_inventory import load_ansible_inventory
from flctl.core.data import make_federated_shards, save_dataset
from flctl.core.fsutil import atomic_write, write_secret
from flctl.core.inventory import Inventory, load_inventory, render_local_inventory
from flctl.core.members import MEMBERS_FILE
from flctl.core.settings import Settings, load_settings, render_settings, resolve_path
from flctl.core.sites import refuse_sites_off_the_overlay
from flctl.core.tasks import BUILTIN_TASKS
from flctl.core.wheellock import LOCK_FILE, WheelLock, parse_lock
from flctl.errors import WorkspaceError

SETTINGS_FILE = "flctl.yaml"
INVENTORY_FILE = "inventory.yaml"


@dataclass(frozen=True)
class WorkspacePaths:
    root: Path

    @property
    def settings(self) -> Path:
        return self.root / SETTINGS_FILE

    @property
    def inventory(self) -> Path:
        return self.root / INVENTORY_FILE

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def ca_cert(self) -> Path:
        return self.pki / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.pki / "ca.key"

    @property
    def coordinator_cert(self) -> Path:
        return self.pki / "coordinator.crt"

    @property
    def coordinator_key(self) -> Path:
        return self.pki / "coordinator.key"

    @property
    def crl(self) -> Path:
        """The CA's revocation list: the coordinator loads it, deploy ships it to agents."""
        return self.pki / "ca.crl"

    @property
    def issued(self) -> Path:
        """Every certificate the CA issued, and which were revoked (deploy.certificates)."""
        return self.pki / "issued.json"

    @property
    def known_hosts(self) -> Path:
        """SSH host keys flctl trusts for this workspace's hosts."""
        return self.root / "known_hosts"

    @property
    def wheel_lock(self) -> Path:
        """The wheels deploy ships to hosts, pinned with their sha256 (flctl.core.wheellock)."""
        return self.root / LOCK_FILE

    @property
    def overlay_addresses(self) -> Path:
        """Each deployed host's overlay address: hosts keep theirs when others join."""
        return self.state / "overlay-addresses.json"

    @property
    def audit(self) -> Path:
        return self.root / "audit.jsonl"

    @property
    def members(self) -> Path:
        """Deployed hosts, for a running train to follow (flctl.core.members)."""
        return self.state / MEMBERS_FILE

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def tasks(self) -> Path:
        return self.root / "tasks"

    @property
    def frozen(self) -> Path:
        """The frozen part of the model (flctl.core.frozen), when there is one."""
        return self.root / "frozen"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def state(self) -> Path:
        return self.root / ".flctl"


@dataclass(frozen=True)
class Workspace:
    paths: WorkspacePaths
    settings: Settings
    inventory: Inventory

    @property
    def root(self) -> Path:
        return self.paths.root

    @property
    def ssh_config(self) -> Path | None:
        """The OpenSSH client config deploy reads: flctl.yaml's `ssh_config:`,
        else ~/.ssh/config when there is one (`ssh_config: none`: no config)."""
        chosen = self.settings.ssh_config
        if chosen == "none":
            return None
        if chosen is None:
            default = Path("~/.ssh/config").expanduser()
            return default if default.is_file() else None
        return resolve_path(chosen, self.root)


def load_workspace(root: Path) -> Workspace:
    paths = WorkspacePaths(root.resolve())
    if not paths.settings.exists():
        raise WorkspaceError(
            f"{paths.settings} not found: run `flctl init` first or pass --workspace DIR"
        )
    settings = load_settings(paths.settings)
    # `inventory:` names an Ansible inventory read as it is instead of inventory.yaml
    load = load_ansible_inventory if settings.inventory else load_inventory
    source = resolve_path(settings.inventory, paths.root) if settings.inventory \
        else paths.inventory
    inventory = load(source, settings.overlay.subnet, base_dir=paths.root,
                     previous_overlay=deployed_overlay_addresses(paths))
    refuse_sites_off_the_overlay(inventory.source, inventory.sites,
                                 frozenset(h.name for h in inventory.hosts
                                           if h.connection == "local"),
                                 settings.agent.listen)
    return Workspace(paths, settings, inventory)


def deployed_overlay_addresses(paths: WorkspacePaths) -> dict[str, ipaddress.IPv4Address]:
    """The overlay addresses hosts had at the last deploy (deploy records them; a
    workspace from before that record has them in the hub's peer list)."""
    for path, key in ((paths.overlay_addresses, None),
                      (paths.state / "wg" / "peers.json", "overlay_ip")):
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        found: dict[str, ipaddress.IPv4Address] = {}
        for name, value in (document.items() if isinstance(document, dict) else ()):
            text = value.get(key) if key and isinstance(value, dict) else value
            try:
                found[str(name)] = ipaddress.IPv4Address(str(text))
            except ValueError:
                continue
        return found
    return {}


def record_overlay_addresses(paths: WorkspacePaths, hosts: dict[str, str]) -> None:
    """Remember deployed hosts' overlay addresses (merged with earlier ones, the
    old peer list's too: a host this deploy left out keeps its address)."""
    exists = paths.overlay_addresses.exists()
    known = {name: str(ip) for name, ip in deployed_overlay_addresses(paths).items()}
    merged = {**known, **hosts}
    if merged != known or not exists:
        atomic_write(paths.overlay_addresses, json.dumps(merged, indent=2, sort_keys=True))


def read_wheel_lock(paths: WorkspacePaths) -> WheelLock:
    """The workspace's wheel lock; empty before the first deploy to an SSH host."""
    try:
        text = paths.wheel_lock.read_text(encoding="utf-8")
    except FileNotFoundError:
        return WheelLock()
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkspaceError(f"cannot read {paths.wheel_lock}: {exc}") from None
    return parse_lock(text, str(paths.wheel_lock))


def example_inventory() -> str:
    return resources.files("flctl.data").joinpath("inventory.example.yaml").read_text()


def existing_workspace_files(paths: WorkspacePaths) -> list[Path]:
    """The files that make `paths.root` a workspace already (empty: free to init)."""
    return [p for p in (paths.settings, paths.inventory, paths.pki) if p.exists()]


@dataclass(frozen=True)
class Initialized:
    """A new workspace, and where the CA it replaced went (None: it replaced none)."""

    paths: WorkspacePaths
    pki_backup: Path | None = None


def init_workspace(
    root: Path,
    *,
    local_hosts: int | None = None,
    force: bool = False,
    project: str | None = None,
    settings: Settings | None = None,
    alpha: float = 0.5,
    seed: int = 0,
    inventory_text: str | None = None,
) -> Initialized:
    """Create a workspace; refuse to clobber one unless `force`.

    Even with `force` the old CA key is never destroyed: the hosts deployed
    with it trust only it, so losing it would lock the operator out of their
    own federation. The old pki/ is moved to a backup the result names.

    With `local_hosts`, every host runs on this machine and gets a shard of
    the bundled digits data split with Dirichlet label skew, so the
    workspace trains at once. `inventory_text` (e.g. translated from an
    Ansible inventory) is written as inventory.yaml instead of the example.
    """
    paths = WorkspacePaths(root.resolve())
    existing = existing_workspace_files(paths)
    if existing and not force:
        raise WorkspaceError(
            f"{paths.root} already holds a workspace ({existing[0].name}); "
            "pass --force to overwrite it (its pki/ is kept in a backup)"
        )
    backup = backup_pki(paths) if force and paths.pki.exists() else None
    paths.root.mkdir(parents=True, exist_ok=True)
    chosen = settings or Settings()
    if project is not None:
        chosen = Settings(project=project, overlay=chosen.overlay, agent=chosen.agent,
                          training=chosen.training, limits=chosen.limits)
    if local_hosts:
        inventory, shapes = _local_inventory(paths, local_hosts, alpha, seed)
        if chosen.training.task in BUILTIN_TASKS:
            # the model's shape comes from settings, never from a host: write the
            # demo data's, which this machine just made
            chosen = chosen.with_training(task_params={**shapes,
                                                       **chosen.training.task_params})
        atomic_write(paths.inventory, inventory)
    else:
        atomic_write(paths.inventory, inventory_text or example_inventory())
    atomic_write(paths.settings, render_settings(chosen))
    _make_pki(paths, chosen.project)
    paths.tasks.mkdir(exist_ok=True)
    return Initialized(paths, backup)


def backup_pki(paths: WorkspacePaths) -> Path:
    """Move pki/ to a new `pki.backup-<UTC time>` directory (0700) and return it.

    The name is claimed with mkdir, which fails if it exists, and pki/ is then
    renamed onto that empty directory: an earlier backup is never replaced.
    The keys keep their 0600 mode (a rename does not touch them).
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for attempt in range(1, 1000):
        backup = paths.root / f"pki.backup-{stamp}" if attempt == 1 else \
            paths.root / f"pki.backup-{stamp}-{attempt}"
        try:
            backup.mkdir(mode=0o700)
        except FileExistsError:
            continue
        try:
            os.rename(paths.pki, backup)
        except OSError as exc:
            backup.rmdir()
            raise WorkspaceError(f"cannot move {paths.pki} to {backup}: {exc.strerror}") from None
        backup.chmod(0o700)
        return backup
    raise WorkspaceError(f"{paths.root}: no free name for a backup of {paths.pki}")


def _local_inventory(paths: WorkspacePaths, count: int, alpha: float,
                     seed: int) -> tuple[str, dict[str, int]]:
    """inventory.yaml for `count` local hosts with demo shards, and the data's shape."""
    shards, pooled = make_federated_shards(count, alpha=alpha, seed=seed)
    entries = []
    for index, shard in enumerate(shards, start=1):
        name = f"local{index}"
        save_dataset(shard, paths.data / f"{name}.npz")
        entries.append((name, f"data/{name}.npz"))
    save_dataset(pooled, paths.data / "pooled.npz")
    shapes = {"n_features": pooled.n_features, "n_classes": pooled.n_classes}
    return render_local_inventory(entries), shapes


def _make_pki(paths: WorkspacePaths, project: str) -> None:
    paths.pki.mkdir(mode=0o700, exist_ok=True)
    ca_key, ca_cert = pki.make_ca(f"flctl {project} CA")
    write_secret(paths.ca_key, ca_key)
    atomic_write(paths.ca_cert, ca_cert)
    key, cert = pki.coordinator_certificate(ca_key, ca_cert)
    write_secret(paths.coordinator_key, key)
    atomic_write(paths.coordinator_cert, cert)
