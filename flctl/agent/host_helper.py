"""The host helper: deploy's commands that run *on* the host (as root there).

Deploy reaches a host only through a connector (run a command, put a file,
get a file). Everything that must happen on the host itself (making the
private key so it never travels, creating the agent's user, starting the
supervisor detached, the tunnel and the firewall, reading /proc) is one
subcommand here, printing one JSON document. The same code serves local
hosts and SSH hosts. It is the only part of flctl that keeps root on a
host; the agent it starts does not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Any

from flctl import __version__
from flctl.agent import gpu, limits
from flctl.agent.launcher import (
    ensure_user,
    init_system,
    listening_ports,
    prepare_run_dir,
    read_config,
    read_text,
    service_for,
    user_ids,
)
from flctl.agent.proc import owned_processes, proc_stat
from flctl.core.facts import (
    NVIDIA_SMI_QUERY,
    parse_loadavg,
    parse_meminfo,
    parse_nvidia_smi_query,
    parse_os_release,
    parse_proc_stat_cpu,
)
from flctl.core.fsutil import atomic_write, file_sha256_or_none, write_secret
from flctl.core.layout import HostPaths
from flctl.errors import FlctlError

HELPER_MODULE = "flctl.agent.host_helper"
TASK_CHECK_MODULE = "flctl.agent.task_check"
TASK_CHECK_FILE = "task-check.json"
USER_GONE_WAIT_S = 15.0


def _uptime(pid: int | None) -> float | None:
    stat = proc_stat(pid) if pid is not None else None
    uptime = read_text(Path("/proc/uptime"))
    if stat is None or uptime is None:
        return None
    seconds = float(uptime.split()[0]) - stat.start_ticks / os.sysconf("SC_CLK_TCK")
    return round(max(0.0, seconds), 1)


def _privilege() -> str:
    if os.geteuid() == 0:
        return "root"
    if shutil.which("sudo"):
        probe = subprocess.run(["sudo", "-n", "true"], capture_output=True)
        if probe.returncode == 0:
            return "sudo"
    return "none"


def _user_exists(name: str | None) -> bool | None:
    if not name:
        return None
    try:
        user_ids(name)
        return True
    except FlctlError:
        return False


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
        "site_key_exists": (root / "site.key").exists(),
        "site_cert_pem": read_text(root / "site.crt"),
        "files": {
            name: file_sha256_or_none(root / name)
            for name in ("agent.crt", "ca.crt", "ca.crl", "agent.json", "firewall.nft")
        },
        "wg_files": {p.name: file_sha256_or_none(p) for p in sorted((root / "wg").glob("*"))
                     if p.is_file()},
        "agent_user": args.user,
        "agent_user_exists": _user_exists(args.user),
        "boot_current": service.boot_current() if (root / "agent.json").exists() else False,
        "net_interfaces": sorted(os.listdir("/sys/class/net")),
        "firewall": _firewall_state(root / "firewall"),
        "cert_pem": read_text(root / "agent.crt"),
        "tasks": {str(p.relative_to(root / "tasks")): file_sha256_or_none(p)
                  for p in sorted((root / "tasks").rglob("*.py"))
                  if "__pycache__" not in p.parts},
        # the frozen part deploy ships (flctl.core.frozen): every file, hashed
        "frozen": {str(p.relative_to(root / "frozen")): file_sha256_or_none(p)
                   for p in sorted((root / "frozen").rglob("*")) if p.is_file()},
        "service": service.kind,
        "service_pid": service.pid(),
        "agent_pid": service.agent_pid(),
        # the flctl the running agent started with (None: none runs, or it
        # predates this record): older than flctl_version means restart it
        "agent_version": (read_text(Path(HostPaths(PurePosixPath(root)).agent_version))
                          or "").strip()[:64] or None,
        "task_check": _task_check_result(root),
        "gpu_count": gpu.count(),
        # what can bound the agent's CPU and memory here (flctl.core.limits)
        "limits": limits.probe(),
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


def _task_check_result(root: Path) -> dict[str, Any] | None:
    try:
        result = json.loads((root / TASK_CHECK_FILE).read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) else None


def cmd_task_check(args: argparse.Namespace) -> dict[str, Any]:
    """Can the deployed task start here? Run as the agent's user (it imports the
    user's task and reads the data as the agent will); kept for `status`."""
    root = Path(args.root)
    config = read_config(root)
    if config is None:
        raise FlctlError(f"{root / 'agent.json'} is missing: nothing deployed here")
    as_user: dict[str, Any] = {}
    if config.user and os.geteuid() == 0:
        prepare_run_dir(HostPaths(PurePosixPath(root)), config.user)   # it must read its config
        uid, gid = user_ids(config.user)
        as_user = {"user": uid, "group": gid, "extra_groups": []}
    try:
        done = subprocess.run([sys.executable, "-m", TASK_CHECK_MODULE, "--config",
                               str(root / "agent.json")], capture_output=True, text=True,
                              timeout=args.timeout, cwd="/", **as_user)
    except subprocess.TimeoutExpired:
        raise FlctlError(f"checking the task took longer than {args.timeout:g} s") from None
    lines = done.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        result = {"error": f"the task check crashed: {tail}"}
    if not isinstance(result, dict):
        result = {"error": "the task check answered nonsense"}
    atomic_write(root / TASK_CHECK_FILE, json.dumps(result))
    return {"check": result}


