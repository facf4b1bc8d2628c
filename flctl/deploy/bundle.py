"""The agent's offline install kit: wheels for one host Python and architecture.

Hosts have no internet, so the operator's machine (which can reach its
package index) prepares everything a host needs: flctl's own wheel, made
from the flctl that is running (flctl.deploy.ownwheel), and binary wheels
of the agent's runtime dependencies for the host's Python version and CPU.
Which wheels those are is pinned, with their sha256, in the workspace's
wheel lock (flctl.core.wheellock): the first deploy to a new target
resolves and records them, later ones fetch exactly those again (pip
checks the hashes) and refuse anything else. Deploy uploads them, and a
POSIX sh script checks their sha256 on the host before PyPA's `installer`
unpacks them into a fresh venv, so nothing on the host ever reaches out.
(`installer` rather than pip: it installs the fixed, already-resolved set
of wheels in about 0.7 s where pip needs 3-7 s, and deploy runs it on every
host at once.)

Downloaded wheels are cached under their file names, which carry project
and version, each beside a note of its sha256 and size; a warm prepare
touches neither the network nor a build. A bundle's digest names its exact
contents, so deploy can tell from one small file on the host whether it is
already installed.
"""

from __future__ import annotations

import fcntl
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

from flctl.core.facts import MIN_PYTHON
from flctl.core.fsutil import atomic_write, file_sha256, sha256_hex
from flctl.core.requirements import name_of, satisfied_by, with_companions
from flctl.core.wheellock import LockedWheel, LockTarget, normalize_project, target_key
from flctl.deploy.ownwheel import DISTRIBUTION, own_wheel
from flctl.errors import FlctlError

# What the agent imports on a host (the CLI's typer/rich/paramiko stay home);
# their version bounds come from flctl's own metadata.
RUNTIME_PROJECTS: tuple[str, ...] = ("numpy", "cryptography", "PyYAML")
# Shipped so that the venv never needs ensurepip, which Debian splits out into
# python3-venv: `python3 -m venv --without-pip` works on every CPython >= 3.3,
# and `installer` runs straight from its wheel on sys.path.
BOOTSTRAP_REQUIREMENTS: tuple[str, ...] = ("installer",)
# Oldest glibc first; 2_28 covers RHEL 8, Debian 10, Ubuntu 20.04 and newer.
MANYLINUX_TAGS = ("manylinux2014", "manylinux_2_17", "manylinux_2_24", "manylinux_2_26",
                  "manylinux_2_27", "manylinux_2_28")
ARCHITECTURES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
PIP_TIMEOUT = 900.0


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
        return normalize_project(self.name.split("-", 1)[0])


@dataclass(frozen=True)
class Bundle:
    python_tag: str      # "cp311"
    platform_tag: str    # "manylinux2014_x86_64"
    wheels: tuple[WheelFile, ...]
    digest: str          # sha256 over the sorted (name, sha256) pairs, and `layered`
    requirements: tuple[str, ...] = ()
    layered: bool = False                 # the venv sees the host interpreter's packages
    provided: tuple[tuple[str, str], ...] = ()   # ... these of them, not shipped

    @property
    def target(self) -> str:
        """The wheel lock's key for this bundle ("cp311-x86_64")."""
        return target_key(self.python_tag, self.platform_tag.split("_", 1)[1],
                          self.provided if self.layered else None)

    def wheel(self, project: str) -> WheelFile:
        wanted = normalize_project(project)
        for wheel in self.wheels:
            if wheel.project == wanted:
                return wheel
        raise BundleError(f"bundle has no wheel for {project}")

    def lock_target(self) -> LockTarget:
        return LockTarget(self.requirements,
                          tuple(LockedWheel(w.name, w.sha256) for w in self.wheels),
                          self.provided)


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


def agent_requirements(python_version: str | None = None) -> tuple[str, ...]:
    """What the agent needs on a host running `python_version` (default: this
    interpreter's), with the version bounds flctl itself declares. A bound
    may depend on the Python (numpy's first wheels for 3.13 are 2.1.0), so
    markers are evaluated for the host's; extras' lines never apply."""
    wanted = {normalize_project(p) for p in RUNTIME_PROJECTS}
    environment = {"extra": ""}
    if python_version is not None:
        major, minor = _python_xy(python_version)
        environment.update(python_version=f"{major}.{minor}",
                           python_full_version=python_version)
    found: dict[str, str] = {}
    for line in metadata.requires(DISTRIBUTION) or ():
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        name = normalize_project(requirement.name)
        if name in wanted:
            found[name] = f"{requirement.name}{requirement.specifier}"
    missing = sorted(wanted - set(found))
    if missing:
        raise BundleError(f"flctl's metadata does not require {', '.join(missing)}: "
                          "reinstall flctl")
    return tuple(sorted(found.values(), key=str.lower)) + BOOTSTRAP_REQUIREMENTS


