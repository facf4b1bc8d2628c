"""flctl's own wheel, made from the flctl that is running.

Hosts have no internet and must run the same flctl as the operator, so
deploy ships flctl itself as a wheel. It is assembled from the package
files this process imported and the installed distribution's own metadata
(METADATA, entry points): an installed flctl (`pip install flctl`, pipx)
deploys exactly as a checkout does, with no source tree and no build
backend. flctl is pure Python, so one py3-none-any wheel fits every host.

The archive is deterministic (sorted entries, fixed timestamps, no
__pycache__), so the same files always make the same bytes and the same
sha256 in the workspace's wheel lock; a changed file makes a new one.
"""

from __future__ import annotations

import base64
import hashlib
import io
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from flctl.core.fsutil import atomic_write, file_sha256
from flctl.errors import FlctlError

DISTRIBUTION = "flctl"
# 1980-01-01, the earliest time a zip entry can carry.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
SKIPPED_SUFFIXES = (".pyc", ".pyo")
WHEEL_FILE = "Wheel-Version: 1.0\nGenerator: flctl\nRoot-Is-Purelib: true\nTag: py3-none-any\n"


class OwnWheelError(FlctlError):
    """flctl cannot package itself for the hosts."""


@dataclass(frozen=True)
class OwnSource:
    """What flctl's wheel is made of: package files and distribution metadata."""

    version: str
    files: tuple[tuple[str, Path], ...]   # (name inside the wheel, file here)
    metadata_text: str
    entry_points_text: str

    @property
    def wheel_name(self) -> str:
        return f"{DISTRIBUTION}-{self.version}-py3-none-any.whl"

    @property
    def dist_info(self) -> str:
        return f"{DISTRIBUTION}-{self.version}.dist-info"

    def digest(self) -> str:
        """sha256 over every input of the wheel: equal digests, equal wheels."""
        h = hashlib.sha256()
        for name, path in self.files:
            data = path.read_bytes()
            h.update(f"{name}\0{len(data)}\0".encode())
            h.update(data)
        for text in (self.metadata_text, self.entry_points_text):
            h.update(text.encode())
            h.update(b"\0")
        return h.hexdigest()


def own_source(package_dir: Path | None = None) -> OwnSource:
    """The running flctl: its package directory and its installed metadata."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise OwnWheelError(
            "flctl has no installed distribution metadata (is it run from a source tree "
            "on PYTHONPATH?): install it with `pip install flctl` or `pip install DIR`"
        ) from None
    if package_dir is None:
        import flctl

        package_dir = Path(flctl.__file__).resolve().parent
    if not (package_dir / "__init__.py").is_file():
        raise OwnWheelError(f"{package_dir} is not an importable flctl package directory")
    files = []
    for path in sorted(package_dir.rglob("*")):
        relative = path.relative_to(package_dir)
        if path.is_dir() or "__pycache__" in relative.parts or path.suffix in SKIPPED_SUFFIXES:
            continue
        files.append((f"{DISTRIBUTION}/{relative.as_posix()}", path))
    # A dist-info holds METADATA; an egg-info (a setuptools checkout) the same text as PKG-INFO.
    metadata_text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
    if not metadata_text:
        raise OwnWheelError("flctl's installed distribution has no METADATA")
    return OwnSource(dist.version, tuple(files), metadata_text,
                     dist.read_text("entry_points.txt") or "")


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"sha256={digest.decode('ascii')}"


def wheel_bytes(source: OwnSource) -> bytes:
    """The wheel for `source`, as bytes (a few hundred KB)."""
    entries: list[tuple[str, bytes]] = [(name, path.read_bytes()) for name, path in source.files]
    entries.append((f"{source.dist_info}/METADATA", source.metadata_text.encode()))
    entries.append((f"{source.dist_info}/WHEEL", WHEEL_FILE.encode()))
    if source.entry_points_text:
        entries.append((f"{source.dist_info}/entry_points.txt",
                        source.entry_points_text.encode()))
    record_name = f"{source.dist_info}/RECORD"
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in entries)
    entries.append((record_name, (record + f"{record_name},,\n").encode()))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            info = zipfile.ZipInfo(name, ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return buffer.getvalue()


def own_wheel(cache_dir: Path, source: OwnSource | None = None) -> tuple[Path, str]:
    """flctl's wheel in `cache_dir` (made if missing) and its sha256.

    Cached under the version and a digest of its inputs, so a warm call
    reads the package files once and writes nothing.
    """
    source = source or own_source()
    folder = Path(cache_dir) / f"own-{source.version}-{source.digest()[:16]}"
    path = folder / source.wheel_name
    if not path.is_file():
        atomic_write(path, wheel_bytes(source))
    return path, file_sha256(path)
