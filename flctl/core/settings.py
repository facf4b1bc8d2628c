"""flctl.yaml: project, overlay, agent and training settings.

Every section and key is optional, so a fresh workspace can start from a
nearly empty file; the defaults live only in the dataclass field defaults
below. Values are checked strictly (a boolean is not a port, 20.0 is not a
round count) because a typo here otherwise surfaces as a confusing failure
on a remote host many minutes later.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable

from flctl.core.frozen import is_sha256
from flctl.core.host_vars import expect_agent_port
from flctl.core.limits import check_cpu_quota, check_memory_max, check_nice
from flctl.core.yamlsrc import (
    LineDict,
    Spot,
    check_keys,
    describe,
    did_you_mean,
    expect_bool,
    expect_choice,
    expect_float,
    expect_int,
    expect_mapping,
    expect_str,
    load_yaml,
    read_config_text,
    to_plain,
    yaml_scalar,
)
from flctl.errors import ConfigError

PROJECT_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,39}\Z")
# A builtin name ("logreg") or an importable class ("my_pkg.tasks:Cnn").
PLUGIN_RE = re.compile(r"[a-z][a-z0-9_]*\Z|[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*\Z")
LISTEN_CHOICES = ("overlay", "underlay")
COMPRESSION_CHOICES = ("float32", "float16", "int8", "topk")
PRIVACY_CHOICES = ("none", "central", "local")  # not "off": YAML reads that as false
STANDARDIZE_CHOICES = ("auto", "on", "off")
TRACKING_CHOICES = ("none", "tensorboard", "mlflow")
MAX_PREFIXLEN = 30  # hub + network + broadcast + at least one host
MAX_MESSAGE_MB = 65536


@dataclass(frozen=True)
class OverlaySettings:
    subnet: ipaddress.IPv4Network = ipaddress.IPv4Network("10.213.0.0/24")
    port: int = 51820

    @property
    def hub_ip(self) -> ipaddress.IPv4Address:
        """The coordinator's overlay address: the subnet's first host address."""
        return self.subnet.network_address + 1

    def __post_init__(self) -> None:
        _validate_section(self, _OVERLAY_FIELDS, "overlay")


@dataclass(frozen=True)
class AgentSettings:
    port: int = 7443
    listen: str = "overlay"
    # resource limits of every agent (flctl.core.limits); hosts may set their own
    cpu_quota: str | None = None
    memory_max: str | None = None
    nice: int | None = None

    def __post_init__(self) -> None:
        _validate_section(self, _AGENT_FIELDS, "agent")


@dataclass(frozen=True)
class TrainingSettings:
    task: str = "logreg"
    task_params: Mapping[str, Any] = field(default_factory=dict)
    strategy: str = "fedavg"
    strategy_params: Mapping[str, Any] = field(default_factory=dict)
    # Defaults measured on the demo (4 hosts, digits, Dirichlet 0.5 label
    # skew): FedAvg lands within 2 points of a converged central model over
    # seeds 0-4 (tests/test_federated_accuracy.py). More local epochs per
    # round mean fewer rounds (fewer bytes on the wire) at little drift.
    rounds: int = 20
    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.5
    # On standardised data the built-in tasks take at most the stable step
    # of the host's data (core.models.stable_step): lr 0.5 is safe however
    # wide and correlated the features are.
    lr_bound: bool = True
    fraction: float = 1.0
    min_hosts: int = 1
    # Training starts once this many hosts answer (never fewer than min_hosts):
    # "wait for the whole federation" and "accept a round with a quorum" differ.
    min_hosts_to_start: int = 1
    deadline_s: float = 300.0
    # A round with fewer than min_hosts replies is run again (hosts may be
    # restarting) this many times, retry_wait_s apart, before the run stops.
    round_retries: int = 2
    retry_wait_s: float = 5.0
    # Busy agents send a heartbeat this often; three missed ones drop the host
    # from the round long before deadline_s (0 = wait for the deadline).
    heartbeat_s: float = 2.0
    eval_every: int = 1
    # Evaluate on at most this many hosts (0 = every host): beyond that a
    # sample drawn from (seed, round) judges the model, so a large federation
    # does not send the model to every host every round.
    eval_hosts: int = 100
    seed: int = 0
    # Reject an update whose L2 distance from the global model exceeds this
    # (0 = no bound): a cheap first line against broken or hostile hosts.
    max_update_norm: float = 0.0
    # Stop once the federated accuracy reaches this (0 = run every round).
    target_accuracy: float = 0.0
    # A test file on this machine to evaluate the global model on as well
    # (relative to the workspace; "" = federated evaluation only).
    eval_file: str = ""
    # the first model, as .npz (relative to the workspace); empty: the task's init()
    initial_weights: str = ""
    # The frozen part every host must load (flctl.core.frozen), as its sha256;
    # empty: the one most hosts have.
    frozen_sha256: str = ""
    # How hosts send their update: float32 as trained, float16, int8 with
    # stochastic rounding, or topk (params: fraction) with error feedback.
    compression: str = "float32"
    compression_params: Mapping[str, Any] = field(default_factory=dict)
    # Differential privacy (DP-FedAvg): "central" clips every update and the
    # coordinator adds noise to the aggregate; "local" hosts noise their own.
    privacy: str = "none"
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    dp_delta: float = 1e-5
    # Stop before the privacy budget would exceed this epsilon (0 = no limit).
    target_epsilon: float = 0.0
    # The coordinator learns only the sum of the round's updates (SecAgg+).
    # Standardise the built-in tasks' features with the federated mean and
    # std (flctl.core.fedstats): auto = when magnitudes differ by more than
    # 100x or values are missing; the transform is stored with the run.
    standardize: str = "auto"
    # Hand the federated statistics to a user's task (task_params["stats"]).
    task_stats: bool = False
    secure_aggregation: bool = False
    # SecAgg+ graph: each host masks with k neighbours (0 = chosen from the host
    # count: every other host below 14 hosts, O(log n) above).
    secagg_neighbours: int = 0
    # Hosts of each neighbourhood (k + 1) needed to unmask (0 = two thirds).
    secagg_threshold: int = 0
    # Where the run's settings and rounds also go (flctl.tracking): TensorBoard
    # event files under tracking_dir (default <workspace>/tensorboard, one
    # sub-directory per run), or MLflow at tracking_uri (empty: MLflow's own
    # default) in experiment tracking_experiment (empty: the project's name).
    tracking: str = "none"
    tracking_dir: str = ""
    tracking_uri: str = ""
    tracking_experiment: str = ""

    def __post_init__(self) -> None:
        _validate_section(self, _TRAINING_FIELDS, "training")

    def __hash__(self) -> int:  # params are mappings; hash the scalars only
        return hash((self.task, self.strategy, self.rounds, self.seed, self.lr))


@dataclass(frozen=True)
class LimitSettings:
    max_message_mb: int = 64

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

    def __post_init__(self) -> None:
        _validate_section(self, _LIMIT_FIELDS, "limits")


@dataclass(frozen=True)
class Settings:
    project: str = "demo"
    overlay: OverlaySettings = field(default_factory=OverlaySettings)
    agent: AgentSettings = field(default_factory=AgentSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    # OpenSSH client config for aliases and ProxyJump: None = ~/.ssh/config
    # when it exists, "none" = no config (as `ssh -F none`); else a path.
    ssh_config: str | None = None
    # An Ansible inventory (INI or YAML) read instead of inventory.yaml ("": that file).
    inventory: str = ""

    def __post_init__(self) -> None:
        _check_project(self.project, Spot(None, None, "project"))

    def __hash__(self) -> int:
        return hash((self.project, self.overlay, self.agent, self.training, self.limits))

    def with_training(self, **overrides: Any) -> Settings:
        """A copy with some training values replaced (e.g. from CLI flags).

        Overrides are validated like the file; errors name `training.<key>`.
        """
        known = {f.name for f in dataclasses.fields(TrainingSettings)}
        for name in overrides:
            if name not in known:
                raise ConfigError(f"unknown training setting{did_you_mean(name, known)}",
                                  field=f"training.{name}")
        training = dataclasses.replace(self.training, **overrides)
        return dataclasses.replace(self, training=training)


# ---------------------------------------------------------------- validators

Check = Callable[[Any, Spot], Any]


def _port(value: Any, spot: Spot) -> int:
    return expect_int(value, spot, minimum=1, maximum=65535)


def _subnet(value: Any, spot: Spot) -> ipaddress.IPv4Network:
    if isinstance(value, ipaddress.IPv4Network):
        network = value
    else:
        text = expect_str(value, spot)
        if "/" not in text:
            raise spot.error(f"give the prefix length, e.g. {text}/24")
        try:
            interface = ipaddress.IPv4Interface(text)
        except ValueError:
            raise spot.error(f"not an IPv4 network like 10.213.0.0/24: {text!r}") from None
        network = interface.network
        if interface.ip != network.network_address:
            raise spot.error(f"{text} has host bits set (did you mean {network}?)")
    if network.prefixlen > MAX_PREFIXLEN:
        raise spot.error(f"{network} is too small: use a /{MAX_PREFIXLEN} or larger network")
    return network


def _plugin(value: Any, spot: Spot) -> str:
    text = expect_str(value, spot)
    if not PLUGIN_RE.match(text):
        raise spot.error(f"expected a builtin name or 'package.module:Class', got {text!r}")
    return text


def _params(value: Any, spot: Spot) -> Mapping[str, Any]:
    if isinstance(value, MappingProxyType):
        value = dict(value)
    if not isinstance(value, Mapping):
        raise spot.error(f"expected a mapping, got {describe(value)}")
    return MappingProxyType(to_plain(value, spot))


def _positive_int(value: Any, spot: Spot) -> int:
    return expect_int(value, spot, minimum=1)


def _positive_float(value: Any, spot: Spot) -> float:
    return expect_float(value, spot, above=0.0)


def _check_project(value: Any, spot: Spot) -> str:
    text = expect_str(value, spot)
    if not PROJECT_RE.match(text):
        raise spot.error("must be 1-40 lowercase letters, digits or '-', "
                         f"starting with a letter or digit, got {text!r}")
    return text


def _standardize(value: Any, spot: Spot) -> str:
    """auto | on | off; YAML reads a bare on/off as true/false, so those count too."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return expect_choice(value, spot, STANDARDIZE_CHOICES)


