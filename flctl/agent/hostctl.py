"""Host-side half of deploy: small commands run *on* the host.

Deploy reaches a host only through a connector (run a command, put a file,
get a file). Everything that must happen on the host itself (making the
private key so it never travels, starting the supervisor detached, reading
/proc) is one subcommand here, printing one JSON document. The same code
serves local hosts and SSH hosts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from flctl import __version__
from flctl.agent.services import init_system, listening_ports, read_text, service_for
from flctl.core.facts import parse_loadavg, parse_meminfo, parse_os_release, process_uptime_s
from flctl.core.fsutil import write_secret
from flctl.errors import FlctlError


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _uptime(pid: int | None) -> float | None:
    if pid is None:
        return None
    stat = read_text(Path(f"/proc/{pid}/stat"))
    uptime = read_text(Path("/proc/uptime"))
    if stat is None or uptime is None:
        return None
    return round(process_uptime_s(stat, float(uptime.split()[0]), os.sysconf("SC_CLK_TCK")), 1)


def _privilege() -> str:
    if os.geteuid() == 0:
        return "root"
    if shutil.which("sudo"):
        probe = subprocess.run(["sudo", "-n", "true"], capture_output=True)
        if probe.returncode == 0:
            return "sudo"
    return "none"


def cmd_facts(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.root)
    os_release = parse_os_release(read_text(Path("/etc/os-release")) or "")
    disk = shutil.disk_usage(root if root.exists() else root.parent if root.parent.exists() else "/")
    service = service_for(root)
    return {
        "flctl_version": __version__,
        "python": platform.python_version(),
        "os": os_release.get("PRETTY_NAME", platform.system()),
        "arch": platform.machine(),
        "init_system": init_system(),
        "privilege": _privilege(),
        "disk_free_bytes": disk.free,
        "listening_ports": sorted(listening_ports()),
        "key_exists": (root / "agent.key").exists(),
        "files": {
            name: _sha256(root / name)
            for name in ("agent.crt", "ca.crt", "agent.json", "firewall.nft")
        },
        "wg_files": {p.name: _sha256(p) for p in sorted((root / "wg").glob("*"))
                     if p.is_file()},
        "net_interfaces": sorted(os.listdir("/sys/class/net")),
        "firewall": _firewall_state(root / "firewall"),
        "cert_pem": read_text(root / "agent.crt"),
        "tasks": {str(p.relative_to(root / "tasks")): _sha256(p)
                  for p in sorted((root / "tasks").rglob("*.py"))
                  if "__pycache__" not in p.parts},
        "service": service.kind,
        "service_pid": service.pid(),
        "agent_pid": service.agent_pid(),
        "data": _data_summary(args.data) if args.data else None,
    }


def _firewall_state(state_dir: Path) -> dict[str, Any] | None:
    """flctl's table as loaded vs as last applied (None: no nft on this host)."""
    if not shutil.which("nft"):
        return None
    from flctl.agent import firewall

    try:
        state = firewall.status(state_dir)
    except FlctlError as exc:
        return {"error": exc.message}
    return {"present": state["present"], "as_applied": state.get("as_applied", False),
            "armed": state.get("armed")}


def _data_summary(path: str) -> dict[str, Any]:
    """Whether the host's data loads, and its size (one call with the facts:
    each host-side Python start costs ~0.1-0.3 s)."""
    from flctl.core.data import load_dataset

    try:
        dataset = load_dataset(path)
    except FlctlError as exc:
        return {"path": path, "error": exc.message}
    return {"path": path, "n_train": dataset.n_train, "n_test": dataset.n_test,
            "n_features": dataset.n_features, "n_classes": dataset.n_classes}


def cmd_csr(args: argparse.Namespace) -> dict[str, Any]:
    """Make the agent key here (if missing) and return only a CSR."""
    from flctl.core import pki  # cryptography costs ~0.1 s to import; only this needs it

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path = root / "agent.key"
    created = False
    if not key_path.exists():
        old_umask = os.umask(0o077)
        try:
            write_secret(key_path, pki.make_private_key())
        finally:
            os.umask(old_umask)
        created = True
    csr = pki.make_csr(key_path.read_bytes(), args.cn, args.dns or (), args.ip or ())
    return {"csr_pem": csr.decode(), "key_created": created}


def cmd_start(args: argparse.Namespace) -> dict[str, Any]:
    service = service_for(Path(args.root))
    changed = service.start(args.port, args.timeout)
    return {"changed": changed, "service": service.kind, "service_pid": service.pid()}


def cmd_stop(args: argparse.Namespace) -> dict[str, Any]:
    return {"changed": service_for(Path(args.root)).stop(args.timeout)}


def cmd_restart(args: argparse.Namespace) -> dict[str, Any]:
    service = service_for(Path(args.root))
    service.stop(args.timeout)
    service.start(args.port, args.timeout)
    return {"changed": True, "service": service.kind, "service_pid": service.pid()}


def cmd_remove(args: argparse.Namespace) -> dict[str, Any]:
    """Stop the agent and delete its state; the user's data is left alone."""
    root = Path(args.root)
    stopped = service_for(root).remove(args.timeout)
    existed = root.exists()
    if existed:
        shutil.rmtree(root)
    return {"changed": stopped or existed}


