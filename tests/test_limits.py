"""Resource limits, pure parts: their syntax (errors name file, line and
field), which mechanism enforces each on which host, the systemd lines, the
agent config, the note of why an agent died, and when a coordinator believes
that note (only for a restart during its own request)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from flctl.agent import exits
from flctl.core.agentconfig import AgentConfig, parse_agent_config, render_agent_config
from flctl.core.inventory import parse_inventory
from flctl.core.limits import (
    AgentLimits,
    HostCapabilities,
    enforcement,
    memory_bytes,
    oom_reason,
)
from flctl.core.settings import parse_settings
from flctl.deploy.host_deploy import host_limits
from flctl.errors import ConfigError, HostError
from flctl.net.agent_client import _raise_if_killed_by_it


def test_settings_take_limits_and_keep_their_text() -> None:
    s = parse_settings("agent:\n  cpu_quota: 50%\n  memory_max: 512m\n  nice: 10\n", "f.yaml")
    assert (s.agent.cpu_quota, s.agent.memory_max, s.agent.nice) == ("50%", "512M", 10)
    assert parse_settings("agent:\n  memory_max: 2GiB\n", "f").agent.memory_max == "2G"
    assert memory_bytes("512M") == 512 << 20 and memory_bytes("2G") == 2 << 30


@pytest.mark.parametrize("yaml, line, field, words", [
    ("agent:\n  cpu_quota: 50\n", 2, "agent.cpu_quota", '"50%"'),
    ("agent:\n  cpu_quota: 0%\n", 2, "agent.cpu_quota", "out of range"),
    ("project: x\nagent:\n  memory_max: lots\n", 3, "agent.memory_max", '"512M"'),
    ("agent:\n  memory_max: 1M\n", 2, "agent.memory_max", "too little"),
    ("agent:\n  nice: 20\n", 2, "agent.nice", "between -20 and 19"),
    ("agent:\n  nice: high\n", 2, "agent.nice", "integer"),
])
def test_bad_limits_name_file_line_and_field(yaml: str, line: int, field: str,
                                             words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(yaml, "flctl.yaml")
    error = caught.value
    assert (error.file, error.line, error.field) == ("flctl.yaml", line, field)
    assert words in error.message


NET = ipaddress.IPv4Network("10.213.0.0/24")
INVENTORY = """\
all:
  vars:
    connection: local
  children:
    small:
      vars:
        agent_memory_max: 300M
        agent_nice: 5
      hosts:
        a:
          data_path: d
          agent_cpu_quota: 25%
        b:
          data_path: d
          agent_nice: 0
    plain:
      hosts:
        c:
          data_path: d
