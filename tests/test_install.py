"""flctl is tested as users get it: installed, not imported from this checkout.

scripts/test.sh installs flctl into its venv from a wheel and sets
FLCTL_EXPECT_INSTALLED=1; then every import here, every `flctl` the tests
start and every deploy (whose agent wheel is made from the running flctl)
must use that installed copy. A stray import of the checkout would hide
a file missing from the wheel, so it fails the run.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import flctl

from helpers import flctl_command

CHECKOUT = Path(__file__).resolve().parents[1]
EXPECTED = os.environ.get("FLCTL_EXPECT_INSTALLED") == "1"
pytestmark = pytest.mark.skipif(not EXPECTED, reason="FLCTL_EXPECT_INSTALLED is not set "
                                                     "(scripts/test.sh sets it)")


def test_the_tests_import_the_installed_flctl() -> None:
    package = Path(flctl.__file__).resolve().parent
    assert package != CHECKOUT / "flctl" and "site-packages" in package.parts, package


def test_the_cli_the_tests_start_is_the_installed_one() -> None:
    command = flctl_command()
    assert Path(command[0]).name == "flctl", command   # the venv's script, not `python -m`
    # run from the checkout itself, where `python -m flctl` would import ./flctl
    done = subprocess.run([*command, "version", "--json"], capture_output=True, text=True,
                          cwd=CHECKOUT, timeout=60)
    assert done.returncode == 0, done.stderr
    location = Path(json.loads(done.stdout)["location"])
    assert location != CHECKOUT / "flctl" and "site-packages" in location.parts, location
