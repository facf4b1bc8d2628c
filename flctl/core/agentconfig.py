"""The agent's configuration file, rendered by deploy and read by the agent.

Deploy decides whether a restart is needed by comparing the rendered text
with what is on the host, so rendering must be deterministic (sorted keys,
no timestamps).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

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
    task_path: tuple[str, ...] = field(default_factory=tuple)
    max_message_mb: int = 2048


def render_agent_config(config: AgentConfig) -> str:
    data = asdict(config)
    data["task_path"] = list(config.task_path)
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def parse_agent_config(text: str, source: str) -> AgentConfig:
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"not valid JSON: {exc.msg}", file=source, line=exc.lineno) from None
    if not isinstance(data, dict):
        raise ConfigError("expected a JSON object", file=source)
    known = set(AgentConfig.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError("unknown key", file=source, field=unknown[0])
    try:
        data["task_path"] = tuple(data.get("task_path", ()))
        return AgentConfig(**data)
    except TypeError as exc:
        raise ConfigError(str(exc), file=source) from None
