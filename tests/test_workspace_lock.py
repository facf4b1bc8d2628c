"""One changing command at a time per workspace: a second `train`, `deploy` or
`teardown` is refused at once with the holder named, read-only commands are
not, and a holder that died blocks nobody."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flctl.workspace_lock import WorkspaceBusy, workspace_lock

from helpers import deployed_local_workspace, flctl_command, run_cli

HOSTS = 2


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    yield from deployed_local_workspace(tmp_path_factory.mktemp("lock"), HOSTS)


def lock_record(state_dir: Path) -> dict:
    text = (state_dir / "lock").read_text()
    return json.loads(text) if text else {}


def assert_busy(result, holder: str, pid: int) -> None:
    assert result.returncode == 3, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "workspace busy" in lines[0] and f"`{holder}`" in lines[0], lines[0]
    assert f"pid {pid}" in lines[0] and "wait for it or stop it" in lines[0], lines[0]


def test_a_second_command_is_refused_naming_the_holder(workspace: Path) -> None:
    with workspace_lock(workspace / ".flctl", "flctl train"):
        for command in ("train", "deploy", "teardown"):
            assert_busy(run_cli(command, "-w", str(workspace)), "flctl train", os.getpid())
        # read-only commands do not wait for the lock
        assert run_cli("status", "-w", str(workspace)).returncode == 0
        assert run_cli("runs", "-w", str(workspace)).returncode == 0
    assert lock_record(workspace / ".flctl") == {}  # released, and no stale holder left to mislead
    done = run_cli("train", "-w", str(workspace), "--rounds", "1", "--json")
    assert done.returncode == 0, done.stderr


def test_in_process_a_second_holder_is_refused(tmp_path: Path) -> None:
    with workspace_lock(tmp_path, "flctl deploy"):
        with pytest.raises(WorkspaceBusy, match=r"`flctl deploy` \(pid \d+, .+@.+\) has held it"):
            with workspace_lock(tmp_path, "flctl train"):
                pass
    with workspace_lock(tmp_path, "flctl train"):
        record = lock_record(tmp_path)
        assert (record["command"], record["pid"]) == ("flctl train", os.getpid())
        assert record["since"] <= time.time() and record["user"] and record["host"]


def test_a_lock_left_by_a_killed_process_blocks_nobody(tmp_path: Path) -> None:
    """The holder record stays behind a kill -9; only the flock counts, and the
    kernel dropped it with the process."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from pathlib import Path\n"
         "from flctl.workspace_lock import workspace_lock\n"
         f"with workspace_lock(Path({str(tmp_path)!r}), 'flctl train'):\n"
         "    print('held', flush=True)\n"
         "    time.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkspaceBusy, match=f"pid {holder.pid}"):
            with workspace_lock(tmp_path, "flctl deploy"):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert lock_record(tmp_path)["pid"] == holder.pid  # the stale record is still there
    with workspace_lock(tmp_path, "flctl deploy"):
        assert lock_record(tmp_path)["command"] == "flctl deploy"


def test_two_trains_at_once_the_second_is_refused_until_the_first_ends(
        workspace: Path) -> None:
    log = workspace / "first-train.log"
    with open(log, "wb") as sink:
        first = subprocess.Popen([*flctl_command(), "train", "-w", str(workspace), "--rounds",
                                  "100000", "--json"], stdout=subprocess.DEVNULL, stderr=sink,
                                 stdin=subprocess.DEVNULL,
                                 env={**os.environ, "PYTHONFAULTHANDLER": "1"},
                                 # as from a terminal: a run started in the background
                                 # (CI) inherits SIGINT ignored, and Python keeps it so
                                 preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                  signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while lock_record(workspace / ".flctl").get("pid") != first.pid:
            assert time.monotonic() < deadline and first.poll() is None, "train never locked"
            time.sleep(0.02)
        assert_busy(run_cli("train", "-w", str(workspace), "--rounds", "1"), "flctl train",
                    first.pid)
        assert_busy(run_cli("deploy", "-w", str(workspace)), "flctl train", first.pid)
        assert first.poll() is None, "the first train ended before the second was tried"
    finally:
        first.send_signal(signal.SIGINT)
        try:
            first.wait(timeout=60)
        except subprocess.TimeoutExpired:
            first.send_signal(signal.SIGABRT)   # faulthandler prints every thread's stack
            try:
                first.wait(timeout=10)
            except subprocess.TimeoutExpired:
                first.kill()
            raise AssertionError("an interrupted train did not end in 60 s; its stderr:\n"
                                 + log.read_text(errors="replace")[-12000:]) from None
    after = run_cli("train", "-w", str(workspace), "--rounds", "1", "--json")
    assert after.returncode == 0, after.stderr
