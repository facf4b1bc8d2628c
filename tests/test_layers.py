"""House rules that keep the layers honest, checked on the source itself.

cli -> agent/coordinator/deploy/workspace -> net -> core. The pure core
imports no sockets, subprocesses, paramiko, typer or rich; only one module
may import paramiko; only the CLI (and the host-side command's JSON
answer) prints.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "flctl"

LAYER = {"core": 0, "errors": 0, "data": 0, "torch": 0, "flower": 0, "net": 1, "tracking": 1.5,
         "agent": 2, "coordinator": 2, "deploy": 2, "workspace": 2, "workspace_lock": 2,
         "report": 2.5, "audit": 2.5, "service": 2.5, "cli": 3, "__main__": 3}
IMPURE = {"socket", "ssl", "subprocess", "paramiko", "typer", "rich", "selectors", "asyncio",
          "http", "urllib", "multiprocessing"}
# ssh_jump: ~/.ssh/config and ProxyJump chains, split from ssh.py to keep each readable
PARAMIKO_MODULES = {"flctl.deploy.ssh", "flctl.deploy.ssh_jump"}
PRINTING_MODULES = {"flctl.agent.host_helper", "flctl.agent.task_check"}  # its stdout is its answer to deploy
# Engines of the same layer stay independent; they share only the workspace.
SAME_LAYER_ALLOWED = {"workspace"}


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out.append((name, path))
    return out


def area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "core"


def imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
    return found


MODULES = modules()


def test_every_area_has_a_layer() -> None:
    assert {area(name) for name, _ in MODULES} <= set(LAYER)


@pytest.mark.parametrize("name,path", MODULES, ids=[m for m, _ in MODULES])
def test_imports_point_down(name: str, path: Path) -> None:
    mine = area(name)
    for imported, line in imports(path):
        top = imported.split(".")[0]
        if top == "flctl":
            theirs = area(imported)
            assert LAYER[theirs] <= LAYER[mine], f"{path}:{line}: {name} imports {imported}"
            if LAYER[theirs] == LAYER[mine] == 2 and theirs != mine:
                assert theirs in SAME_LAYER_ALLOWED, f"{path}:{line}: {name} imports {imported}"
        if LAYER[mine] == 0:
            assert top not in IMPURE, f"{path}:{line}: pure core module {name} imports {top}"
        if top == "paramiko":
            assert name in PARAMIKO_MODULES, f"{path}:{line}: only deploy.ssh(_jump) may use paramiko"
        if top in ("typer", "rich"):
            assert mine == "cli", f"{path}:{line}: only the CLI may import {top}"


@pytest.mark.parametrize("name,path", MODULES, ids=[m for m, _ in MODULES])
def test_only_the_cli_prints(name: str, path: Path) -> None:
    if area(name) == "cli" or name in PRINTING_MODULES:
        return
    tree = ast.parse(path.read_text())
    calls = [n.lineno for n in ast.walk(tree)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"]
    assert not calls, f"{path}:{calls[0]}: print() outside the CLI"


def test_the_checker_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import socket\nfrom flctl.cli import app\n")
    found = [m for m, _ in imports(bad)]
    assert found == ["socket", "flctl.cli"]
    assert LAYER[area("flctl.cli.app")] > LAYER[area("flctl.core.models")]