"""


def test_per_host_and_group_limits_override_flctl_yaml(tmp_path: Path) -> None:
    (tmp_path / "d").write_text("")
    inventory = parse_inventory(INVENTORY, str(tmp_path / "inventory.yaml"), NET)
    agent = parse_settings("agent:\n  cpu_quota: 150%\n  memory_max: 1G\n", "f").agent
    a, b, c = (host_limits(inventory.host(n), agent) for n in "abc")
    assert a == AgentLimits(cpu_percent=25, memory_bytes=300 << 20, nice=5)
    assert b == AgentLimits(cpu_percent=150, memory_bytes=300 << 20, nice=0)   # 0 is a value
    assert c == AgentLimits(cpu_percent=150, memory_bytes=1 << 30, nice=None)


def test_a_bad_host_limit_names_its_line(tmp_path: Path) -> None:
    (tmp_path / "d").write_text("")
    bad = INVENTORY.replace("agent_cpu_quota: 25%", "agent_cpu_quota: half")
    with pytest.raises(ConfigError) as caught:
        parse_inventory(bad, "inventory.yaml", NET, tmp_path)
    assert caught.value.line == 12 and caught.value.field == "hosts.a.agent_cpu_quota"


LIMITS = AgentLimits(cpu_percent=50, memory_bytes=300 << 20, nice=5)


def test_systemd_enforces_everything() -> None:
    how = enforcement(LIMITS, HostCapabilities(init_system="systemd"))
    assert how.problems == ()
    assert how.detail(LIMITS) == ("cpu_quota 50% by systemd CPUQuota=; memory_max 300 MB by "
                                  "systemd MemoryMax=; nice 5 by systemd Nice=")
    assert LIMITS.systemd_lines() == ["CPUQuota=50%", f"MemoryMax={300 << 20}",
                                      "MemorySwapMax=0", "Nice=5"]


@pytest.mark.parametrize("cgroup, name", [("v1", "cgroup v1"), ("v2", "cgroup v2")])
def test_a_writable_cgroup_enforces_cpu_and_memory(cgroup: str, name: str) -> None:
    how = enforcement(LIMITS, HostCapabilities(cgroup=cgroup, cpu=True, memory=True))
    assert (how.cpu, how.memory, how.nice, how.problems) == (name, name, "setpriority", ())


def test_without_a_cgroup_cpu_cannot_be_bounded_and_memory_only_coarsely() -> None:
    how = enforcement(LIMITS, HostCapabilities())
    assert how.cpu is None and how.memory == "rlimit" and how.nice == "setpriority"
    assert len(how.problems) == 2
    assert "cpu_quota 50% cannot be enforced" in how.problems[0]
    assert "rlimits cannot bound a CPU share" in how.problems[0]
    assert "RLIMIT_AS bounds virtual memory" in how.problems[1]
    assert "cpu_quota 50% by nothing" in how.detail(LIMITS)
    # a cgroup with only the memory controller still leaves the CPU share unbounded
    partial = enforcement(LIMITS, HostCapabilities(cgroup="v1", memory=True))
    assert partial.memory == "cgroup v1" and partial.cpu is None and len(partial.problems) == 1
    # nothing asked, nothing to warn about
    assert enforcement(AgentLimits(nice=3), HostCapabilities()).problems == ()


def test_host_capabilities_from_an_untrusted_answer() -> None:
    caps = HostCapabilities.from_facts({"cgroup": "v9", "cpu": "yes", "memory": True,
                                        "init_system": None})
    assert caps == HostCapabilities(init_system="none", cgroup=None, cpu=False, memory=True)
    assert HostCapabilities.from_facts(None) == HostCapabilities()


def test_agent_config_carries_limits_as_numbers() -> None:
    config = AgentConfig(name="a", project="p", bind_address="127.0.0.1", port=7443,
                         ca_cert="c", cert="c", key="k", data_path="d", state_file="s",
                         cpu_quota=50, memory_max=300 << 20, nice=-5)
    again = parse_agent_config(render_agent_config(config), "agent.json")
    assert again == config and again.limits == AgentLimits(50, 300 << 20, -5)
    text = render_agent_config(config).replace(f"{300 << 20}", '"300M"')
    with pytest.raises(ConfigError, match="expected an integer"):
        parse_agent_config(text, "agent.json")


def test_oom_reason_names_the_limit() -> None:
    assert oom_reason(300 << 20) == "out of memory (limit 300 MB)"
    assert oom_reason(512 << 20) == "out of memory (limit 512 MB)"
    assert oom_reason(3 << 29) == "out of memory (limit 1.5 GB)"
    assert oom_reason(None) == "out of memory"


def test_the_exit_note_is_taken_once(tmp_path: Path) -> None:
    note = exits.exit_file(str(tmp_path / "run" / "agent-state.json"))
    assert note == tmp_path / "run" / "last_exit.json"
    (tmp_path / "run").mkdir()
    assert exits.take(note) is None
    exits.record(note, "out of memory (limit 300 MB)", oom=True)
    assert exits.take(note) == {"reason": "out of memory (limit 300 MB)", "oom": True}
    assert exits.take(note) is None          # gone: a later restart reports nothing stale
    note.write_text("not json")
    assert exits.take(note) is None
    assert exits.describe(-9) == "killed by SIGKILL" and exits.describe(3) == "exited with code 3"


def test_systemd_oom_kill_is_noted_by_exec_stop_post(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    config = AgentConfig(name="a", project="p", bind_address="127.0.0.1", port=7443,
                         ca_cert="c", cert="c", key="k", data_path="d",
                         state_file=str(tmp_path / "state.json"), memory_max=512 << 20)
    path = tmp_path / "agent.json"
    path.write_text(render_agent_config(config))
    monkeypatch.setenv("SERVICE_RESULT", "exit-code")
    assert exits.main(["--config", str(path)]) == 0
    assert not (tmp_path / exits.FILE).exists()
    monkeypatch.setenv("SERVICE_RESULT", "oom-kill")
    assert exits.main(["--config", str(path)]) == 0
    assert exits.take(tmp_path / exits.FILE) == {"reason": "out of memory (limit 512 MB)",
                                                 "oom": True}


def test_the_coordinator_believes_an_oom_only_of_a_restart_during_its_request() -> None:
    oom = {"reason": "out of memory (limit 300 MB)", "oom": True}
    with pytest.raises(HostError, match=r"^out of memory \(limit 300 MB\)$"):
        _raise_if_killed_by_it({"have": "none", "last_exit": oom, "uptime_s": 2.0}, 10.0)
    # the agent restarted before this request began: not this request's doing
    _raise_if_killed_by_it({"have": "none", "last_exit": oom, "uptime_s": 60.0}, 10.0)
    # any other death: the request is sent again, as before
    _raise_if_killed_by_it({"last_exit": {"reason": "the agent killed by SIGKILL",
                                          "oom": False}, "uptime_s": 1.0}, 10.0)
    # nonsense from a host is ignored, markup is cleaned
    _raise_if_killed_by_it({"last_exit": "oom", "uptime_s": 1.0}, 10.0)
    _raise_if_killed_by_it({"last_exit": oom, "uptime_s": True}, 10.0)
    with pytest.raises(HostError) as caught:
        _raise_if_killed_by_it({"last_exit": {"reason": "x\x1b]0;t\x07y" * 100, "oom": True},
                                "uptime_s": 0.5}, 10.0)
    assert "\x1b" not in caught.value.message and len(caught.value.message) <= 200


def test_cgroup_v2_gets_cpu_max_and_memory_max(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine has v1 controllers only: v2's files are checked on a plain
    directory standing in for /sys/fs/cgroup (what is written where)."""
    from flctl.agent import limits as agent_limits

    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    monkeypatch.setattr(agent_limits, "_v2_root", lambda: tmp_path)
    caps = HostCapabilities(cgroup="v2", cpu=True, memory=True)
    made = agent_limits.create("flctl-p-a-0", AgentLimits(250, 512 << 20, 3), caps)
    leaf = tmp_path / "flctl" / "flctl-p-a-0"
    assert made == {"cpu": str(leaf), "memory": str(leaf)}
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+cpu +memory"
    assert (tmp_path / "flctl" / "cgroup.subtree_control").read_text() == "+cpu +memory"
    assert (leaf / "cpu.max").read_text() == "250000 100000"   # 2.5 CPUs
    assert (leaf / "memory.max").read_text() == str(512 << 20)
    # only what is asked for, and only what the host can do
    assert agent_limits.create("x", AgentLimits(nice=3), caps) == {}
    assert agent_limits.create("y", AgentLimits(cpu_percent=50),
                               HostCapabilities(cgroup="v2", memory=True)) == {}
    (leaf / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 2\n")
    assert agent_limits.oom_kills(str(leaf)) == 2
    assert agent_limits.memory_limit(str(leaf)) == 512 << 20
