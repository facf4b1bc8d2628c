"""The agent's offline install kit: wheels for one host Python and architecture.

Hosts have no internet, so the operator's machine (which can reach PyPI)
prepares everything a host needs: flctl's own wheel, built from the source
tree, and binary wheels of the agent's runtime dependencies for the host's
Python version and CPU. Deploy uploads them, and a POSIX sh script checks
their sha256 on the host before PyPA's `installer` unpacks them into a
fresh venv, so nothing on the host ever reaches out. (`installer` rather
than pip: it installs the fixed, already-resolved set of wheels in about
0.7 s where pip needs 3-7 s, and deploy runs it on every host at once.)

Both halves are cached under the caller's cache dir, keyed so that a warm
prepare touches neither the network nor a build: dependency wheels by
(Python X.Y, architecture, requirement list), flctl's wheel by a hash of
its source files. A bundle's digest names its exact contents, so deploy
can tell from one small file on the host whether it is already installed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flctl.errors import FlctlError

# What the agent imports on a host (the CLI's typer/rich/paramiko stay home).
RUNTIME_REQUIREMENTS: tuple[str, ...] = ("numpy", "cryptography", "PyYAML")
# Shipped so that the venv never needs ensurepip, which Debian splits out into
# python3-venv: `python3 -m venv --without-pip` works on every CPython >= 3.3,
# and `installer` runs straight from its wheel on sys.path.
BOOTSTRAP_REQUIREMENTS: tuple[str, ...] = ("installer",)
MIN_PYTHON = (3, 9)
# Oldest glibc first; 2_28 covers RHEL 8, Debian 10, Ubuntu 20.04 and newer.
MANYLINUX_TAGS = ("manylinux2014", "manylinux_2_17", "manylinux_2_24", "manylinux_2_26",
                  "manylinux_2_27", "manylinux_2_28")
ARCHITECTURES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
# Files that go into flctl's wheel besides flctl/: their change means a new wheel.
PROJECT_FILES = ("pyproject.toml", "setup.cfg", "setup.py", "MANIFEST.in", "README.md",
                 "README.rst", "LICENSE", "LICENSE.txt")
BUILD_HISTORY = 3           # flctl wheels kept in the cache (for deploys still uploading)
PIP_TIMEOUT = 900.0
# Fixed zip timestamps (1980-01-01) so the same source makes the same wheel bytes.
SOURCE_DATE_EPOCH = "315532800"


class BundleError(FlctlError):
    """The wheels for a host could not be prepared."""


@dataclass(frozen=True)
class WheelFile:
    path: Path
    sha256: str
    name: str            # the wheel's file name, which is also its name on the host

    @property
    def project(self) -> str:
        """Normalized distribution name ("pyyaml" for PyYAML-6.0-...whl)."""
        return re.sub(r"[-_.]+", "-", self.name.split("-", 1)[0]).lower()


@dataclass(frozen=True)
class Bundle:
    python_tag: str      # "cp311"
    platform_tag: str    # "manylinux2014_x86_64"
    wheels: tuple[WheelFile, ...]
    digest: str          # sha256 over the sorted (name, sha256) pairs

    def wheel(self, project: str) -> WheelFile:
        wanted = re.sub(r"[-_.]+", "-", project).lower()
        for wheel in self.wheels:
            if wheel.project == wanted:
                return wheel
        raise BundleError(f"bundle has no wheel for {project}")


def wheels_dir(remote_dir: str = "/opt/flctl") -> str:
    """Where deploy uploads the bundle's wheels on the host (one file per WheelFile.name)."""
    return f"{remote_dir.rstrip('/')}/wheels"


def venv_python(remote_dir: str = "/opt/flctl") -> str:
    """The agent's interpreter on the host once install_script has run."""
    return f"{remote_dir.rstrip('/')}/venv/bin/python"


def digest_path(remote_dir: str = "/opt/flctl") -> str:
    """The file holding the installed bundle's digest; compare it to Bundle.digest."""
    return f"{remote_dir.rstrip('/')}/bundle.digest"


