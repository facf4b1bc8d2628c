"""flctl.yaml: defaults, strict validation with file/line/field, render roundtrip."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import pytest

from flctl.core.settings import (
    AgentSettings,
    LimitSettings,
    OverlaySettings,
    Settings,
    TrainingSettings,
    load_settings,
    parse_settings,
    render_settings,
)
from flctl.errors import ConfigError

FULL = """\
# flctl.yaml
project: demo                  # [a-z0-9][a-z0-9-]{0,39}
overlay:
  subnet: 10.213.0.0/24        # IPv4 network for WireGuard; hub takes the first host address
  port: 51820                  # WireGuard UDP port
agent:
  port: 7443                   # TLS port of agents; local hosts use port + index
  listen: overlay              # overlay | underlay
training:
  task: logreg                 # builtin name or "pkg.mod:Class"
  task_params: {}              # passed to the task constructor
  strategy: fedavg
  strategy_params: {}
  rounds: 20
  epochs: 5
  batch_size: 32
  lr: 0.5
  fraction: 1.0                # fraction of hosts per round (0,1]
  min_hosts: 1                 # minimum replies to accept a round
  deadline_s: 300.0            # per-round deadline
  eval_every: 1
  seed: 0
limits:
  max_message_mb: 64
"""


def test_documented_file_equals_the_defaults() -> None:
    settings = parse_settings(FULL, "flctl.yaml")
    assert settings == Settings()
    assert settings.overlay.subnet == ipaddress.IPv4Network("10.213.0.0/24")
    assert settings.overlay.hub_ip == ipaddress.IPv4Address("10.213.0.1")
    assert (settings.agent.port, settings.agent.listen) == (7443, "overlay")
    assert (settings.training.rounds, settings.training.lr) == (20, 0.5)
    assert settings.limits.max_message_bytes == 64 * 1024 * 1024


@pytest.mark.parametrize("text", ["", "# only a comment\n", "overlay:\n", "training: {}\n"])
def test_everything_is_optional(text: str) -> None:
    assert parse_settings(text, "flctl.yaml") == Settings()


def test_values_are_read_and_typed() -> None:
    text = """\
project: lab-2
overlay: {subnet: 198.19.0.0/24, port: 51000}
agent: {port: 9000, listen: underlay}
training:
  task: my_pkg.tasks:Cnn
  task_params: {hidden: [64, 32], dropout: 0.5}
  strategy: fedprox
  strategy_params: {mu: 0.01}
  rounds: 5
  lr: 1
  fraction: 0.5
  min_hosts: 3
  deadline_s: 60
  seed: 42