# --------------------------------------------------------------- preparing


def all_requirements(task_requirements: Sequence[str] = (),
                     python_version: str | None = None) -> tuple[str, ...]:
    """Everything an agent needs: its own and the task's requirements, with their
    companions (ml_dtypes beside torch)."""
    found = list(agent_requirements(python_version)) + with_companions(task_requirements)
    return tuple(sorted(set(found), key=str.lower))


@dataclass(frozen=True)
class HostEnv:
    """What a host's agent environment is built from.

    `layered`: the venv sees the host interpreter's own packages (the
    inventory sets `python:` for the host); `provided` lists those of the
    requirements' projects it has, (name, version). `extra` are the task's
    requirements (tasks/requirements.txt).
    """

    python_version: str
    machine: str
    layered: bool = False
    provided: tuple[tuple[str, str], ...] = ()
    extra: tuple[str, ...] = ()

    def requirements(self) -> tuple[str, ...]:
        return all_requirements(self.extra, self.python_version)

    @property
    def target(self) -> str:
        major, minor = _python_xy(self.python_version)
        return target_key(f"cp{major}{minor}", _architecture(self.machine),
                          self.provided if self.layered else None)


def prepare_bundle(env: HostEnv, cache_dir: Path, locked: LockTarget | None = None) -> Bundle:
    """The wheels for a host as `env` describes it.

    With `locked` (this target's entry of the workspace's wheel lock, made
    for the same requirements and host packages) exactly those wheels are
    used, fetched again only if the cache lacks them, and refused unless
    their sha256 matches. Without it they are resolved from the package
    index: around what the host's interpreter already has, for a layered
    agent (its versions are pinned as constraints, and neither it nor
    anything it satisfies is shipped). A warm call reads the package files
    and a few small notes, and hashes the cached wheels.
    """
    python_tag, platform_tag = host_tags(env.python_version, env.machine)
    major, minor = _python_xy(env.python_version)
    arch = _architecture(env.machine)
    requirements = env.requirements()
    provided = dict(env.provided) if env.layered else {}
    needed = [r for r in requirements if r in BOOTSTRAP_REQUIREMENTS
              or not satisfied_by(r, provided)]
    replaced = {name_of(r) for r in needed}
    kept = {name: version for name, version in provided.items() if name not in replaced}
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    own_path, own_sha = own_wheel(cache)
    platforms = [f"{tag}_{arch}" for tag in MANYLINUX_TAGS]
    with _locked(cache / ".lock"):  # parallel deploys: one downloads, the others reuse
        if locked is not None and tuple(locked.requirements) == requirements \
                and dict(locked.provided) == kept:
            # flctl's own wheel is not held to the lock: it is rebuilt from the flctl
            # running this deploy, whose bytes rightly change with any edit or
            # reinstall, and a tampered install would run tampered checks anyway;
            # the lock records it so every host of a run gets the same bytes.
            deps = _fetch_pinned(cache, f"{major}.{minor}", platforms,
                                 locked.without(DISTRIBUTION))
        else:
            deps = [w for w in _resolve(cache, f"{major}.{minor}", platforms, needed, kept)
                    if w.project not in kept]
    own = WheelFile(own_path, own_sha, own_path.name)
    wheels = tuple(sorted((own, *deps), key=lambda w: w.name))
    return Bundle(python_tag, platform_tag, wheels,
                  bundle_digest(wheels, env.layered), requirements, env.layered,
                  tuple(sorted(kept.items())))


def bundle_digest(wheels: tuple[WheelFile, ...] | list[WheelFile], layered: bool = False) -> str:
    """Names the installed environment: its wheels and whether it sees the host's
    own packages (a change of either reinstalls)."""
    pairs = sorted((wheel.name, wheel.sha256) for wheel in wheels)
    listing = "".join(f"{name}\0{sha}\n" for name, sha in pairs)
    return sha256_hex(listing + ("layered\n" if layered else ""))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _files_dir(cache: Path) -> Path:
    return cache / "files"


def _cached(cache: Path, name: str, sha256: str | None = None) -> WheelFile | None:
    """A cached wheel whose bytes still hash to its note (and to `sha256`); None
    sends it to be fetched again. The bytes are hashed every time, not trusted to
    the note: a changed file of the same size would otherwise be shipped (a few
    ms for all of a bundle's wheels)."""
    path = _files_dir(cache) / name
    try:
        sha, size = (path.parent / f"{name}.sha256").read_text().split()
        if path.stat().st_size != int(size) or file_sha256(path) != sha:
            return None
    except (OSError, ValueError):
        return None
    if sha256 is not None and sha != sha256:
        return None
    return WheelFile(path, sha, name)


