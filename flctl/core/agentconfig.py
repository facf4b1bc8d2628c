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
        wanted = int if str(spec.type).startswith("int") else str
        optional = "None" in str(spec.type)
        if (value is None and not optional) or (value is not None and (
                isinstance(value, bool) or not isinstance(value, wanted))):
            raise ConfigError(f"expected {'an integer' if wanted is int else 'a string'}",
                              file=source, field=name)
    try:
        return AgentConfig(**values)
    except TypeError as exc:
        raise ConfigError(str(exc), file=source) from None
