"""The variables a host may have in inventory.yaml, each with its check.

Every value is checked where it is written (file, line, field in the
error), and only these names are accepted; the defaults are what a host
gets when no group and no host sets a variable.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any, Callable

from flctl.core.limits import check_cpu_quota, check_memory_max, check_nice
from flctl.core.yamlsrc import (
    Spot,
    describe,
    expect_bool,
    expect_choice,
    expect_int,
    expect_mapping,
    expect_str,
)

CONNECTIONS = ("ssh", "local")
# What `ssh-keygen -lf` prints: SHA256 of the key blob, base64 without padding.
HOST_KEY_RE = re.compile(r"SHA256:([A-Za-z0-9+/]{43})=?\Z")
# Hostnames, IPv4 and IPv6 literals; a leading '-' could pass as an ssh option.
SSH_HOST_RE = re.compile(r"[A-Za-z0-9_:\[][A-Za-z0-9_.:%\[\]-]*\Z")
SSH_USER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\Z")
PYTHON_RE = re.compile(r"[A-Za-z0-9_./+-]+\Z")
# Set per host only: the same value in group vars is always a conflict.
HOST_ONLY_VARS = frozenset({"overlay_ip"})


def _ssh_host(value: Any, spot: Spot) -> str:
    text = expect_str(value, spot)
    if not SSH_HOST_RE.match(text):
        raise spot.error(f"not a host name or IP address: {text!r}")
    return text


def _ssh_user(value: Any, spot: Spot) -> str:
    text = expect_str(value, spot)
    if not SSH_USER_RE.match(text):
        raise spot.error(f"not a valid user name: {text!r}")
    return text


def _port(value: Any, spot: Spot) -> int:
    return expect_int(value, spot, minimum=1, maximum=65535)


# Agents do not run as root, so they can only bind ports from 1024 up.
UNPRIVILEGED_PORTS = (1024, 65535)


def expect_agent_port(value: Any, spot: Spot) -> int:
    """A port the agent, running unprivileged, can listen on."""
    port = expect_int(value, spot)
    low, high = UNPRIVILEGED_PORTS
    if not low <= port <= high:
        raise spot.error(f"{port} is not a port an unprivileged agent can listen on "
                         f"(use {low}..{high})")
    return port


def _optional_agent_port(value: Any, spot: Spot) -> int | None:
    return None if value is None else expect_agent_port(value, spot)


def _optional_path(value: Any, spot: Spot) -> str | None:
    return None if value is None else expect_str(value, spot)


def _host_key(value: Any, spot: Spot) -> str | None:
    if value is None:
        return None
    text = expect_str(value, spot)
    match = HOST_KEY_RE.match(text)
    if not match:
        raise spot.error('expected "SHA256:<43 base64 characters>" as printed by '
                         f"ssh-keygen -lf, got {text!r}")
    return f"SHA256:{match.group(1)}"


def _overlay_ip(value: Any, spot: Spot) -> ipaddress.IPv4Address:
    text = expect_str(value, spot)
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise spot.error(f"not an IPv4 address: {text!r}") from None


def _data_params(value: Any, spot: Spot) -> dict[str, Any]:
    """Parameters for the task's own data loader on this host: plain JSON values."""
    mapping = expect_mapping(value, spot)
    params: dict[str, Any] = {}
    for key, item in mapping.items():
        item_spot = spot.key(mapping, key)
        if not isinstance(key, str) or not key:
            raise item_spot.error(f"parameter names must be strings, got {describe(key)}")
        try:
            json.dumps(item, allow_nan=False)
        except (TypeError, ValueError):
            raise item_spot.error(f"must be plain values (numbers, strings, lists, "
                                  f"mappings), got {describe(item)}") from None
        params[key] = item
    return params


def _labels(value: Any, spot: Spot) -> dict[str, str]:
    mapping = expect_mapping(value, spot)
    labels: dict[str, str] = {}
    for key, item in mapping.items():
        item_spot = spot.key(mapping, key)
        if not isinstance(key, str) or not key:
            raise item_spot.error(f"label names must be strings, got {describe(key)}")
        labels[key] = expect_str(item, item_spot, allow_empty=True)
    return labels


def _python(value: Any, spot: Spot) -> str:
    text = expect_str(value, spot)
    if not PYTHON_RE.match(text) or text.startswith("-"):
        raise spot.error(f"expected an interpreter name or path such as python3, got {text!r}")
    return text


MAX_GPU_INDEX = 255


def _gpus(value: Any, spot: Spot) -> str:
    """"all", "none", or GPU indices as nvidia-smi numbers them, kept as the
    text CUDA_VISIBLE_DEVICES takes ("0,2")."""
    if value in ("all", "none"):
        return value
    if not isinstance(value, list) or not value:
        raise spot.error(f"expected all, none or a list of GPU indices such as [0, 1], "
                         f"got {describe(value)}")
    indices = [expect_int(item, spot, minimum=0, maximum=MAX_GPU_INDEX) for item in value]
    if len(set(indices)) != len(indices):
        raise spot.error(f"a GPU is listed twice: {indices}")
    return ",".join(str(i) for i in sorted(indices))


CHECKS: dict[str, Callable[[Any, Spot], Any]] = {
    "connection": lambda v, s: expect_choice(v, s, CONNECTIONS),
    "ssh_host": _ssh_host,
    "ssh_port": _port,
    "ssh_user": _ssh_user,
    "ssh_key": _optional_path,
    "host_key": _host_key,
    "become": expect_bool,
    "overlay_ip": _overlay_ip,
    "data_path": lambda v, s: expect_str(v, s),
    "data_params": _data_params,
    "labels": _labels,
    "agent_port": _optional_agent_port,
    "python": _python,
    "gpus": _gpus,
    # the task's frozen part on this host, placed there by the user (flctl.core.frozen)
    "frozen_path": _optional_path,
    # resource limits of this host's agent (flctl.core.limits); unset: agent.* in flctl.yaml
    "agent_cpu_quota": check_cpu_quota,
    "agent_memory_max": check_memory_max,
    "agent_nice": check_nice,
}
HOST_VARS = tuple(CHECKS)
DEFAULTS: dict[str, Any] = {
    "connection": "ssh",
    "ssh_host": None,
    "ssh_port": 22,
    "ssh_user": "root",
    "ssh_key": None,
    "host_key": None,
    "become": False,
    "agent_port": None,
    "python": "python3",
    "gpus": "all",
    "frozen_path": None,
    "agent_cpu_quota": None,
    "agent_memory_max": None,
    "agent_nice": None,
}


