"""The agent's log is size-bounded: it rotates it itself (a few files of
LOG_MAX_BYTES), what a user's task prints lands in it, and `flctl logs`
shows the newest lines and, with -f, follows across a rotation."""

from __future__ import annotations

import logging
import logging.handlers
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import deployed_local_workspace, flctl_command, run_cli


def test_the_log_rotates_and_stays_bounded(tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    script = (
        "import logging, sys\n"
        "from pathlib import Path\n"
        "from flctl.agent.main import setup_logging\n"
        f"setup_logging(Path({str(log)!r}), max_bytes=2000, backups=2)\n"
        "for i in range(3000):\n"
        "    logging.getLogger('flctl.agent').info('line %05d', i)\n"
        "print('a task prints', 42)\n"
        "print('no newline yet', end='')\n"
        "sys.stdout.flush()\n"
        "sys.stderr.write('a warning from the task\\n')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""                      # printing went to the log, not stdout
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["agent.log", "agent.log.1", "agent.log.2"]
    sizes = [(tmp_path / name).stat().st_size for name in files]
    assert all(size <= 2000 for size in sizes), sizes   # 3000 lines would be ~200 KB
    text = log.read_text()
    assert "line 02999" in text and "line 00000" not in "".join(
        (tmp_path / name).read_text() for name in files)
    assert "INFO flctl.task: a task prints 42" in text
    assert "INFO flctl.task: no newline yet" in text
    assert "WARNING flctl.task: a warning from the task" in text


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    yield from deployed_local_workspace(tmp_path_factory.mktemp("agentlog"), 1)


def test_logs_show_the_newest_lines_and_follow_across_a_rotation(workspace: Path) -> None:
    log = workspace / ".flctl" / "hosts" / "local1" / "run" / "agent.log"
    assert "listening on" in run_cli("logs", "local1", "-w", str(workspace), "-n", "5").stdout
    follower = subprocess.Popen([*flctl_command(), "logs", "local1", "-f", "-n", "1",
                                 "-w", str(workspace)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(follower.stdout.readline, "")),
                              daemon=True)
    reader.start()
    # a writer that rotates as the agent's own handler does, only much sooner
    handler = logging.handlers.RotatingFileHandler(log, maxBytes=500, backupCount=2)
    writer = logging.getLogger("test.agentlog")
    writer.addHandler(handler)
    writer.setLevel(logging.INFO)
    try:
        time.sleep(1.0)   # tail is following the file
        for i in range(60):
            writer.info("rotating line %03d", i)
            time.sleep(0.02)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any("rotating line 059" in s for s in seen):
            time.sleep(0.1)
    finally:
        writer.removeHandler(handler)
        handler.close()
        follower.terminate()
        follower.wait(10)
    assert (log.parent / "agent.log.1").exists()        # it did rotate (several times)
    assert any("rotating line 059" in s for s in seen), seen[-5:]
    newest = run_cli("logs", "local1", "-w", str(workspace), "-n", "3").stdout
    assert "rotating line 059" in newest