# ------------------------------------------------------------------- tags


def _python_xy(python_version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", python_version.strip())
    if not match:
        raise BundleError(f"not a Python version: {python_version!r}")
    major, minor = int(match.group(1)), int(match.group(2))
    if (major, minor) < MIN_PYTHON:
        raise BundleError(f"Python {major}.{minor} is too old for the agent "
                          f"(needs {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer)")
    return major, minor


def _architecture(machine: str) -> str:
    arch = ARCHITECTURES.get(machine.strip().lower())
    if arch is None:
        raise BundleError(f"no wheels for CPU architecture {machine!r} "
                          f"(supported: {', '.join(sorted(set(ARCHITECTURES.values())))})")
    return arch


def host_tags(python_version: str, machine: str) -> tuple[str, str]:
    """("3.11.2", "x86_64") -> ("cp311", "manylinux2014_x86_64"); `uname -m` names accepted."""
    major, minor = _python_xy(python_version)
    return f"cp{major}{minor}", f"manylinux2014_{_architecture(machine)}"


# --------------------------------------------------------------- preparing


def prepare_bundle(python_version: str, machine: str, cache_dir: Path,
                   project_root: Path | None = None) -> Bundle:
    """The wheels for a host running CPython `python_version` on `machine`.

    Downloads (from the operator's package index) and builds only what the
    cache lacks; a warm call reads a few small files and hashes the source.
    """
    python_tag, platform_tag = host_tags(python_version, machine)
    major, minor = _python_xy(python_version)
    arch = _architecture(machine)
    root = _project_root(project_root)
    source_files = _source_files(root)
    source_key = _source_digest(root, source_files)
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / ".lock"):  # parallel deploys: one builds, the others wait and reuse
        deps = _dependency_wheels(cache, f"{major}.{minor}", python_tag, arch)
        own = _flctl_wheel(cache, root, source_files, source_key)
    wheels = tuple(sorted((own, *deps), key=lambda w: w.name))
    return Bundle(python_tag, platform_tag, wheels, bundle_digest(wheels))


def bundle_digest(wheels: tuple[WheelFile, ...] | list[WheelFile]) -> str:
    pairs = sorted((wheel.name, wheel.sha256) for wheel in wheels)
    return hashlib.sha256("".join(f"{name}\0{sha}\n" for name, sha in pairs).encode()).hexdigest()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _project_root(project_root: Path | None) -> Path:
    if project_root is not None:
        root = Path(project_root).resolve()
        if not (root / "pyproject.toml").is_file() or not (root / "flctl").is_dir():
            raise BundleError(f"{root} is not a flctl source tree (no pyproject.toml "
                              "and flctl/)")
        return root
    import flctl

    package = Path(flctl.__file__).resolve().parent
    root = package.parent
    if (package.parent / "pyproject.toml").is_file():
        return root
    raise BundleError(
        "flctl is installed without its source tree, and hosts without internet need "
        "flctl's wheel built from it: install flctl from a checkout (pip install -e DIR) "
        "and deploy from there"
    )


def _source_files(root: Path) -> list[str]:
    """The files flctl's wheel is made of, relative to `root`, sorted."""
    found = [name for name in PROJECT_FILES if (root / name).is_file()]
    for path in (root / "flctl").rglob("*"):
        relative = path.relative_to(root)
        parts = relative.parts
        if (path.is_dir() or "__pycache__" in parts
                or any(part.endswith(".egg-info") for part in parts)
                or path.suffix in (".pyc", ".pyo")):
            continue
        found.append(relative.as_posix())
    return sorted(found)


def _source_digest(root: Path, files: list[str]) -> str:
    digest = hashlib.sha256()
    for name in files:
        data = (root / name).read_bytes()
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_manifest(directory: Path) -> dict[str, object] | None:
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _wheels_from_manifest(directory: Path, manifest: dict[str, object]) -> list[WheelFile] | None:
    """The manifest's wheels if they are all still there with their recorded sizes."""
    listed = manifest.get("wheels")
    if not isinstance(listed, dict) or not listed:
        return None
    wheels = []
    for name, record in listed.items():
        path = directory / name
        try:
            sha, size = record
            if path.stat().st_size != size:
                return None
        except (OSError, TypeError, ValueError):
            return None
        wheels.append(WheelFile(path, sha, name))
    return wheels