def cmd_status(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.root)
    service = service_for(root)
    agent = service.agent_pid()
    mem = parse_meminfo(read_text(Path("/proc/meminfo")) or "")
    disk = shutil.disk_usage(root if root.exists() else "/")
    gpus: list[str] = []
    if shutil.which("nvidia-smi"):
        probe = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,utilization.gpu,memory.used,memory.total",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=10,
        )
        gpus = [line.strip() for line in probe.stdout.splitlines() if line.strip()]
    return {
        "service": service.kind,
        "service_pid": service.pid(),
        "agent_pid": agent,
        "agent_uptime_s": _uptime(agent),
        "load": list(parse_loadavg(read_text(Path("/proc/loadavg")) or "0 0 0")),
        "mem_total_bytes": mem.get("MemTotal"),
        "mem_available_bytes": mem.get("MemAvailable"),
        "disk_free_bytes": disk.free,
        "gpus": gpus,
        "interfaces": sorted(os.listdir("/sys/class/net")),
    }


def cmd_logs(args: argparse.Namespace) -> dict[str, Any]:
    text = read_text(Path(args.root) / "agent.log") or ""
    return {"lines": text.splitlines()[-args.lines:]}


# ------------------------------------------------------------------ overlay and firewall
# WireGuard and nftables (flctl.agent.tunnel / flctl.agent.firewall), imported
# per command: the other subcommands never pay for them.


def cmd_wg_key(args: argparse.Namespace) -> dict[str, Any]:
    """Make this machine's WireGuard key here (if missing); only the public half leaves."""
    from flctl.agent.tunnel import ensure_keypair

    return {"public_key": ensure_keypair(Path(args.dir))}


def cmd_wg_psk(args: argparse.Namespace) -> dict[str, Any]:
    """The pair's preshared key arrives on stdin (never on a command line)."""
    from flctl.agent.tunnel import write_preshared_key

    return {"changed": write_preshared_key(Path(args.path), sys.stdin.read())}


def cmd_wg_up(args: argparse.Namespace) -> dict[str, Any]:
    from flctl.agent.tunnel import implementation, interface_of, tunnel_up, userspace_pid

    config = Path(args.config)
    result = tunnel_up(config)
    interface = interface_of(config)
    return {"result": result, "interface": interface,
            "implementation": implementation(interface), "pid": userspace_pid(interface)}


def cmd_wg_down(args: argparse.Namespace) -> dict[str, Any]:
    from flctl.agent.tunnel import tunnel_down

    return {"changed": tunnel_down(Path(args.config))}


def cmd_wg_show(args: argparse.Namespace) -> dict[str, Any]:
    from flctl.agent.tunnel import tunnel_state

    return tunnel_state(args.interface)


def cmd_fw_apply(args: argparse.Namespace) -> dict[str, Any]:
    from flctl.agent.firewall import apply_with_rollback

    return apply_with_rollback(Path(args.ruleset), Path(args.state), args.timeout)


def cmd_fw_confirm(args: argparse.Namespace) -> dict[str, Any]:
    from flctl.agent.firewall import confirm, status

    disarmed = confirm(Path(args.state))
    return {"disarmed": disarmed,
            "rolled_back": status(Path(args.state))["rolled_back_at"] is not None}


def cmd_fw_rollback(args: argparse.Namespace) -> dict[str, Any]:
    from flctl.agent.firewall import rollback_now

    return {"changed": rollback_now(Path(args.state))}


def cmd_fw_remove(args: argparse.Namespace) -> dict[str, Any]:
    from flctl.agent.firewall import remove

    return {"changed": remove(Path(args.state) if args.state else None)}


def cmd_fw_status(args: argparse.Namespace) -> dict[str, Any]:
    from flctl.agent.firewall import status

    return status(Path(args.state) if args.state else None)


def _add_network_commands(sub: Any) -> None:
    """Overlay and firewall subcommands: no --root, each names its own paths."""

    def add(name: str, func: Any, *required: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name)
        p.set_defaults(func=func)
        for option in required:
            p.add_argument(option, required=True)
        return p

    add("wg-key", cmd_wg_key, "--dir")
    add("wg-psk", cmd_wg_psk, "--path")
    add("wg-up", cmd_wg_up, "--config")
    add("wg-down", cmd_wg_down, "--config")
    add("wg-show", cmd_wg_show, "--interface")
    add("fw-apply", cmd_fw_apply, "--ruleset", "--state").add_argument(
        "--timeout", type=float, required=True, help="seconds until the rollback fires")
    add("fw-confirm", cmd_fw_confirm, "--state")
    add("fw-rollback", cmd_fw_rollback, "--state")
    add("fw-remove", cmd_fw_remove).add_argument("--state")
    add("fw-status", cmd_fw_status).add_argument("--state")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flctl-hostctl")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Any, *, port: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name)
        p.set_defaults(func=func)
        p.add_argument("--root", required=True)
        p.add_argument("--timeout", type=float, default=20.0)
        if port:
            p.add_argument("--port", type=int, required=True)
        return p

    add("facts", cmd_facts).add_argument("--data", help="also check this data file loads")
    csr = add("csr", cmd_csr)
    csr.add_argument("--cn", required=True)
    csr.add_argument("--dns", action="append")
    csr.add_argument("--ip", action="append")
    add("start", cmd_start, port=True)
    add("restart", cmd_restart, port=True)
    add("stop", cmd_stop)
    add("remove", cmd_remove)
    add("status", cmd_status)
    add("logs", cmd_logs).add_argument("--lines", type=int, default=100)
    _add_network_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except FlctlError as exc:
        print(json.dumps({"error": exc.message}))
        return 1
    except OSError as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
