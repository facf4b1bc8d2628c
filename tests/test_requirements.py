"""A task's requirements: read from tasks/requirements.txt, resolved on the
operator's machine into pinned wheels, around what a host's own interpreter
already has when the agent is layered on it."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata

import pytest

from flctl.core.facts import bootstrap_script, parse_key_values, provided_key
from flctl.core.requirements import (
    name_of,
    parse_requirements,
    satisfied_by,
    with_companions,
)
from flctl.core.wheellock import parse_lock
from flctl.deploy.bundle import HostEnv, prepare_bundle
from flctl.errors import ConfigError
from test_bundle import CACHE


def test_requirements_are_checked_line_by_line() -> None:
    text = "# the model\ntorch>=1.13\n\nmsgpack==1.*  # compiled\npyarrow; python_version >= '3.10'\n"
    assert parse_requirements(text, "tasks/requirements.txt") == [
        "torch>=1.13", "msgpack==1.*", 'pyarrow; python_version >= "3.10"']
    for line, complaint in (("-r other.txt", "pip options"), ("-e ./pkg", "pip options"),
                            ("mypkg @ https://x.example/mypkg.whl", "URL"),
                            ("not a requirement!", "not a requirement")):
        with pytest.raises(ConfigError, match=complaint) as refused:
            parse_requirements(f"numpy\n{line}\n", "tasks/requirements.txt")
        assert refused.value.message.startswith("tasks/requirements.txt:2: ")


def test_companions_and_satisfaction() -> None:
    assert with_companions(["torch>=2"]) == ["torch>=2", "ml_dtypes>=0.2"]
    assert with_companions(["torch", "ml-dtypes==0.3.2"]) == ["torch", "ml-dtypes==0.3.2"]
    assert name_of("PyYAML>=6") == "pyyaml"
    installed = {"numpy": "1.24.2", "pyyaml": "6.0", "torch": "1.13.1+cpu"}
    assert satisfied_by("numpy>=1.23.2", installed)
    assert not satisfied_by("PyYAML>=6.0.1", installed)      # Debian's 6.0 is too old
    assert satisfied_by("torch>=1.13", installed)
    assert not satisfied_by("msgpack", installed)


def test_the_host_says_which_projects_its_interpreter_has() -> None:
    script = bootstrap_script(sys.executable, "/nonexistent/flctl",
                              projects=["numpy", "pyyaml", "flctl-no-such-project"])
    facts = parse_key_values(subprocess.run(["sh", "-c", script], capture_output=True,
                                            text=True, check=True).stdout)
    assert facts[provided_key("numpy")] == metadata.version("numpy")
    assert facts[provided_key("pyyaml")] == metadata.version("pyyaml")
    assert provided_key("flctl-no-such-project") not in facts


@pytest.mark.slow
def test_a_layered_agent_ships_only_what_the_interpreter_lacks(tmp_path) -> None:
    """numpy is on the host (here: this interpreter's version) and satisfies the
    agent: it is neither shipped nor upgraded; msgpack (a compiled wheel) is not
    on the host, so it is resolved and shipped, pinned in the lock."""
    numpy = metadata.version("numpy")
    env = HostEnv(platform.python_version(), platform.machine(), layered=True,
                  provided=(("numpy", numpy),), extra=("msgpack",))
    bundle = prepare_bundle(env, CACHE)
    projects = {w.project for w in bundle.wheels}
    assert "msgpack" in projects and "numpy" not in projects
    assert bundle.layered and bundle.provided == (("numpy", numpy),)
    assert bundle.target.startswith(f"cp{sys.version_info.major}{sys.version_info.minor}-") \
        and "-on-" in bundle.target
    plain = prepare_bundle(HostEnv(platform.python_version(), platform.machine(),
                                   extra=("msgpack",)), CACHE)
    assert "numpy" in {w.project for w in plain.wheels} and plain.digest != bundle.digest
    from flctl.core.wheellock import WheelLock
    lock = WheelLock({bundle.target: bundle.lock_target(), plain.target: plain.lock_target()})
    again = parse_lock(lock.render(), "wheels.lock")
    assert again.targets[bundle.target].provided == (("numpy", numpy),)
    pinned = prepare_bundle(env, tmp_path / "cache", again.targets[bundle.target])
    assert {(w.name, w.sha256) for w in pinned.wheels} == {(w.name, w.sha256)
                                                          for w in bundle.wheels}