limits: {max_message_mb: 64}
"""
    s = parse_settings(text, "flctl.yaml")
    assert s.project == "lab-2"
    assert s.overlay == OverlaySettings(ipaddress.IPv4Network("198.19.0.0/24"), 51000)
    assert s.agent == AgentSettings(9000, "underlay")
    assert s.training.task == "my_pkg.tasks:Cnn"
    assert dict(s.training.task_params) == {"hidden": [64, 32], "dropout": 0.5}
    assert type(s.training.task_params["hidden"]) is list          # plain, JSON-ready
    assert isinstance(s.training.lr, float) and s.training.lr == 1.0
    assert isinstance(s.training.deadline_s, float)
    assert (s.training.rounds, s.training.epochs, s.training.seed) == (5, 5, 42)
    assert s.limits == LimitSettings(64)


# (yaml text, line, field, message fragment)
BAD = [
    ("project: Demo\n", 1, "project", "lowercase letters"),
    ("project: " + "a" * 41 + "\n", 1, "project", "1-40"),
    ("projet: demo\n", 1, "projet", "unknown key (did you mean 'project'?)"),
    ("trainig: {}\n", 1, "trainig", "unknown key (did you mean 'training'?)"),
    ("training:\n  rouns: 3\n", 2, "training.rouns", "did you mean 'rounds'?"),
    ("training: [1, 2]\n", 1, "training", "expected a mapping, got a list"),
    ("training:\n  rounds: 0\n", 2, "training.rounds", "must be >= 1, got 0"),
    ("training:\n  rounds: true\n", 2, "training.rounds", "expected an integer, got boolean true"),
    ("training:\n  rounds: 20.0\n", 2, "training.rounds", "expected an integer, got number 20.0"),
    ("training:\n  batch_size: '32'\n", 2, "training.batch_size", "expected an integer, got string"),
    ("training:\n  epochs: -1\n", 2, "training.epochs", "must be >= 1"),
    ("training:\n  lr: 0\n", 2, "training.lr", "must be > 0"),
    ("training:\n  lr: -0.1\n", 2, "training.lr", "must be > 0"),
    ("training:\n  lr: .inf\n", 2, "training.lr", "finite"),
    ("training:\n  lr: yes\n", 2, "training.lr", "expected a number, got boolean true"),
    ("training:\n  fraction: 0\n", 2, "training.fraction", "must be > 0"),
    ("training:\n  fraction: 1.5\n", 2, "training.fraction", "must be <= 1"),
    ("training:\n  min_hosts: 0\n", 2, "training.min_hosts", ">= 1"),
    ("training:\n  min_hosts_to_start: 0\n", 2, "training.min_hosts_to_start", ">= 1"),
    ("training:\n  round_retries: -1\n", 2, "training.round_retries", "between 0 and 100"),
    ("training:\n  retry_wait_s: -1\n", 2, "training.retry_wait_s", ">= 0"),
    ("training:\n  heartbeat_s: -2\n", 2, "training.heartbeat_s", ">= 0"),
    ("training:\n  deadline_s: 0\n", 2, "training.deadline_s", "must be > 0"),
    ("training:\n  eval_every: 0\n", 2, "training.eval_every", ">= 1"),
    ("training:\n  eval_hosts: -1\n", 2, "training.eval_hosts", ">= 0"),
    ("training:\n  seed: -1\n", 2, "training.seed", "between 0 and 4294967295, got -1"),
    ("training:\n  task: 'my tasks'\n", 2, "training.task", "builtin name or 'package.module:Class'"),
    ("training:\n  strategy: 3\n", 2, "training.strategy", "expected a string, got integer 3"),
    ("training:\n  task_params: [1]\n", 2, "training.task_params", "expected a mapping"),
    ("training:\n  task_params:\n    when: 2024-01-01\n", 3, "training.task_params.when",
     "unsupported value"),
    ("training:\n  strategy_params: {1: a}\n", 2, "training.strategy_params.1",
     "keys must be strings"),
    ("overlay:\n  port: 0\n", 2, "overlay.port", "between 1 and 65535, got 0"),
    ("overlay:\n  port: 70000\n", 2, "overlay.port", "between 1 and 65535, got 70000"),
    ("overlay:\n  port: true\n", 2, "overlay.port", "expected an integer, got boolean true"),
    ("agent:\n  port: abc\n", 2, "agent.port", "expected an integer, got string 'abc'"),
    ("agent:\n  listen: public\n", 2, "agent.listen", "expected 'overlay' or 'underlay'"),
    ("overlay:\n  subnet: 10.213.0.1/24\n", 2, "overlay.subnet",
     "host bits set (did you mean 10.213.0.0/24?)"),
    ("overlay:\n  subnet: 10.213.0.0/31\n", 2, "overlay.subnet", "too small"),
    ("overlay:\n  subnet: 10.213.0.0\n", 2, "overlay.subnet", "prefix length"),
    ("overlay:\n  subnet: fd00::/64\n", 2, "overlay.subnet", "not an IPv4 network"),
    ("overlay:\n  subnet: 300.1.1.0/24\n", 2, "overlay.subnet", "not an IPv4 network"),
    ("limits:\n  max_message_mb: 0\n", 2, "limits.max_message_mb", "between 1 and"),
    ("- project\n", 1, None, "expected a mapping of settings, got a list"),
    ("training:\n  rounds: 1\n  rounds: 2\n", 3, None, "duplicate key 'rounds' (first at line 2)"),
    ("training:\n  rounds: [1\n", 3, None, "invalid YAML"),
]


@pytest.mark.parametrize(("text", "line", "field", "fragment"), BAD,
                         ids=[f"{b[2]}:{b[3][:25]}" for b in BAD])
def test_bad_values_name_file_line_and_field(text: str, line: int, field: str | None,
                                             fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(text, "flctl.yaml")
    err = info.value
    assert (err.file, err.line, err.field) == ("flctl.yaml", line, field), str(err)
    assert fragment in err.reason, str(err)
    assert str(err).startswith(f"flctl.yaml:{line}: ")


def _custom() -> Settings:
    return Settings(
        project="x9",
        overlay=OverlaySettings(ipaddress.IPv4Network("198.19.0.0/16"), 4000),
        agent=AgentSettings(8443, "underlay"),
        training=TrainingSettings(task="pkg.mod:Task", task_params={"layers": [3, {"k": None}],
                                                                    "flag": True, "s": "yes"},
                                  strategy="fedadam", strategy_params={"beta": 1e-5},
                                  rounds=3, epochs=2, batch_size=7, lr=3e-4, fraction=0.25,
                                  min_hosts=2, deadline_s=12.5, eval_every=5, seed=123),
        limits=LimitSettings(1),
    )


@pytest.mark.parametrize("settings", [Settings(), _custom()], ids=["defaults", "custom"])
def test_render_roundtrip(settings: Settings) -> None:
    text = render_settings(settings)
    assert parse_settings(text, "flctl.yaml") == settings
    # Every key is written out with a comment, so the file documents itself.
    for section in ("overlay", "agent", "training", "limits"):
        for f in dataclasses.fields(getattr(settings, section)):
            line = next(ln for ln in text.splitlines() if ln.startswith(f"  {f.name}:"))
            assert "# " in line, line


def test_custom_differs_from_defaults_after_roundtrip() -> None:
    # Guards the roundtrip test against a parser that ignores its input.
    assert parse_settings(render_settings(_custom()), "f") != Settings()


def test_with_training_replaces_and_validates() -> None:
    base = Settings()
    changed = base.with_training(rounds=3, lr=1, task_params={"hidden": 8})
    assert (changed.training.rounds, changed.training.lr) == (3, 1.0)
    assert isinstance(changed.training.lr, float)
    assert dict(changed.training.task_params) == {"hidden": 8}
    assert changed.training.batch_size == base.training.batch_size
    assert changed.overlay == base.overlay and base.training.rounds == 20
    with pytest.raises(ConfigError) as info:
        base.with_training(rounds=0)
    assert info.value.field == "training.rounds" and "must be >= 1" in info.value.reason
    with pytest.raises(ConfigError, match="expected an integer, got boolean true"):
        base.with_training(epochs=True)
    with pytest.raises(ConfigError, match=r"training.round: .*did you mean 'rounds'"):
        base.with_training(round=3)


def test_direct_construction_is_validated_and_frozen() -> None:
    with pytest.raises(ConfigError, match="training.fraction"):
        TrainingSettings(fraction=0.0)
    with pytest.raises(ConfigError, match="project"):
        Settings(project="Bad Name")
    s = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.training.rounds = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.training.task_params["x"] = 1  # type: ignore[index]
    assert hash(s) == hash(Settings())


def test_load_settings_reads_file_and_names_a_missing_one(tmp_path: Path) -> None:
    path = tmp_path / "flctl.yaml"
    path.write_text("training:\n  rounds: 7\n")
    assert load_settings(path).training.rounds == 7
    path.write_text("training:\n  rounds: nope\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value).startswith(f"{path}:2: training.rounds: ")
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "missing.yaml")
    assert info.value.file == str(tmp_path / "missing.yaml")
    assert "not found" in info.value.reason


def test_alias_expansion_is_bounded() -> None:
    levels = ["    l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i in range(1, 7):          # 10**7 values once expanded
        refs = ", ".join([f"*l{i - 1}"] * 10)
        levels.append(f"    l{i}: &l{i} [{refs}]")
    text = "training:\n  task_params:\n" + "\n".join(levels) + "\n"
    with pytest.raises(ConfigError, match="too many values"):
        parse_settings(text, "flctl.yaml")
    small = "training:\n  task_params:\n" + "\n".join(levels[:3]) + "\n"
    assert len(parse_settings(small, "flctl.yaml").training.task_params["l2"]) == 10