def _sha256_or_empty(value: Any, spot: Spot) -> str:
    text = expect_str(value, spot, allow_empty=True).lower()
    if text and not is_sha256(text):
        raise spot.error(f"expected 64 hex digits (sha256sum's output), got {text!r}")
    return text

# Top-level keys naming a file beside (or relative to) the workspace.
_WORKSPACE_FILES = ("ssh_config", "inventory")


def _workspace_file(value: Any, spot: Spot, base: Path) -> str:
    """A path that must exist (`ssh_config: none` turns the SSH config off)."""
    text = expect_str(value, spot)
    if spot.field == "ssh_config" and text == "none":
        return text
    if not resolve_path(text, base).is_file():
        raise spot.error(f"{resolve_path(text, base)} does not exist (or is not a file)")
    return text


def resolve_path(text: str, base: Path) -> Path:
    """`text` with ~ expanded, relative to `base`."""
    path = Path(text).expanduser()
    return path if path.is_absolute() else base / path


_OVERLAY_FIELDS: dict[str, Check] = {"subnet": _subnet, "port": _port}
_AGENT_FIELDS: dict[str, Check] = {
    "port": expect_agent_port,
    "listen": lambda v, s: expect_choice(v, s, LISTEN_CHOICES),
    "cpu_quota": check_cpu_quota,
    "memory_max": check_memory_max,
    "nice": check_nice,
}
_TRAINING_FIELDS: dict[str, Check] = {
    "task": _plugin,
    "task_params": _params,
    "strategy": _plugin,
    "strategy_params": _params,
    "rounds": _positive_int,
    "epochs": _positive_int,
    "batch_size": _positive_int,
    "lr": _positive_float,
    "lr_bound": expect_bool,
    "fraction": lambda v, s: expect_float(v, s, above=0.0, maximum=1.0),
    "min_hosts": _positive_int,
    "min_hosts_to_start": _positive_int,
    "deadline_s": _positive_float,
    "round_retries": lambda v, s: expect_int(v, s, minimum=0, maximum=100),
    "retry_wait_s": lambda v, s: expect_float(v, s, minimum=0.0),
    "heartbeat_s": lambda v, s: expect_float(v, s, minimum=0.0),
    "eval_every": _positive_int,
    "eval_hosts": lambda v, s: expect_int(v, s, minimum=0),
    "seed": lambda v, s: expect_int(v, s, minimum=0, maximum=2**32 - 1),  # any numpy RNG
    "max_update_norm": lambda v, s: expect_float(v, s, minimum=0.0),
    "target_accuracy": lambda v, s: expect_float(v, s, minimum=0.0, maximum=1.0),
    "eval_file": lambda v, s: expect_str(v, s, allow_empty=True),
    "initial_weights": lambda v, s: expect_str(v, s, allow_empty=True),
    "frozen_sha256": _sha256_or_empty,
    "compression": lambda v, s: expect_choice(v, s, COMPRESSION_CHOICES),
    "compression_params": _params,
    "privacy": lambda v, s: expect_choice(v, s, PRIVACY_CHOICES),
    "clip_norm": _positive_float,
    "noise_multiplier": lambda v, s: expect_float(v, s, minimum=0.0),
    "dp_delta": lambda v, s: expect_float(v, s, above=0.0, maximum=0.1),
    "target_epsilon": lambda v, s: expect_float(v, s, minimum=0.0),
    "standardize": _standardize,
    "task_stats": expect_bool,
    "secure_aggregation": expect_bool,
    "secagg_neighbours": lambda v, s: expect_int(v, s, minimum=0),
    "secagg_threshold": lambda v, s: expect_int(v, s, minimum=0),
    "tracking": lambda v, s: expect_choice(v, s, TRACKING_CHOICES),
    "tracking_dir": lambda v, s: expect_str(v, s, allow_empty=True),
    "tracking_uri": lambda v, s: expect_str(v, s, allow_empty=True),
    "tracking_experiment": lambda v, s: expect_str(v, s, allow_empty=True),
}
_LIMIT_FIELDS: dict[str, Check] = {
    "max_message_mb": lambda v, s: expect_int(v, s, minimum=1, maximum=MAX_MESSAGE_MB),
}
_SECTIONS: dict[str, tuple[type, dict[str, Check]]] = {
    "overlay": (OverlaySettings, _OVERLAY_FIELDS),
    "agent": (AgentSettings, _AGENT_FIELDS),
    "training": (TrainingSettings, _TRAINING_FIELDS),
    "limits": (LimitSettings, _LIMIT_FIELDS),
}


