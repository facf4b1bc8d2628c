"""The offline install kit: tags, caching, and the host-side install script.

Preparing a bundle downloads wheels from the package index (allowed here:
it is what the operator's machine does); the cache below is shared by the
tests of a run and kept between runs, so only a first run downloads.
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

import flctl
from flctl.core.wheellock import LockedWheel, LockTarget, WheelLock, parse_lock
from flctl.deploy.bundle import (
    RUNTIME_PROJECTS,
    Bundle,
    BundleError,
    HostEnv,
    WheelFile,
    agent_requirements,
    bundle_digest,
    digest_path,
    host_tags,
    install_script,
    prepare_bundle,
    venv_python,
    wheels_dir,
)
from flctl.deploy.ownwheel import own_source, own_wheel, wheel_bytes
from flctl.errors import ConfigError, FlctlError

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(tempfile.gettempdir()) / "flctl-test-wheel-cache"
HERE_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
HERE_TAG = f"cp{sys.version_info.major}{sys.version_info.minor}"
HERE_ENV = HostEnv(platform.python_version(), platform.machine())


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def bundle() -> Bundle:
    if platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip(f"no manylinux wheels for {platform.machine()}")
    return prepare_bundle(HERE_ENV, CACHE)


# ---------------------------------------------------------------- host_tags


@pytest.mark.parametrize("version,machine,expected", [
    ("3.11.2", "x86_64", ("cp311", "manylinux2014_x86_64")),
    ("3.9.18", "aarch64", ("cp39", "manylinux2014_aarch64")),
    ("3.12.0rc1", "arm64", ("cp312", "manylinux2014_aarch64")),
    ("3.13", "AMD64", ("cp313", "manylinux2014_x86_64")),
])
def test_host_tags(version: str, machine: str, expected: tuple[str, str]) -> None:
    assert host_tags(version, machine) == expected


@pytest.mark.parametrize("version,machine,reason", [
    ("3.8.10", "x86_64", "too old"),
    ("2.7.18", "x86_64", "too old"),
    ("python", "x86_64", "not a Python version"),
    ("3.11.2", "armv7l", "architecture 'armv7l'"),
    ("3.11.2", "riscv64", "architecture"),
])
def test_host_tags_refuses(version: str, machine: str, reason: str) -> None:
    with pytest.raises(BundleError, match=reason) as caught:
        host_tags(version, machine)
    assert isinstance(caught.value, FlctlError)


@pytest.mark.parametrize("version, numpy", [("3.9.2", "1.23.2"), ("3.11.2", "1.23.2"),
                                           ("3.12.3", "1.26.0"), ("3.13.0", "2.1.0"),
                                           ("3.14.0", "2.3.2")])
def test_the_agent_gets_the_bounds_of_the_hosts_python(version: str, numpy: str) -> None:
    """A host's bundle is resolved with the lower bounds declared for its
    Python (the first numpy with wheels for it), not the operator's."""
    wanted = {r.split(">=")[0]: r.split(">=")[1] for r in agent_requirements(version)
              if ">=" in r}
    assert wanted["numpy"] == numpy
    assert set(wanted) == {"cryptography", "numpy", "PyYAML"}


# ------------------------------------------------------------ install_script


def fake_bundle(directory: Path, python_tag: str = HERE_TAG) -> Bundle:
    """A bundle of tiny stand-in wheels, enough to exercise the script's checks."""
    wheels = []
    for name in ("flctl-0.1.0-py3-none-any.whl", "installer-1.1.0-py3-none-any.whl",
                 "numpy-2.0.0-cp311-cp311-manylinux_2_17_x86_64.whl",
                 "PyYAML-6.0-cp311-cp311-manylinux2014_x86_64.whl"):
        path = directory / name
        path.write_bytes(name.encode() * 10)
        wheels.append(WheelFile(path, sha256_of(path), name))
    return Bundle(python_tag, "manylinux2014_x86_64", tuple(wheels), bundle_digest(wheels))


def host_dir_with(bundle: Bundle, root: Path) -> Path:
    """What deploy leaves on a host before running the script: the uploaded wheels."""
    wheels = Path(wheels_dir(str(root)))
    wheels.mkdir(parents=True)
    for wheel in bundle.wheels:
        shutil.copy(wheel.path, wheels / wheel.name)
    return wheels


def run_script(script: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env}, stdin=subprocess.DEVNULL)


