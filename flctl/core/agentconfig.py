"""The agent's configuration file, rendered by deploy and read by the agent.

Deploy decides whether a restart is needed by comparing the rendered text
with what is on the host, so rendering must be deterministic (sorted keys,
no timestamps). What the agent runs is fixed here, at deploy: `task` is a
built-in task or a `module:Class` from the shipped `tasks_dir`, and a
request naming any other task is refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from flctl.core.limits import AgentLimits
from flctl.errors import ConfigError


@dataclass(frozen=True)
class AgentConfig:
    name: str
    project: str
    bind_address: str
    port: int
    ca_cert: str
    cert: str
    key: str
    data_path: str
    state_file: str
    task: str = "logreg"
    tasks_dir: str | None = None
    # for the task's own loader, load_data(data_path, data_params)
    data_params: dict[str, Any] = field(default_factory=dict)
    crl: str | None = None
    # The system user the agent runs as on its host; None: whoever starts it
    # (local hosts run as the operator).
    user: str | None = None
    max_message_mb: int = 64
    # The GPUs this agent may use: None (none: it trains on the CPU), "all",
    # or indices as nvidia-smi numbers them ("0,2"); see flctl.agent.gpu.
    gpus: str | None = None
    # The task's frozen part on this host, a file or folder (flctl.core.frozen);
    # None: the whole model is federated.
    frozen_path: str | None = None
    # Resource limits (flctl.core.limits): CPU percent (100 = one CPU), bytes,
    # niceness; None: no limit. Enforced by whatever keeps the agent running.
    cpu_quota: int | None = None
    memory_max: int | None = None
    nice: int | None = None
    # Sites (flctl.core.sites). `site`: the site this host is in; with
    # `site_aggregator`, the one site certificate (flctl.core.pki ROLE_SITE,
    # naming this site and that host) whose `fit` requests this agent obeys.
    site: str | None = None
    site_aggregator: str | None = None
    # The aggregator only: member name -> "ADDRESS:PORT" of its agent (overlay
    # address for SSH hosts, 127.0.0.1 for local ones; itself included), and
    # the paths of its site certificate and key, its client identity to them.
    site_members: dict[str, str] = field(default_factory=dict)
    site_cert: str | None = None
    site_key: str | None = None

    @property
    def limits(self) -> AgentLimits:
        return AgentLimits(self.cpu_quota, self.memory_max, self.nice)


# Keys an older flctl wrote; read and dropped so its agent starts until the
# next deploy rewrites the file.
_RETIRED_KEYS = frozenset({"task_path"})


def render_agent_config(config: AgentConfig) -> str:
    return json.dumps(asdict(config), indent=2, sort_keys=True) + "\n"


def parse_agent_config(text: str, source: str) -> AgentConfig:
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"not valid JSON: {exc.msg}", file=source, line=exc.lineno) from None
    if not isinstance(data, dict):
        raise ConfigError("expected a JSON object", file=source)
    known = set(AgentConfig.__dataclass_fields__)
    unknown = sorted(set(data) - known - _RETIRED_KEYS)
    if unknown:
        raise ConfigError("unknown key", file=source, field=unknown[0])
    values = {k: v for k, v in data.items() if k in known}
    for name, spec in AgentConfig.__dataclass_fields__.items():
        if name not in values:
            continue
        value = values[name]
        if name == "data_params":
            if not isinstance(value, dict):
                raise ConfigError("expected an object", file=source, field=name)
            continue
        if name == "site_members":
            _check_site_members(value, source)
            continue
        wanted = int if str(spec.type).startswith("int") else str
        optional = "None" in str(spec.type)
        if (value is None and not optional) or (value is not None and (
                isinstance(value, bool) or not isinstance(value, wanted))):
            raise ConfigError(f"expected {'an integer' if wanted is int else 'a string'}",
                              file=source, field=name)
    try:
        config = AgentConfig(**values)
    except TypeError as exc:
        raise ConfigError(str(exc), file=source) from None
    _check_site(config, source)
    return config


def parse_endpoint(value: str) -> tuple[str, int] | None:
    """("ADDRESS", PORT) from "ADDRESS:PORT" (an IPv6 address in brackets), else None."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return (host, int(port)) if host and not any(c.isspace() for c in host) else None


def _check_site_members(value: Any, source: str) -> None:
    if not isinstance(value, dict):
        raise ConfigError("expected an object (member name -> \"ADDRESS:PORT\")",
                          file=source, field="site_members")
    for member, endpoint in value.items():
        if not isinstance(endpoint, str) or parse_endpoint(endpoint) is None:
            raise ConfigError(f"member {member!r}: expected \"ADDRESS:PORT\", got {endpoint!r}",
                              file=source, field="site_members")


def _check_site(config: AgentConfig, source: str) -> None:
    """The site fields go together: a member names its site and aggregator; an
    aggregator (site_members) also has its certificate and key and is a member."""
    if (config.site is None) != (config.site_aggregator is None):
        raise ConfigError("site and site_aggregator are set together", file=source,
                          field="site" if config.site is None else "site_aggregator")
    aggregating = bool(config.site_members) or config.site_cert or config.site_key
    if not aggregating:
        return
    for name in ("site_cert", "site_key"):
        if getattr(config, name) is None:
            raise ConfigError("a site aggregator needs its site certificate and key",
                              file=source, field=name)
    if config.site_aggregator != config.name:
        raise ConfigError(f"only the site's aggregator ({config.site_aggregator!r}) lists "
                          f"site members, not {config.name!r}", file=source, field="site_members")
    if config.name not in config.site_members:
        raise ConfigError(f"the aggregator {config.name!r} must list itself", file=source,
                          field="site_members")
