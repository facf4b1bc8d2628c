"""A task's requirements: `tasks/requirements.txt`, read and checked.

One requirement per line in the usual form (`torch>=1.13`, `msgpack==1.0.*`,
`pyarrow; python_version >= "3.10"`); `#` starts a comment. pip options,
editable installs, paths and URLs are refused: deploy resolves every
requirement on the operator's machine into wheels pinned by sha256 for each
host, and a URL or a path could not be pinned or fetched again the same.
A task that uses torch also gets `ml_dtypes` (bfloat16 arrays in numpy).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from flctl.errors import ConfigError

REQUIREMENTS_FILE = "requirements.txt"
# what a torch task needs beside torch to carry bfloat16 (flctl.core.dtypes)
COMPANIONS = {"torch": ("ml_dtypes>=0.2",)}


def parse_requirements(text: str, source: str) -> list[str]:
    """The requirements of a requirements file, each checked; ConfigError names
    the file and line."""
    found: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        if line.startswith("-"):
            raise ConfigError(f"pip options are not supported ({line.split()[0]}): list "
                              "requirements only", file=source, line=number)
        try:
            requirement = Requirement(line)
        except InvalidRequirement as exc:
            raise ConfigError(f"not a requirement: {exc}", file=source, line=number) from None
        if requirement.url:
            raise ConfigError("a URL requirement cannot be pinned by sha256 for offline "
                              "hosts: name a released version", file=source, line=number)
        found.append(str(requirement))
    return found


def name_of(requirement: str) -> str:
    """The normalized project name of a requirement string."""
    return canonicalize_name(Requirement(requirement).name)


def with_companions(requirements: Iterable[str]) -> list[str]:
    """`requirements` plus what flctl itself needs beside some of them."""
    found = list(requirements)
    names = {name_of(r) for r in found}
    for name, extra in COMPANIONS.items():
        if name in names:
            found += [r for r in extra if name_of(r) not in names]
    return found


def satisfied_by(requirement: str, installed: Mapping[str, str]) -> bool:
    """Whether the interpreter's installed version (`installed`: name -> version)
    meets `requirement` (its markers are not evaluated: they were for this
    interpreter when it was installed)."""
    parsed = Requirement(requirement)
    version = installed.get(canonicalize_name(parsed.name))
    if version is None:
        return False
    try:
        return parsed.specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False