def _validate_section(section: Any, checks: Mapping[str, Check], name: str) -> None:
    """Normalise and check a section built in code (defaults, replace())."""
    for key, check in checks.items():
        value = check(getattr(section, key), Spot(None, None, f"{name}.{key}"))
        object.__setattr__(section, key, value)


# ---------------------------------------------------------------- load / parse


def load_settings(path: Path) -> Settings:
    """Read and validate flctl.yaml; a missing file is a ConfigError naming it."""
    return parse_settings(read_config_text(path), str(path))


def parse_settings(text: str, source: str) -> Settings:
    data = load_yaml(text, source)
    top = Spot(source, 1, None)
    if data is None:
        return Settings()
    if not isinstance(data, LineDict):
        raise top.at(line=getattr(data, "line", 1)).error(
            f"expected a mapping of settings, got {describe(data)}")
    check_keys(data, ("project", *_WORKSPACE_FILES, *_SECTIONS), top)
    values: dict[str, Any] = {}
    if "project" in data:
        values["project"] = _check_project(data["project"], top.key(data, "project"))
    for name in _WORKSPACE_FILES:
        if name in data:
            values[name] = _workspace_file(data[name], top.key(data, name), Path(source).parent)
    for name, (cls, checks) in _SECTIONS.items():
        if name not in data:
            continue
        section_spot = top.key(data, name)
        section = expect_mapping(data[name], section_spot)
        check_keys(section, tuple(checks), section_spot)
        fields = {key: checks[key](value, section_spot.key(section, key))
                  for key, value in section.items()}
        values[name] = cls(**fields)
    return Settings(**values)