def _keep(cache: Path, downloaded: Path) -> WheelFile:
    """Move a downloaded wheel into the cache with its note (note last)."""
    sha = file_sha256(downloaded)
    target = _files_dir(cache) / downloaded.name
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(downloaded, target)
    atomic_write(target.parent / f"{downloaded.name}.sha256", f"{sha} {target.stat().st_size}\n")
    return WheelFile(target, sha, target.name)


def _run_pip(args: list[str], what: str) -> None:
    command = [sys.executable, "-m", "pip", *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BundleError(f"{what}: pip took longer than {PIP_TIMEOUT:g} s") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines()
                 if line.strip() and not line.startswith("WARNING")]
        hashes = [line.strip() for line in lines if "sha256" in line and "Got" in line]
        reason = lines[-1].strip() if lines else f"pip exited with {done.returncode}"
        if hashes or "HASHES" in done.stderr:
            reason = ("a wheel from the package index does not match the sha256 in "
                      "wheels.lock; refusing it (remove its target from wheels.lock "
                      "only if you trust the new file)")
        raise BundleError(f"{what}: {reason}")


def _pip_download(python_xy: str, platforms: Sequence[str], args: Sequence[str],
                  dest: Path, what: str) -> list[Path]:
    platform_args = [arg for platform in platforms for arg in ("--platform", platform)]
    _run_pip(["download", "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
              "--python-version", python_xy, "--implementation", "cp", *platform_args,
              "--dest", str(dest), *args], what)
    return sorted(path for path in dest.iterdir() if path.suffix == ".whl")


def _resolve(cache: Path, python_xy: str, platforms: Sequence[str],
             requirements: Sequence[str],
             pinned: Mapping[str, str] | None = None) -> list[WheelFile]:
    """Resolve `requirements` on the package index, keeping `pinned` projects at
    those versions (what a host's interpreter has); the chosen wheels go into the
    cache."""
    staging = Path(tempfile.mkdtemp(prefix=".resolve-", dir=cache))
    what = f"downloading wheels for CPython {python_xy} on {platforms[0].split('_', 1)[1]}"
    try:
        args = list(requirements)
        if pinned:
            constraints = staging / "host-packages.txt"
            constraints.write_text("".join(f"{name}=={version}\n"
                                           for name, version in sorted(pinned.items())))
            args += ["-c", str(constraints)]
        files = _pip_download(python_xy, platforms, args, staging, what)
        if not files:
            raise BundleError(f"{what}: pip downloaded no wheels")
        return [_keep(cache, path) for path in files]
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fetch_pinned(cache: Path, python_xy: str, platforms: Sequence[str],
                  locked: Sequence[LockedWheel]) -> list[WheelFile]:
    """Exactly the locked wheels: from the cache, else from the index with pip
    checking each sha256 (--require-hashes); nothing else is taken."""
    found = {w.name: _cached(cache, w.name, w.sha256) for w in locked}
    missing = [w for w in locked if found[w.name] is None]
    if missing:
        staging = Path(tempfile.mkdtemp(prefix=".pinned-", dir=cache))
        try:
            requirements = staging / "requirements.txt"
            requirements.write_text("".join(f"{w.project}=={w.version} --hash=sha256:{w.sha256}\n"
                                            for w in missing))
            what = f"fetching the locked wheels for CPython {python_xy}"
            files = _pip_download(python_xy, platforms,
                                  ["--no-deps", "--require-hashes", "-r", str(requirements)],
                                  staging, what)
            for path in files:
                kept = _keep(cache, path)
                if kept.name in found:
                    found[kept.name] = kept
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    absent = sorted(name for name, wheel in found.items() if wheel is None)
    if absent:
        raise BundleError(f"the package index no longer offers the locked wheel(s) "
                          f"{', '.join(absent)}; remove the target from wheels.lock to "
                          "resolve it again")
    return [wheel for wheel in found.values() if wheel is not None]


# ------------------------------------------------------------------ on the host


# A layered venv sees the packages of the interpreter it is built on, after
# its own. `venv --system-site-packages` would not do: built from a venv's
# (or conda env's) python, it sees the base installation instead, not that
# env's torch. So the venv gets a .pth that adds the interpreter's own site
# directories (their .pth files included), as that interpreter lists them.
_LAYER_SCRIPT = """\
site_dir=$("$venv.new/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
"$python" - > "$site_dir/flctl-host-packages.pth" <<'FLCTL_LAYER' || fail "cannot list $python's packages"
import os, site, sys
user = site.getusersitepackages() if site.ENABLE_USER_SITE else None
dirs = [p for p in sys.path if p != user and os.path.isdir(p)
        and os.path.basename(p.rstrip("/")) in ("site-packages", "dist-packages")]
print("import site; " + "; ".join("site.addsitedir(%r)" % p for p in dirs))
FLCTL_LAYER
"""


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
{_LAYER_SCRIPT if bundle.layered else ""}# Every wheel's sha256 was checked above, so installer's per-file RECORD
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
