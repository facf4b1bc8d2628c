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