# ---------------------------------------------------------------- render

_COMMENT_COLUMN = 31
_COMMENTS = {
    "project": "[a-z0-9][a-z0-9-]{0,39}",
    "overlay.subnet": "IPv4 network for WireGuard; the hub takes the first host address",
    "overlay.port": "WireGuard UDP port",
    "agent.port": "TLS port of agents; local hosts use port + index",
    "agent.listen": "overlay | underlay (where agents bind; local hosts always 127.0.0.1)",
    "agent.cpu_quota": 'CPU share of each agent, "50%" = half a CPU (null: no limit)',
    "agent.memory_max": 'memory of each agent, "512M", "2G" (null: no limit)',
    "agent.nice": "scheduling priority -20..19 (null: unchanged)",
    "training.task": 'builtin name or "pkg.mod:Class"',
    "training.task_params": "passed to the task constructor; the built-in tasks need "
                            "n_features and n_classes (the model's shape is yours to set)",
    "training.strategy": "aggregation strategy",
    "training.strategy_params": "passed to the strategy constructor",
    "training.rounds": "federated rounds",
    "training.epochs": "local epochs per round",
    "training.batch_size": "local mini-batch size",
    "training.lr": "local learning rate (the built-in tasks' largest step)",
    "training.lr_bound": "built-in tasks on standardised data: step at most "
                         "4/lambda_max of the host's data",
    "training.fraction": "fraction of hosts per round (0,1]",
    "training.min_hosts": "minimum replies to accept a round",
    "training.min_hosts_to_start": "hosts that must answer before round 1",
    "training.deadline_s": "per-round deadline in seconds",
    "training.round_retries": "re-runs of a round short of min_hosts",
    "training.retry_wait_s": "pause before re-running a round",
    "training.heartbeat_s": "agent heartbeat while busy; 3 missed = down (0: off)",
    "training.eval_every": "evaluate every N rounds",
    "training.eval_hosts": "evaluate on at most N hosts, sampled by seed and round "
                           "(0: every host)",
    "training.seed": "seed for sampling and initialisation",
    "training.max_update_norm": "reject updates farther than this from the model (0: off)",
    "training.target_accuracy": "stop early at this federated accuracy (0: off)",
    "training.eval_file": "also evaluate on this local test file (npz/csv; empty: off)",
    "training.initial_weights": "the first model as .npz (empty: the task's init(); for "
                                "your own tasks one host makes it, so this machine needs "
                                "no PyTorch)",
    "training.frozen_sha256": "the frozen part's sha256 every host must have (empty: "
                              "what most hosts have; see frozen_path)",
    "training.compression": "float32 | float16 | int8 | topk (update encoding)",
    "training.compression_params": "topk: {fraction: 0.05}",
    "training.privacy": "none | central | local (DP-FedAvg)",
    "training.clip_norm": "DP: L2 bound on each update",
    "training.noise_multiplier": "DP: noise std / clip_norm",
    "training.dp_delta": "DP: delta of the reported (epsilon, delta)",
    "training.target_epsilon": "DP: stop before epsilon exceeds this (0: no limit)",
    "training.standardize": "auto | on | off: standardise built-in tasks' features with "
                            "the federated mean/std (auto: scales differ >100x or values "
                            "missing)",
    "training.task_stats": "give your task the federated statistics (task_params.stats)",
    "training.secure_aggregation": "coordinator sees only the sum (SecAgg+)",
    "training.secagg_neighbours": "SecAgg+ neighbours per host (0: by host count)",
    "training.secagg_threshold": "neighbourhood hosts needed to unmask (0: 2/3)",
    "training.tracking": "none | tensorboard | mlflow (also log settings and rounds there)",
    "training.tracking_dir": "TensorBoard log dir (empty: <workspace>/tensorboard)",
    "training.tracking_uri": "MLflow tracking URI (empty: MLflow's default)",
    "training.tracking_experiment": "MLflow experiment (empty: the project name)",
    "limits.max_message_mb": "largest protocol frame (large messages travel in chunks)",
}


def render_settings(settings: Settings) -> str:
    """flctl.yaml text, with a comment per key, that parses back to `settings`."""
    lines = ["# flctl.yaml: project settings. Every key is optional; a key left out",
             "# takes its default.",
             _line(0, "project", settings.project, "project")]
    for name in _SECTIONS:
        section = getattr(settings, name)
        lines.append(f"{name}:")
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, ipaddress.IPv4Network):
                value = str(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            lines.append(_line(2, f.name, value, f"{name}.{f.name}"))
    for name in _WORKSPACE_FILES:
        if getattr(settings, name):
            lines.append(_line(0, name, getattr(settings, name), name))
    return "\n".join(lines) + "\n"


def _line(indent: int, key: str, value: Any, dotted: str) -> str:
    text = f"{' ' * indent}{key}: {yaml_scalar(value)}"
    comment = _COMMENTS.get(dotted)
    if not comment:
        return text
    return f"{text.ljust(_COMMENT_COLUMN - 1)} # {comment}"
