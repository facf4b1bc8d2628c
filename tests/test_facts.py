"""Host-side fact parsers, on captured /proc text (pyinfra style)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from flctl.core.agentconfig import AgentConfig, parse_agent_config, render_agent_config
from flctl.core.facts import (
    HELPER_FACTS_KEY,
    bootstrap_script,
    host_unfit_reason,
    parse_key_values,
    parse_listening_ports,
    parse_loadavg,
    parse_meminfo,
    parse_os_release,
    process_uptime_s,
)
from flctl.errors import ConfigError

PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1D0B 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0100007F:1D0C 0100007F:A2B4 01 00000000:00000000 00:00000000 00000000     0        0 3 1
"""

PROC_NET_TCP6 = """\
  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:01BB 00000000000000000000000000000000:0000 0A 0
"""


def test_listening_ports_only_counts_listen_state() -> None:
    assert parse_listening_ports(PROC_NET_TCP) == {0x1D0B, 22}
    assert parse_listening_ports(PROC_NET_TCP6) == {443}
    assert parse_listening_ports("header only\n") == set()


def test_meminfo_in_bytes() -> None:
    text = "MemTotal:       24576000 kB\nMemAvailable:   1000 kB\nHugePages_Total:       0\n"
    info = parse_meminfo(text)
    assert info["MemTotal"] == 24576000 * 1024
    assert info["MemAvailable"] == 1024000
    assert info["HugePages_Total"] == 0


def test_loadavg_and_os_release() -> None:
    assert parse_loadavg("0.50 1.25 2.00 1/234 5678\n") == (0.5, 1.25, 2.0)
    release = parse_os_release('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\n')
    assert release == {"PRETTY_NAME": "Debian GNU/Linux 12 (bookworm)", "ID": "debian"}


def test_process_uptime_handles_spaces_in_comm() -> None:
    fields = ["S"] + ["0"] * 18 + ["1000"] + ["0"] * 5  # starttime is field 22
    stat = "1234 (python3 -m x) " + " ".join(fields)
    assert process_uptime_s(stat, system_uptime_s=30.0, clock_ticks=100) == 20.0
    assert process_uptime_s(stat, system_uptime_s=5.0, clock_ticks=100) == 0.0


def test_agent_config_roundtrip_is_deterministic() -> None:
    config = AgentConfig(name="a", project="p", bind_address="127.0.0.1", port=7443,
                         ca_cert="/c", cert="/d", key="/k", data_path="/data.npz",
                         state_file="/s", task="m:T", tasks_dir="/t", crl="/c.crl", user="flctl")
    text = render_agent_config(config)
    assert render_agent_config(config) == text
    assert parse_agent_config(text, "agent.json") == config
    # a file an older flctl wrote still starts its agent until deploy rewrites it
    old = text.replace('"tasks_dir": "/t"', '"task_path": ["/t"]')
    assert parse_agent_config(old, "agent.json").tasks_dir is None


@pytest.mark.parametrize("field,value", [("port", "7443"), ("name", None), ("user", 3),
                                         ("max_message_mb", True)])
def test_agent_config_checks_types(field: str, value: object) -> None:
    config = AgentConfig(name="a", project="p", bind_address="127.0.0.1", port=7443,
                         ca_cert="/c", cert="/d", key="/k", data_path="/data.npz", state_file="/s")
    document = json.loads(render_agent_config(config))
    document[field] = value
    with pytest.raises(ConfigError, match=f"agent.json: {field}: expected"):
        parse_agent_config(json.dumps(document), "agent.json")


def test_agent_config_rejects_unknown_keys() -> None:
    try:
        parse_agent_config('{"name": "a", "bogus": 1}', "agent.json")
    except ConfigError as exc:
        assert exc.field == "bogus" and "agent.json" in exc.message
    else:
        raise AssertionError("unknown key accepted")


# ---------------------------------------------------------- bootstrap facts

GOOD = {"arch": "x86_64", "python": "3.11.2", "python_venv": "yes", "uid": "0",
        "disk_free_kb": str(10 * 1024 * 1024), "init": "none"}


def test_bootstrap_script_runs_here_and_parses(tmp_path) -> None:
    done = subprocess.run(["sh", "-c", bootstrap_script(sys.executable, str(tmp_path / "x" / "y"))],
                          capture_output=True, text=True, check=True)
    facts = parse_key_values(done.stdout)
    assert facts["python"] == platform.python_version()
    assert facts["arch"] and facts["uid"].isdigit() and int(facts["disk_free_kb"]) > 0
    assert facts["init"] in ("systemd", "none")
    assert "bundle" not in facts
    (tmp_path / "bundle.digest").write_text("abc123\n")
    again = subprocess.run(["sh", "-c", bootstrap_script(sys.executable, str(tmp_path))],
                           capture_output=True, text=True, check=True)
    assert parse_key_values(again.stdout)["bundle"] == "abc123"



