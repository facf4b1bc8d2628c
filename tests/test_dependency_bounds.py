"""flctl works with the oldest and the newest releases pyproject.toml admits.

Two fresh venvs: one with every direct dependency at its lower bound (the
rest resolved as pip would), one with everything at the newest release.
In each, usage errors are one line and exit code 2 (typer 0.26+ vendors
click, so an `import click` anywhere would crash there), and a local
federation deploys, trains a round and is torn down.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

pytestmark = pytest.mark.slow

CHECKOUT = Path(__file__).resolve().parents[1]
USAGE_ERRORS = [
    (["deploy", "--bogus"], "No such option"),
    (["train", "--rounds", "abc"], "--rounds"),
    (["nosuchcommand"], "nosuchcommand"),
    (["runs", "show"], "Missing argument"),
    (["init", "--local", "0"], "--local"),
]


def lower_bounds(python: str | None = None) -> dict[str, str]:
    """{"typer": "0.15.4", ...}: pyproject.toml's `>=` bounds that apply on
    `python` (default: this interpreter), markers evaluated."""
    project = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())["project"]
    environment = {"python_version": python} if python else None
    bounds = {}
    for text in project["dependencies"]:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        match = re.fullmatch(r">=([0-9][A-Za-z0-9.]*)", str(requirement.specifier))
        assert match, f"dependency {text!r} has no plain lower bound"
        assert requirement.name not in bounds, f"two bounds for {requirement.name} on {python}"
        bounds[requirement.name] = match.group(1)
    return bounds


@pytest.mark.parametrize("python", ["3.9", "3.11", "3.12", "3.13", "3.14"])
def test_each_python_gets_one_lower_bound_per_dependency(python: str) -> None:
    names = set(lower_bounds(python))
    assert names == {"typer", "rich", "numpy", "cryptography", "paramiko", "PyYAML",
                     "packaging"}
    # the compiled ones move up with the Python (first release with its wheels)
    newer = Version(python) >= Version("3.12")
    assert Version(lower_bounds(python)["numpy"]) >= Version("1.26" if newer else "1.23.2")


def make_venv(where: Path, *pip_args: str) -> Path:
    """A venv with flctl installed from a copy of this checkout (pip builds
    in the source tree: the copy keeps build/ out of the checkout)."""
    source = where / "source"
    shutil.copytree(CHECKOUT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".ruff_cache", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "venv", str(where / "venv")], check=True)
    python = where / "venv" / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "-q",
                           "--disable-pip-version-check", *pip_args, str(source)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return where / "venv" / "bin"


def release(version: str) -> tuple[int, ...]:
    """ "13" and "13.0.0" are one release."""
    parts = [int(p) for p in version.split(".")]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def versions(bin_dir: Path) -> dict[str, str]:
    done = subprocess.run([str(bin_dir / "python"), "-m", "pip", "list", "--format=freeze",
                           "--disable-pip-version-check"], capture_output=True, text=True,
                          check=True)
    return {line.split("==")[0].lower(): line.split("==")[1]
            for line in done.stdout.splitlines() if "==" in line}


@pytest.fixture(scope="module", params=["oldest", "newest"])
def installed(request: pytest.FixtureRequest,
              tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    where = tmp_path_factory.mktemp(f"deps-{request.param}")
    if request.param == "oldest":
        constraints = where / "oldest.txt"
        constraints.write_text("".join(f"{name}=={version}\n"
                                       for name, version in lower_bounds().items()))
        bin_dir = make_venv(where, "-c", str(constraints))
        have = versions(bin_dir)
        for name, version in lower_bounds().items():
            assert release(have[name.lower()]) == release(version), (name, have)
    else:
        bin_dir = make_venv(where, "--upgrade", "--upgrade-strategy", "eager")
    return request.param, bin_dir


def run(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run([str(bin_dir / "flctl"), *args], capture_output=True, text=True,
                          cwd=cwd, env={**env, "COLUMNS": "200"}, timeout=300,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("args,mention", USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_usage_errors_are_one_line(installed: tuple[str, Path], args: list[str], mention: str,
                                   tmp_path: Path) -> None:
    _, bin_dir = installed
    done = run(bin_dir, *args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert mention in lines[0] and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_typer_without_click_is_covered(installed: tuple[str, Path]) -> None:
    kind, bin_dir = installed
    have = versions(bin_dir)
    typer = tuple(int(p) for p in have["typer"].split(".")[:2])
    if kind == "newest" and typer >= (0, 26):
        probe = subprocess.run([str(bin_dir / "python"), "-c", "import click"],
                               capture_output=True, cwd="/")
        assert probe.returncode != 0  # the case the issue reported: no click at all


def test_a_local_federation_trains(installed: tuple[str, Path], tmp_path: Path) -> None:
    _, bin_dir = installed
    workspace = tmp_path / "ws"
    assert run(bin_dir, "init", str(workspace), "--local", "2", cwd=tmp_path).returncode == 0
    from helpers import use_ports
    use_ports(workspace, 2)
    try:
        deployed = run(bin_dir, "deploy", "-w", str(workspace), cwd=tmp_path)
        assert deployed.returncode == 0, deployed.stderr
        trained = run(bin_dir, "train", "-w", str(workspace), "--rounds", "1", "--json",
                      cwd=tmp_path)
        assert trained.returncode == 0, trained.stderr
        assert '"rounds": 1' in trained.stdout
    finally:
        run(bin_dir, "teardown", "-w", str(workspace), cwd=tmp_path)
