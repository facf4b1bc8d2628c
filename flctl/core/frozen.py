"""The frozen part of a model: what every host loads from its own disk.

A task may federate only part of its model (a classifier head, a LoRA
adapter) and keep the rest (a pretrained backbone) frozen. The frozen part
never travels in rounds: each host reads it from a file or folder (placed
there by the user, `frozen_path` in the inventory, or shipped once by
deploy from the workspace's `frozen/`). The federation only works if every
host holds the same bytes, so hosts report the part's digest and the
coordinator runs with the hosts that agree (the run's reference: the
checkpoint's on resume, `training.frozen_sha256` when pinned, else the
digest most hosts report).

The digest is the sha256 of one line `<name>\\t<sha256 of the file>` per
regular file, in sorted order (a folder's files by relative path, a single
file by its own name), so changing, adding or renaming a file changes it,
and a file placed by hand agrees with the same file shipped in frozen/.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from flctl.core.fsutil import file_sha256

SHA256_HEX = 64


@dataclass(frozen=True)
class FrozenPart:
    sha256: str
    bytes: int
    files: int

    def as_dict(self) -> dict[str, object]:
        return {"sha256": self.sha256, "bytes": self.bytes, "files": self.files}


def frozen_files(path: Path) -> list[Path]:
    """The regular files that make up the part: `path` itself, or every file
    under the folder (caches such as __pycache__ left out), sorted."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a file nor a folder")
    return sorted(p for p in path.rglob("*")
                  if p.is_file() and "__pycache__" not in p.relative_to(path).parts)


def signature(path: Path) -> tuple:
    """What changes when the part's bytes may have: each file's name, size,
    modification time and inode (a digest is recomputed only then)."""
    stats = []
    for file in frozen_files(path):
        st = file.stat()
        stats.append((str(file), st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(stats)


def digest(path: Path) -> FrozenPart:
    path = Path(path)
    files = frozen_files(path)
    total = sum(f.stat().st_size for f in files)
    listing = hashlib.sha256()
    for file in files:
        name = file.name if file == path else file.relative_to(path).as_posix()
        listing.update(f"{name}\t{file_sha256(file)}\n".encode())
    return FrozenPart(listing.hexdigest(), total, len(files))


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == SHA256_HEX and \
        all(c in "0123456789abcdef" for c in value)


def short(sha: str | None) -> str:
    return "none" if sha is None else sha[:12]


class FrozenDisagreement(ValueError):
    """Hosts report different frozen parts and no digest has most of them."""


def reference_digest(reported: Mapping[str, str | None], pinned: str | None = None
                     ) -> str | None:
    """The frozen part a run trains with: `pinned` when given, else the digest
    most hosts report (None: most have no frozen part). A tie has no answer:
    which hosts are right is the operator's to say."""
    if pinned is not None:
        return pinned
    if not reported:
        return None
    votes = Counter(reported.values()).most_common()
    if len(votes) > 1 and votes[0][1] == votes[1][1]:
        raise FrozenDisagreement(
            "hosts disagree on the frozen part: " + "; ".join(
                f"{short(sha)} on {', '.join(_hosts_with(reported, sha))}"
                for sha, _ in votes)
            + ": give every host the same files (or pin training.frozen_sha256)")
    return votes[0][0]


def _hosts_with(reported: Mapping[str, str | None], sha: str | None) -> Iterable[str]:
    return sorted(name for name, value in reported.items() if value == sha)


def mismatch(name: str, have: str | None, want: str | None) -> str | None:
    """One line when host `name`'s frozen part is not the run's, else None."""
    if have == want:
        return None
    if want is None:
        return (f"{name}: it has a frozen part ({short(have)}) and this run's hosts have "
                f"none; remove its frozen_path (or its frozen/) and redeploy")
    if have is None:
        return (f"{name}: it has no frozen part; the run's is {short(want)} (set "
                f"frozen_path for it, or put the files in the workspace's frozen/ and deploy)")
    return (f"{name}: its frozen part {short(have)} differs from the run's {short(want)}; "
            f"give it the same files and redeploy")