def _bootstrap(python: str, install: Path, helper: str) -> dict[str, str]:
    script = bootstrap_script(python, str(install), facts_argv=[
        str(install / "venv" / "bin" / "python"), "-c", helper])
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    return parse_key_values(done.stdout)


def test_an_installed_helper_answers_facts_in_the_same_round_trip(tmp_path: Path) -> None:
    """A bundle installed in a venv of this very interpreter: the helper's
    answer comes along, and the interpreter itself is not started."""
    install = tmp_path / "opt"
    (install / "venv" / "bin").mkdir(parents=True)
    (install / "venv" / "bin" / "python").symlink_to(sys.executable)
    helper = "print('noise'); print('{\"python\": \"3.99.1\", \"a\": 1}')"
    assert "bundle" not in _bootstrap(sys.executable, install, helper)   # nothing installed
    assert HELPER_FACTS_KEY not in _bootstrap(sys.executable, install, helper)
    (install / "bundle.digest").write_text("abc123\n")
    facts = _bootstrap(sys.executable, install, helper)
    assert json.loads(facts[HELPER_FACTS_KEY]) == {"python": "3.99.1", "a": 1}  # last line
    assert "python" not in facts and facts["bundle"] == "abc123" and facts["uid"].isdigit()


@pytest.mark.parametrize("case", ["other interpreter", "helper fails"])
def test_without_a_working_helper_of_the_same_interpreter_the_bootstrap_asks_python(
        tmp_path: Path, case: str) -> None:
    install = tmp_path / "opt"
    (install / "venv" / "bin").mkdir(parents=True)
    (install / "bundle.digest").write_text("abc123\n")
    other = tmp_path / "python-elsewhere"
    other.write_bytes(Path(sys.executable).resolve().read_bytes())
    other.chmod(0o755)
    target = other if case == "other interpreter" else Path(sys.executable)
    (install / "venv" / "bin" / "python").symlink_to(target)
    helper = "print('{}')" if case == "other interpreter" else "raise SystemExit(1)"
    facts = _bootstrap(sys.executable, install, helper)
    assert HELPER_FACTS_KEY not in facts
    assert facts["python"] == platform.python_version() and facts["python_venv"] == "yes"


def test_a_fit_host_passes() -> None:
    assert host_unfit_reason(GOOD, become=False) is None


@pytest.mark.parametrize("change,become,fragment", [
    ({"arch": "mips"}, False, "unsupported architecture 'mips'"),
    ({"python": ""}, False, "no Python interpreter"),
    ({"python": "3.8.10"}, False, "too old"),
    ({"python_venv": "no"}, False, "no venv module"),
    ({"uid": "1000"}, False, "become: true"),
    ({"uid": "1000", "sudo": "no"}, True, "asks for a password"),
    ({"disk_free_kb": "1000"}, False, "MB free"),
])
def test_unfit_hosts_get_one_clear_reason(change, become, fragment) -> None:
    reason = host_unfit_reason({**GOOD, **change}, become=become)
    assert reason is not None and fragment in reason


def test_become_with_sudo_is_fit() -> None:
    assert host_unfit_reason({**GOOD, "uid": "1000", "sudo": "yes"}, become=True) is None


class _Canned:
    """A connector whose bootstrap answers are given: the fast one, then the plain one."""

    host_name, python = "alpha", "python3"

    def __init__(self, answers: list[str]) -> None:
        self.answers, self.scripts = answers, []

    def run_shell(self, script: str, timeout: float = 120.0):  # type: ignore[no-untyped-def]
        from flctl.deploy.connector import CommandResult

        self.scripts.append(script)
        return CommandResult(0, self.answers.pop(0), "")


PLAIN = "arch=x86_64\npython=3.11.2\npython_venv=yes\nuid=0\nbundle=abc\n"


@pytest.mark.parametrize("answer,version", [
    ('{"python": "3.11.9", "files": {}}', "3.11.9"),
    ("not json", None), ('["python"]', None), ('{"python": 3.11}', None),
    ('{"python": "3.11.9; rm -rf /"}', None), ('{"error": "x", "python": "3.11.9"}', None),
])
def test_the_helpers_answer_gives_the_version_only_when_it_is_sound(answer: str,
                                                                     version: str | None) -> None:
    from flctl.deploy.install import gather_bootstrap_facts

    connector = _Canned([f"arch=x86_64\nuid=0\nbundle=abc\n{HELPER_FACTS_KEY}={answer}\n", PLAIN])
    host = SimpleNamespace(python="python3")   # all the bootstrap reads of a host
    facts = gather_bootstrap_facts(connector, host, (), ["facts", "--root", "/var/lib/flctl/a"])
    assert "/var/lib/flctl/a" in connector.scripts[0]
    if version is not None:
        assert len(connector.scripts) == 1 and facts["python"] == version
        assert facts[HELPER_FACTS_KEY] == answer and facts["python_venv"] == "yes"
    else:   # asked again, the plain way
        assert len(connector.scripts) == 2 and "/var/lib/flctl/a" not in connector.scripts[1]
        assert facts["python"] == "3.11.2" and HELPER_FACTS_KEY not in facts
