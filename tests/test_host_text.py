"""Text from a host reaches the terminal literally: no rich markup is read in
it and its control characters (ANSI and OSC escapes, BEL, C1 controls, bidi
overrides) are removed, in every table that shows it: the deploy recap (a
step's error), `flctl status` (an agent's state and data error) and
`flctl stats` (column names, and a host whose data cannot be read).
`--json` keeps what the host sent, for scripts.

Rich's Text keeps ESC, and reading `[/bold]` as markup raises, so a cell
that skipped flctl.core.text.clean_text or was printed as markup fails here.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from rich.text import Text

from flctl.cli import app as cli_app
from flctl.cli import render
from flctl.coordinator.stats import federated_stats
from flctl.core.text import clean_text
from flctl.deploy.results import HostResult, StepResult
from flctl.net.agent_client import AgentClient
from test_coordinator import Federation
from test_stats import _table, _write_csv

from helpers import flctl_command, run_cli, set_training, use_ports

# markup that would restyle (or, unbalanced, raise), a colour escape, a window
# title (OSC ... BEL), a C1 CSI that clears the screen, a right-to-left override
HOSTILE = "[bold]x[/bold] [/bold] \x1b[31mred\x1b[0m \x1b]0;pwned\x07 \x9b2J \u202eevil"
SHOWN = "[bold]x[/bold] [/bold] [31mred[0m ]0;pwned 2J evil"
CONTROLS = ("\x1b", "\x07", "\x9b", "\u202e")


def literal_in(text: str, shown: str = SHOWN) -> None:
    assert shown in text, text
    assert not any(c in text for c in CONTROLS), repr(text)


def rendered(*renderables) -> str:
    console = Console(file=io.StringIO(), width=1000, highlight=False)
    for renderable in renderables:
        console.print(renderable)
    return console.file.getvalue()


def test_clean_text_removes_controls_and_keeps_markup_as_text() -> None:
    assert clean_text(HOSTILE) == SHOWN
    assert clean_text("a\tb\r\nc") == "a b c"
    assert clean_text("a\nb\x00", one_line=False) == "a\nb"
    assert clean_text(42) == "42" and clean_text("naïve 日本") == "naïve 日本"
    literal_in(rendered(Text(clean_text(HOSTILE))))
    # what it guards against: unclean text keeps its escapes, and as markup it raises
    assert "\x1b" in rendered(Text(HOSTILE))
    with pytest.raises(Exception, match="closing tag"):
        rendered(HOSTILE)


def test_tables_show_a_hosts_strings_literally() -> None:
    """The renderers themselves, for text a real agent would not normally send
    (a state, a torch version, a step detail from a helper's answer)."""
    failed = HostResult("h1", status="failed", error=HOSTILE)
    changed = HostResult("h2", status="changed", steps=[StepResult("tunnel", True, HOSTILE)])
    recap = rendered(render.recap_table([failed, changed], "deploy"))
    assert recap.count(SHOWN) == 2, recap
    literal_in(recap)
    rows = [
        {"host": "h1", "reachable": True, "agent": HOSTILE, "data_error": HOSTILE},
        {"host": "h2", "reachable": True, "agent": "bad answer", "error": HOSTILE},
        {"host": "h3", "reachable": True, "agent": "idle", "frozen_error": HOSTILE,
         "environment": {"torch": HOSTILE}},
    ]
    status = rendered(render.status_table(rows))
    assert status.count(SHOWN) == 5, status
    literal_in(status)


HOSTILE_TASK = '''
from pathlib import Path

from flctl.core.data import load_dataset
from flctl.core.tasks import LogRegTask


class Hostile(LogRegTask):
    """The built-in model; a host whose data file has a `.note` beside it fails
    to load with the note's text as its error (test-only)."""

    @staticmethod
    def load_data(path, params):
        note = Path(path).with_suffix(".note")
        if note.exists():
            raise ValueError(note.read_text())
        return load_dataset(path)
'''


def wide_cli(*args: str) -> subprocess.CompletedProcess:
    """The CLI with room for every cell on one line (run_cli's 200 columns wrap
    a long error)."""
    env = dict(os.environ, COLUMNS="2000", NO_COLOR="1")
    return subprocess.run([*flctl_command(), *args], capture_output=True, text=True,
                          env=env, stdin=subprocess.DEVNULL, timeout=300)


def wait_for(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def test_deploy_and_status_show_a_hosts_errors_literally(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "ws"
    assert run_cli("init", str(root), "--local", "2").returncode == 0
    use_ports(root, 2)
    (root / "tasks" / "hostile.py").write_text(HOSTILE_TASK)
    set_training(root, task="hostile:Hostile")
    note = root / "data" / "local1.note"
    note.write_text(HOSTILE)
    try:
        # a deploy step's error, in the recap table
        deployed = wide_cli("deploy", "-w", str(root))
        assert deployed.returncode == 5, deployed.stderr
        assert "Traceback" not in deployed.stderr
        line = next(x for x in deployed.stdout.splitlines() if "local1" in x)
        assert "failed" in line and "ValueError" in line
        literal_in(deployed.stdout)
        note.unlink()
        assert wide_cli("deploy", "-w", str(root)).returncode == 0
        # the agent restarts and cannot read its data: its data error, in `flctl status`
        note.write_text(HOSTILE)
        pidfile = root / ".flctl" / "hosts" / "local1" / "run" / "agent.pid"
        os.kill(int(pidfile.read_text()), signal.SIGKILL)

        def local1() -> dict | None:
            rows = json.loads(wide_cli("status", "-w", str(root), "--json").stdout)["hosts"]
            row = next(r for r in rows if r["host"] == "local1")
            return row if row.get("data_error") else None

        row = wait_for(local1)
        assert row["agent"] == "error" and HOSTILE in row["data_error"]   # --json: as sent
        table = wide_cli("status", "-w", str(root))
        assert table.returncode == 0 and "Traceback" not in table.stderr, table.stderr
        literal_in(table.stdout)
        # an agent's own state, through the status command
        real = cli_app.info_probe

        def lying_probe(workspace, timeout=10.0):
            probe = real(workspace, timeout)
            return lambda endpoint: {**probe(endpoint), "state": HOSTILE}

        out = Console(file=io.StringIO(), width=2000, highlight=False)
        monkeypatch.setattr(cli_app, "info_probe", lying_probe)
        monkeypatch.setattr(render, "out", out)
        cli_app.status(workspace_dir=root, limit=None, json_output=False, every=False, forks=16)
        shown = out.file.getvalue()
        assert shown.count(SHOWN) == 3, shown     # local2's state; local1's state and error
        literal_in(shown)
    finally:
        run_cli("teardown", "-w", str(root))


def test_stats_shows_a_hosts_column_names_and_data_errors_literally(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Column names come from the hosts' CSV headers; a host whose file cannot be
    read answers with an error naming its file (here, a name with escapes)."""
    rng = np.random.default_rng(0)
    fed = Federation(tmp_path, [10, 10, 10])
    header = [HOSTILE, "smoothness", "count", "label"]
    unreadable = tmp_path / f"bad{HOSTILE.replace('/', '')}.csv"
    unreadable.write_text("a,label\nnot a number,1\n")
    for i, service in enumerate(fed.services):
        path = unreadable if i == 2 else _write_csv(tmp_path / f"h{i}.csv", *_table(rng, 40),
                                                    header=header)
        service.config = dataclasses.replace(service.config, data_path=str(path))
        service.data = None     # as at an agent's start
        service._load_data()
    assert "\x1b" in fed.services[2].data_error     # the agent's own error keeps it
    clients = [AgentClient(e, fed.context, timeout=30) for e in fed.endpoints]
    workspace = tmp_path / "ws"
    assert run_cli("init", str(workspace), "--local", "1").returncode == 0

    def stats_workspace(workspace, hosts, *, min_count, bins, tell, secure=None):
        assert not secure   # the plain statistics: per-host names and errors
        return federated_stats(clients, min_count=min_count, bins=bins, tell=tell)

    out = Console(file=io.StringIO(), width=2000, highlight=False)
    err = Console(file=io.StringIO(), width=2000, highlight=False)
    monkeypatch.setattr(cli_app, "stats_workspace", stats_workspace)
    monkeypatch.setattr(render, "out", out)
    monkeypatch.setattr(render, "err", err)
    try:
        cli_app.stats(workspace_dir=workspace, limit=None, min_count=10, bins=16,
                      secure=None, json_output=False)
    finally:
        fed.close()
    table, notes = out.file.getvalue(), err.file.getvalue()
    literal_in(table)                                       # the feature's name
    left_out = next(x for x in notes.splitlines() if x.startswith("left out: h2"))
    literal_in(left_out, f"bad{SHOWN.replace('/', '')}.csv")  # the file in its data error
