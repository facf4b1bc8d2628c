"""Deploy pins every wheel it ships in the workspace's wheels.lock.

The SSH host is played on this machine (tests/sandbox_host.py) and the
package index is a folder (pip's download is the one thing replaced), so
what is checked is deploy's own bookkeeping: the lock names exactly the
wheels uploaded, with their sha256; flctl's own wheel is cached under its
version; and a cached wheel whose bytes were changed is never shipped.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import flctl
from flctl.core.fsutil import file_sha256
from flctl.deploy import bundle, install
from flctl.workspace import load_workspace, read_wheel_lock
from sandbox_host import sandbox, ssh_inventory

from helpers import run_cli, use_ports

# the index: what `pip download` would fetch (the agent's real requirements are
# flctl's metadata; two stand-ins keep the test off the network)
INDEX = {"demo_dep-1.0-py3-none-any.whl": b"demo dependency " * 64,
         "installer-1.1.0-py3-none-any.whl": b"installer " * 64}


class FakeIndex:
    def __init__(self) -> None:
        self.downloads: list[list[str]] = []

    def download(self, python_xy, platforms, args, dest: Path, what):  # noqa: ANN001
        self.downloads.append(list(args))
        for name, data in INDEX.items():
            (dest / name).write_bytes(data)
        return sorted(dest.glob("*.whl"))


@pytest.fixture
def deploy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / "ws"
    assert run_cli("init", str(root), "--local", "1").returncode == 0
    use_ports(root, 1)
    ssh_inventory(root, ["alpha"])
    log = sandbox(tmp_path, monkeypatch)
    index = FakeIndex()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(bundle, "agent_requirements",
                        lambda python_version=None: ("demo-dep>=1", "installer"))
    monkeypatch.setattr(bundle, "_pip_download", index.download)
    from flctl.deploy import engine

    def run() -> dict[str, str]:
        """Deploy to a fresh host; the wheels uploaded to it, name -> sha256."""
        shutil.rmtree(install.INSTALL_DIR, ignore_errors=True)
        log.clear()
        workspace = load_workspace(root)
        results = engine.deploy(workspace, list(workspace.inventory.hosts))
        host = results[0]
        assert host.status == "changed", host.error
        wheels = Path(install.WHEEL_DIR)
        return {Path(path).name: file_sha256(path) for kind, path in log
                if kind == "put" and Path(path).parent == wheels}

    return root, run, index


def locked(root: Path) -> dict[str, str]:
    targets = read_wheel_lock(load_workspace(root).paths).targets
    assert len(targets) == 1
    return {w.name: w.sha256 for w in next(iter(targets.values())).wheels}


def test_the_lock_names_every_shipped_wheel_with_its_sha256(deploy) -> None:  # noqa: ANN001
    root, run, index = deploy
    shipped = run()
    own = f"flctl-{flctl.__version__}-py3-none-any.whl"
    assert set(shipped) == {own, *INDEX}
    assert locked(root) == shipped
    assert len(index.downloads) == 1                   # resolved once, then pinned
    cache = Path(install.default_cache_dir())
    own_cached = list(cache.glob(f"own-*/{own}"))
    assert [p.parent.name.split("-")[1] for p in own_cached] == [flctl.__version__]
    assert file_sha256(own_cached[0]) == shipped[own]


def test_a_tampered_cached_wheel_is_fetched_again_not_shipped(deploy) -> None:  # noqa: ANN001
    root, run, index = deploy
    first = run()
    cached = Path(install.default_cache_dir()) / "files" / "demo_dep-1.0-py3-none-any.whl"
    data = bytearray(cached.read_bytes())
    data[:8] = b"TAMPERED"                        # same size: only the bytes differ
    cached.write_bytes(bytes(data))
    again = run()
    assert again == first == locked(root)
    assert file_sha256(cached) == first[cached.name]   # the cache holds the true wheel again
    refetch = index.downloads[-1]
    assert "--require-hashes" in refetch and len(index.downloads) == 2