def cmd_csr(args: argparse.Namespace) -> dict[str, Any]:
    """Make the agent key here (if missing, or anew with --new-key) and return
    only a CSR. With --owner the key belongs to the agent's user (0600). With
    --key site.key: a site aggregator's second key, made the same way."""
    from flctl.core import pki  # cryptography costs ~0.1 s to import; only this needs it

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True, mode=0o755)
    key_path = root / args.key
    created = False
    if args.new_key or not key_path.exists():
        old_umask = os.umask(0o077)
        try:
            write_secret(key_path, pki.make_private_key())
        finally:
            os.umask(old_umask)
        created = True
    if args.owner and os.geteuid() == 0:
        uid, gid = user_ids(args.owner)
        os.chown(key_path, uid, gid)
        os.chmod(key_path, 0o600)
    csr = pki.make_csr(key_path.read_bytes(), args.cn, args.dns or (), args.ip or ())
    return {"csr_pem": csr.decode(), "key_created": created}


def cmd_ensure_user(args: argparse.Namespace) -> dict[str, Any]:
    changed = ensure_user(args.name)
    uid, gid = user_ids(args.name)
    return {"changed": changed, "user": args.name, "uid": uid, "gid": gid}


def cmd_remove_user(args: argparse.Namespace) -> dict[str, Any]:
    """Remove the agent's user once no deployment under the state root is left."""
    if not _user_exists(args.name):
        return {"changed": False}
    state_root = Path(args.unless_used_under)
    if state_root.is_dir() and any(state_root.iterdir()):
        return {"changed": False, "kept": "other deployments still use it"}
    uid = user_ids(args.name)[0]
    # The agent was just stopped: wait until none of its processes (a zombie not yet
    # reaped included) is left in this host's network namespace, then remove the user
    # even if userdel sees processes of the same uid elsewhere (a shared PID
    # namespace, as in the lab, shows other hosts' agents too).
    deadline = time.monotonic() + USER_GONE_WAIT_S
    while owned_processes(uid, same_netns=True) and time.monotonic() < deadline:
        time.sleep(0.1)
    userdel = shutil.which("userdel") or "/usr/sbin/userdel"
    done = subprocess.run([userdel, "--force", args.name], capture_output=True, text=True,
                          timeout=60)
    if done.returncode != 0:
        raise FlctlError(f"userdel {args.name}: {done.stderr.strip() or 'failed'}")
    return {"changed": True}


def cmd_install_boot(args: argparse.Namespace) -> dict[str, Any]:
    service = service_for(Path(args.root))
    return {"result": service.install_boot(), "service": service.kind}


def cmd_boot(args: argparse.Namespace) -> dict[str, Any]:
    """What a host runs at boot (cron @reboot where there is no systemd): the
    firewall table, then the tunnel, then the agent; each step idempotent."""
    from flctl.agent.firewall import load_table
    from flctl.agent.tunnel import tunnel_up

    root = Path(args.root)
    config = read_config(root)
    if config is None:
        raise FlctlError(f"{root / 'agent.json'} is missing: nothing deployed here")
    done: dict[str, Any] = {}
    if (root / "firewall.nft").exists():
        load_table(root / "firewall.nft")
        done["firewall"] = "loaded"
    for tunnel in sorted((root / "wg").glob("*.conf")):
        done["tunnel"] = tunnel_up(tunnel)
    service = service_for(root)
    done["agent"] = "started" if service.start(config.port, args.timeout) else "running"
    return done


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