def test_install_script_content(tmp_path: Path) -> None:
    bundle = fake_bundle(tmp_path)
    script = install_script(bundle, "/opt/flctl", "/usr/bin/python3")
    assert script.startswith("set -eu\n")
    assert "sha256sum -c" in script
    for wheel in bundle.wheels:
        assert f"{wheel.sha256}  {wheel.name}\n" in script
    install_lines = [line for line in script.replace("\\\n", " ").splitlines()
                     if "-m installer" in line]
    assert len(install_lines) == 1  # one offline install of exactly the bundle's wheels
    assert "pip" not in script.replace("--without-pip", "")  # nothing that could reach an index
    for wheel in bundle.wheels:
        if not wheel.name.startswith("installer-"):
            assert wheel.name in install_lines[0]
    assert bundle.digest in script and "bundle.digest" in script
    assert subprocess.run(["sh", "-n", "-c", script]).returncode == 0  # valid POSIX sh


def test_install_script_refuses_a_corrupt_upload(tmp_path: Path) -> None:
    (tmp_path / "local").mkdir()
    bundle = fake_bundle(tmp_path / "local")
    root = tmp_path / "host"
    wheels = host_dir_with(bundle, root)
    (wheels / "numpy-2.0.0-cp311-cp311-manylinux_2_17_x86_64.whl").write_bytes(b"tampered")
    done = run_script(install_script(bundle, str(root), sys.executable))
    assert done.returncode != 0
    assert "numpy-2.0.0-cp311-cp311-manylinux_2_17_x86_64.whl: FAILED" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("flctl bundle: sha256 mismatch")
    assert not (root / "venv").exists() and not Path(digest_path(str(root))).exists()


def test_install_script_refuses_a_missing_wheel(tmp_path: Path) -> None:
    (tmp_path / "local").mkdir()
    bundle = fake_bundle(tmp_path / "local")
    root = tmp_path / "host"
    wheels = host_dir_with(bundle, root)
    (wheels / "installer-1.1.0-py3-none-any.whl").unlink()
    done = run_script(install_script(bundle, str(root), sys.executable))
    assert done.returncode != 0 and "sha256 mismatch" in done.stderr
    assert not Path(digest_path(str(root))).exists()


def test_install_script_refuses_another_python(tmp_path: Path) -> None:
    (tmp_path / "local").mkdir()
    bundle = fake_bundle(tmp_path / "local", python_tag="cp39" if HERE_TAG != "cp39" else "cp310")
    root = tmp_path / "host"
    host_dir_with(bundle, root)
    done = run_script(install_script(bundle, str(root), sys.executable))
    assert done.returncode != 0
    assert f"is not CPython {bundle.python_tag}" in done.stderr
    assert not (root / "venv").exists()


def test_remote_layout() -> None:
    assert wheels_dir("/opt/flctl/") == "/opt/flctl/wheels"
    assert venv_python() == "/opt/flctl/venv/bin/python"
    assert digest_path("/srv/f") == "/srv/f/bundle.digest"


# ----------------------------------------------------------- prepare_bundle


def test_bundle_holds_wheels_for_the_target(bundle: Bundle) -> None:
    assert (bundle.python_tag, bundle.platform_tag) == host_tags(platform.python_version(),
                                                                 platform.machine())
    projects = {wheel.project for wheel in bundle.wheels}
    assert {"flctl", "installer", *(r.lower() for r in RUNTIME_PROJECTS)} <= projects
    assert not {"typer", "rich", "paramiko"} & projects  # CLI-only dependencies stay home
    for wheel in bundle.wheels:
        assert wheel.path.name == wheel.name and wheel.path.is_file()
        assert sha256_of(wheel.path) == wheel.sha256
        python, abi, plat = wheel.name[:-4].split("-")[-3:]
        assert python in (bundle.python_tag, "py3") or python.startswith(bundle.python_tag)
        assert plat == "any" or platform.machine() in plat and "manylinux" in plat
    assert bundle.digest == bundle_digest(bundle.wheels)
    # the version bounds are flctl's own (pyproject), not a second list
    numpy_bound = next(r for r in bundle.requirements if r.lower().startswith("numpy"))
    assert numpy_bound in {r.replace(" ", "").split(";")[0]
                           for r in metadata.requires("flctl") or ()}


def test_warm_prepare_is_fast_and_identical(bundle: Bundle) -> None:
    started = time.perf_counter()
    again = prepare_bundle(HERE_ENV, CACHE,
                           bundle.lock_target())
    elapsed = time.perf_counter() - started
    assert again == bundle
    assert elapsed < 0.5, f"warm prepare_bundle took {elapsed:.3f} s"


