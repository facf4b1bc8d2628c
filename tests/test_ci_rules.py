"""The CI rule itself: a skipped lab test fails the run when CI=true."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_pytest(tmp_path: Path, ci: str) -> subprocess.CompletedProcess[str]:
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.lab\n"
        "def test_needs_lab():\n"
        "    pytest.skip('no lab here')\n\n"
        "def test_plain():\n"
        "    pytest.skip('not a lab test')\n"
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    lab: lab\n")
    env = dict(os.environ, CI=ci)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path)


def test_skipped_lab_test_fails_in_ci(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, "true")
    assert result.returncode == 1, result.stdout
    assert "1 failed, 1 skipped" in result.stdout


def test_skipped_lab_test_is_a_skip_outside_ci(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, "false")
    assert result.returncode == 0, result.stdout
    assert "2 skipped" in result.stdout


def test_ci_refuses_a_machine_whose_python3_imports_flctl(tmp_path: Path) -> None:
    """.ci/run stops before any test when python3 already has flctl (a test
    leaning on that would pass in CI and fail for every new user); the copy
    of .ci/run runs in a scratch checkout, so scripts/test.sh there is a
    marker that must never run."""
    checkout = tmp_path / "checkout"
    (checkout / ".ci").mkdir(parents=True)
    (checkout / "scripts").mkdir()
    shutil.copy(HERE.parent / ".ci" / "run", checkout / ".ci" / "run")
    ran = tmp_path / "TESTS-RAN"
    (checkout / "scripts" / "test.sh").write_text(f"touch {ran}\n")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text("#!/bin/sh\necho /somewhere/site-packages/flctl/__init__.py\n")
    (fake / "python3").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}")
    done = subprocess.run(["bash", str(checkout / ".ci" / "run")], capture_output=True,
                          text=True, env=env, stdin=subprocess.DEVNULL, timeout=60)
    assert done.returncode == 1
    assert "imports flctl from /somewhere/site-packages/flctl/__init__.py" in done.stderr
    assert not ran.exists()
    # and without it, CI goes on to the tests
    (fake / "python3").write_text("#!/bin/sh\nexit 1\n")
    done = subprocess.run(["bash", str(checkout / ".ci" / "run")], capture_output=True,
                          text=True, env=env, stdin=subprocess.DEVNULL, timeout=60)
    assert done.returncode == 0 and ran.exists(), done.stderr