def _publish(staging: Path, final: Path, manifest: dict[str, object]) -> None:
    """Write the manifest last and swap the directory in, so a crash never leaves a
    half-filled cache entry that looks complete."""
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)


def _run_pip(args: list[str], what: str, env: dict[str, str] | None = None) -> None:
    command = [sys.executable, "-m", "pip", *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT,
                              stdin=subprocess.DEVNULL, env=env)
    except subprocess.TimeoutExpired:
        raise BundleError(f"{what}: pip took longer than {PIP_TIMEOUT:g} s") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines()
                 if line.strip() and not line.startswith("WARNING")]
        reason = lines[-1].strip() if lines else f"pip exited with {done.returncode}"
        raise BundleError(f"{what}: {reason}")


def _dependency_wheels(cache: Path, python_xy: str, python_tag: str,
                       arch: str) -> list[WheelFile]:
    requirements = sorted(RUNTIME_REQUIREMENTS + BOOTSTRAP_REQUIREMENTS)
    platforms = [f"{tag}_{arch}" for tag in MANYLINUX_TAGS]
    final = cache / f"deps-{python_tag}-{arch}"
    manifest = _read_manifest(final)
    if manifest is not None and manifest.get("requirements") == requirements \
            and manifest.get("platforms") == platforms:
        wheels = _wheels_from_manifest(final, manifest)
        if wheels is not None:
            return wheels
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=cache))
    try:
        platform_args = [arg for platform in platforms for arg in ("--platform", platform)]
        _run_pip(["download", "--only-binary=:all:", "--disable-pip-version-check",
                  "--no-input", "--python-version", python_xy, "--implementation", "cp",
                  *platform_args, "--dest", str(staging), *requirements],
                 f"downloading wheels for CPython {python_xy} on {arch}")
        files = sorted(path for path in staging.iterdir() if path.suffix == ".whl")
        if not files:
            raise BundleError(f"pip downloaded no wheels for CPython {python_xy} on {arch}")
        manifest = {
            "requirements": requirements,
            "platforms": platforms,
            "wheels": {p.name: [_file_sha256(p), p.stat().st_size] for p in files},
        }
        _publish(staging, final, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    wheels = _wheels_from_manifest(final, manifest)
    assert wheels is not None
    return wheels


def _flctl_wheel(cache: Path, root: Path, files: list[str], source_key: str) -> WheelFile:
    final = cache / f"flctl-{source_key[:24]}"
    manifest = _read_manifest(final)
    if manifest is not None and manifest.get("source") == source_key:
        wheels = _wheels_from_manifest(final, manifest)
        if wheels is not None and len(wheels) == 1:
            return wheels[0]
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=cache))
    try:
        with tempfile.TemporaryDirectory(prefix="flctl-wheel-src-") as tree:
            # Build from a copy of exactly the hashed files: the wheel then matches its key,
            # and setuptools' build/ and egg-info never land in the user's checkout.
            for name in files:
                target = Path(tree) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / name, target)
            _build_wheel(Path(tree), staging)
        built = [p for p in staging.iterdir() if p.suffix == ".whl"]
        if len(built) != 1:
            raise BundleError(f"building flctl's wheel made {len(built)} wheels, expected 1")
        manifest = {
            "source": source_key,
            "wheels": {built[0].name: [_file_sha256(built[0]), built[0].stat().st_size]},
        }
        _publish(staging, final, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _prune_builds(cache, keep=final)
    wheels = _wheels_from_manifest(final, manifest)
    assert wheels is not None
    return wheels[0]


def _can_build_without_isolation() -> bool:
    """True when this interpreter's setuptools can build a wheel by itself (no download)."""
    try:
        import setuptools
    except ImportError:
        return False
    version = tuple(int(p) for p in re.findall(r"\d+", setuptools.__version__)[:2])
    if version >= (70, 1):  # bdist_wheel moved into setuptools
        return True
    try:
        import wheel  # noqa: F401
    except ImportError:
        return False
    return version >= (61, 0)


def _build_wheel(tree: Path, out: Path) -> None:
    env = dict(os.environ, SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH)
    isolation = [] if not _can_build_without_isolation() else ["--no-build-isolation"]
    _run_pip(["wheel", "--no-deps", "--disable-pip-version-check", "--no-input", *isolation,
              "--wheel-dir", str(out), str(tree)], "building flctl's wheel", env)


def _prune_builds(cache: Path, keep: Path) -> None:
    builds = sorted((p for p in cache.glob("flctl-*") if p.is_dir() and p != keep),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in builds[BUILD_HISTORY - 1:]:
        shutil.rmtree(stale, ignore_errors=True)


# ------------------------------------------------------------------ on the host


def install_script(bundle: Bundle, remote_dir: str = "/opt/flctl", python: str = "python3") -> str:
    """A POSIX sh script that installs `bundle` from `wheels_dir(remote_dir)` on a host.

    It refuses to install anything unless every wheel's sha256 matches,
    builds a fresh venv beside the current one and swaps it in with a
    rename (an interrupted install leaves the old agent software intact,
    and no file of an older version lingers), and writes the digest last:
    a host with the digest file has exactly this bundle.
    """
    installer = bundle.wheel("installer")
    to_install = [w for w in bundle.wheels if w is not installer]
    q = shlex.quote
    checksums = "".join(f"{w.sha256}  {w.name}\n" for w in bundle.wheels)
    keep = "|".join(q(w.name) for w in bundle.wheels)
    wheel_paths = " ".join(f'"$wheels"/{q(w.name)}' for w in to_install)
    return f"""\
set -eu
umask 022
fail() {{ echo "flctl bundle: $*" >&2; exit 3; }}
dir={q(remote_dir.rstrip('/'))}
wheels="$dir/wheels"
venv="$dir/venv"
python={q(python)}
[ -d "$wheels" ] || fail "$wheels is missing: upload the bundle's wheels first"
cd "$wheels"
if ! sha256sum -c --quiet >&2 <<'FLCTL_SHA256'
{checksums}FLCTL_SHA256
then
    fail "sha256 mismatch in $wheels: an upload is corrupt or incomplete; deploy again"
fi
for file in *.whl; do
    case "$file" in {keep}) ;; *) rm -f -- "$file" ;; esac
done
tag_of() {{ "$1" -c 'import sys; print("cp%d%d" % sys.version_info[:2])' 2>/dev/null || true; }}
[ "$(tag_of "$python")" = {q(bundle.python_tag)} ] || \\
    fail "$python is not CPython {bundle.python_tag} (the bundle was prepared for it)"
rm -rf -- "$venv.new"
"$python" -m venv --without-pip "$venv.new" || fail "$python -m venv failed"
# Every wheel's sha256 was checked above, so installer's per-file RECORD
# re-hash would only repeat that (and costs ~0.3 s a host).
PYTHONPATH="$wheels"/{q(installer.name)} "$venv.new/bin/python" -m installer \\
    --no-compile-bytecode --validate-record none {wheel_paths} >&2 \\
    || fail "installing the wheels failed"
# A venv is found through the pyvenv.cfg beside its bin/, so it may move;
# only its activate scripts (unused here) remember the old name.
rm -rf -- "$venv.old"
[ -d "$venv" ] && mv -- "$venv" "$venv.old"
mv -- "$venv.new" "$venv"
rm -rf -- "$venv.old"
printf '%s\\n' {q(bundle.digest)} > "$dir/bundle.digest.tmp"
mv -f -- "$dir/bundle.digest.tmp" "$dir/bundle.digest"
echo "flctl bundle {bundle.digest[:12]} installed in $venv"
"""