def test_the_lock_pins_what_is_shipped(bundle: Bundle, tmp_path: Path) -> None:
    """A locked target is fetched again exactly (pip checks every sha256 against the
    lock), even into an empty cache; a wheel that hashes differently is refused."""
    locked = bundle.lock_target()
    lock = WheelLock({bundle.target: locked})
    assert parse_lock(lock.render(), "wheels.lock") == lock
    empty = tmp_path / "empty-cache"
    again = prepare_bundle(HERE_ENV, empty, locked)
    assert {(w.name, w.sha256) for w in again.wheels} == {(w.name, w.sha256)
                                                          for w in bundle.wheels}
    numpy = next(w for w in locked.wheels if w.project == "numpy")
    forged = LockTarget(locked.requirements, tuple(
        LockedWheel(w.name, "0" * 64) if w is numpy else w for w in locked.wheels))
    with pytest.raises(BundleError, match="does not match the sha256 in wheels.lock"):
        prepare_bundle(HERE_ENV, tmp_path / "other",
                       forged)


def test_a_lock_for_other_requirements_is_resolved_again(bundle: Bundle) -> None:
    stale = LockTarget(("numpy",), bundle.lock_target().wheels)
    again = prepare_bundle(HERE_ENV, CACHE, stale)
    assert again.requirements == bundle.requirements != stale.requirements


@pytest.mark.parametrize("text,field", [
    ("[]", None),
    ('{"lock_version": 7, "targets": {}}', "lock_version"),
    ('{"lock_version": 1, "targets": {"cp311-x86_64": {"requirements": ["numpy"], '
     '"wheels": {"../../etc/passwd": "' + "a" * 64 + '"}}}}',
     "targets.cp311-x86_64.wheels.../../etc/passwd"),
    ('{"lock_version": 1, "targets": {"cp311-x86_64": {"requirements": ["numpy"], '
     '"wheels": {"numpy-2.0-cp311-cp311-manylinux2014_x86_64.whl": "beef"}}}}',
     "targets.cp311-x86_64.wheels.numpy-2.0-cp311-cp311-manylinux2014_x86_64.whl"),
])
def test_a_bad_lock_is_one_clear_error(text: str, field: str | None) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_lock(text, "ws/wheels.lock")
    assert caught.value.message.startswith("ws/wheels.lock")
    assert caught.value.field == field


# ------------------------------------------------------------- flctl's own wheel


def copy_package(target: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(Path(flctl.__file__).resolve().parent, target / "flctl", ignore=ignore)
    return target / "flctl"


def test_own_wheel_is_the_running_flctl_and_deterministic(tmp_path: Path) -> None:
    package = copy_package(tmp_path / "copy")
    source = own_source(package)
    first, again = wheel_bytes(source), wheel_bytes(source)
    digest = source.digest()
    assert first == again  # same files, same bytes, same sha256 in the lock
    with zipfile.ZipFile(io.BytesIO(first)) as archive:
        names = archive.namelist()
        record = archive.read(f"{source.dist_info}/RECORD").decode()
        entry_points = archive.read(f"{source.dist_info}/entry_points.txt").decode()
    assert "flctl/agent/main.py" in names and "flctl/data/digits.npz" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert "flctl-agent = flctl.agent.main:main" in entry_points
    assert all(line.split(",")[0] in names for line in record.splitlines())
    (package / "deploy" / "bundle.py").write_text("# changed\n", encoding="utf-8")
    changed = own_source(package)
    assert changed.digest() != digest and wheel_bytes(changed) != first
    path, sha = own_wheel(tmp_path / "cache", changed)
    assert sha == sha256_of(path) and path.name == f"flctl-{flctl.__version__}-py3-none-any.whl"


@pytest.mark.slow
def test_bundle_installs_offline_into_a_fresh_venv(bundle: Bundle, tmp_path: Path) -> None:
    root = tmp_path / "opt-flctl"
    host_dir_with(bundle, root)
    (Path(wheels_dir(str(root))) / "stale-0.1-py3-none-any.whl").write_bytes(b"old")
    script = install_script(bundle, str(root), sys.executable)
    # Any attempt to reach an index would hit a dead loopback port and fail.
    offline = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_FIND_LINKS": "/nonexistent",
               "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    done = run_script(script, **offline)
    assert done.returncode == 0, done.stderr
    assert Path(digest_path(str(root))).read_text().strip() == bundle.digest
    assert not (Path(wheels_dir(str(root))) / "stale-0.1-py3-none-any.whl").exists()
    python = venv_python(str(root))
    check = subprocess.run([python, "-c", "import flctl.agent.main, numpy, cryptography, yaml; "
                                          "import flctl; print(flctl.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith(str(root))  # the venv's copy, not this checkout
    again = run_script(script, **offline)  # a rerun builds a fresh venv and swaps it in
    assert again.returncode == 0, again.stderr
    assert not (root / "venv.new").exists() and not (root / "venv.old").exists()
    assert subprocess.run([python, "-c", "import flctl.agent.main"], cwd=tmp_path).returncode == 0