def _gpu_usage() -> list[dict[str, Any]] | None:
    """Each GPU's utilisation and memory (None: no nvidia-smi, or it failed)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        probe = subprocess.run(list(NVIDIA_SMI_QUERY), capture_output=True, text=True,
                               timeout=10, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvidia_smi_query(probe.stdout) if probe.returncode == 0 else None


def _cpu() -> dict[str, int] | None:
    try:
        ticks = parse_proc_stat_cpu(read_text(Path("/proc/stat")) or "")
    except ValueError:
        return None
    return {"busy_ticks": ticks.busy, "total_ticks": ticks.total, "count": os.cpu_count() or 1}


def cmd_status(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(args.root)
    service = service_for(root)
    agent = service.agent_pid()
    mem = parse_meminfo(read_text(Path("/proc/meminfo")) or "")
    disk = shutil.disk_usage(root if root.exists() else "/")
    gpu_usage = _gpu_usage()
    return {
        "service": service.kind,
        "service_pid": service.pid(),
        "agent_pid": agent,
        "agent_uptime_s": _uptime(agent),
        "load": list(parse_loadavg(read_text(Path("/proc/loadavg")) or "0 0 0")),
        "cpu": _cpu(),
        "mem_total_bytes": mem.get("MemTotal"),
        "mem_available_bytes": mem.get("MemAvailable"),
        "disk_free_bytes": disk.free,
        "gpus": [_gpu_line(g) for g in gpu_usage or []],
        "gpu_usage": gpu_usage,
        "interfaces": sorted(os.listdir("/sys/class/net")),
        "environment": (_task_check_result(root) or {}).get("versions"),
    }


def _gpu_line(gpu: dict[str, Any]) -> str:
    """A GPU as `status --json` has always listed it: "name, 35 %, 1024 MiB, 40960 MiB"."""
    def mib(value: int | None) -> str:
        return "[N/A]" if value is None else f"{value // (1024 * 1024)} MiB"
    utilization = gpu["utilization_pct"]
    return (f"{gpu['name']}, {'[N/A]' if utilization is None else f'{utilization:.0f} %'}, "
            f"{mib(gpu['memory_used_bytes'])}, {mib(gpu['memory_total_bytes'])}")


def cmd_logs(args: argparse.Namespace) -> dict[str, Any]:
    text = read_text(Path(HostPaths(PurePosixPath(args.root)).log)) or ""
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


REACH_TIMEOUT_S = 5.0


def cmd_reach(args: argparse.Namespace) -> dict[str, Any]:
    """From this host, a TCP connect to each NAME=ADDRESS:PORT (in parallel):
    can a site's aggregator reach its members' agents over the overlay? Only
    the connection is made; nothing is sent."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    from flctl.core.agentconfig import parse_endpoint

    def one(target: str) -> tuple[str, str | None]:
        name, _, endpoint = target.partition("=")
        parsed = parse_endpoint(endpoint)
        if not name or parsed is None:
            return name or target, f"not NAME=ADDRESS:PORT: {target!r}"
        try:
            with socket.create_connection(parsed, timeout=args.timeout):
                return name, None
        except OSError as exc:
            return name, (f"timed out after {args.timeout:g} s" if isinstance(exc, TimeoutError)
                          else exc.strerror or str(exc))

    with ThreadPoolExecutor(max_workers=min(32, max(1, len(args.to)))) as pool:
        return {"unreachable": {name: error for name, error in pool.map(one, args.to)
                                if error is not None}}


def cmd_fw_apply(args: argparse.Namespace) -> dict[str, Any]:
    from flctl.agent.firewall import apply_with_rollback

    return apply_with_rollback(Path(args.ruleset), Path(args.state), args.timeout)


def cmd_fw_arm(args: argparse.Namespace) -> dict[str, Any]:
    """Arm the rollback before the tunnel changes (a new interface is undone too)."""
    from flctl.agent.firewall import arm

    return {"armed": arm(Path(args.state), args.timeout, args.new_interface)}


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
    fw_arm = add("fw-arm", cmd_fw_arm, "--state")
    fw_arm.add_argument("--timeout", type=float, required=True)
    fw_arm.add_argument("--new-interface", help="delete this interface on rollback if new")
    add("fw-confirm", cmd_fw_confirm, "--state")
    add("fw-rollback", cmd_fw_rollback, "--state")
    add("fw-remove", cmd_fw_remove).add_argument("--state")
    reach = add("reach", cmd_reach)
    reach.add_argument("--to", action="append", required=True, help="NAME=ADDRESS:PORT")
    reach.add_argument("--timeout", type=float, default=REACH_TIMEOUT_S)
    add("fw-status", cmd_fw_status).add_argument("--state")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flctl-host-helper")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Any, *, port: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name)
        p.set_defaults(func=func)
        p.add_argument("--root", required=True)
        p.add_argument("--timeout", type=float, default=20.0)
        if port:
            p.add_argument("--port", type=int, required=True)
        return p

    facts = add("facts", cmd_facts)
    facts.add_argument("--user", help="the agent's user: report whether it exists")
    csr = add("csr", cmd_csr)
    csr.add_argument("--cn", required=True)
    csr.add_argument("--dns", action="append")
    csr.add_argument("--ip", action="append")
    csr.add_argument("--owner", help="the agent's user, who owns the key")
    csr.add_argument("--new-key", action="store_true", help="replace the key")
    csr.add_argument("--key", choices=("agent.key", "site.key"), default="agent.key",
                     help="which key: the agent's, or a site aggregator's")
    add("install-boot", cmd_install_boot)
    add("task-check", cmd_task_check).set_defaults(timeout=600.0)
    add("boot", cmd_boot)
    add("start", cmd_start, port=True)
    add("restart", cmd_restart, port=True)
    add("stop", cmd_stop)
    add("remove", cmd_remove)
    add("status", cmd_status)
    add("logs", cmd_logs).add_argument("--lines", type=int, default=100)
    user = sub.add_parser("ensure-user")
    user.set_defaults(func=cmd_ensure_user)
    user.add_argument("--name", required=True)
    unuser = sub.add_parser("remove-user")
    unuser.set_defaults(func=cmd_remove_user)
    unuser.add_argument("--name", required=True)
    unuser.add_argument("--unless-used-under", required=True)
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
