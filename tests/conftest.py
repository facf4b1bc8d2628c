"""Suite-wide rules.

In CI (CI=true) a lab test that skips is a failure: the lab is what proves
deploy against real sshd / nftables / WireGuard, and a silent skip would
let a broken lab pass as green.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.skipped and "lab" in item.keywords and os.environ.get("CI") == "true":
        report.outcome = "failed"
        report.longrepr = f"lab test skipped in CI: {report.longrepr}"
