"""Deploy: facts -> plan against desired state -> apply -> verify -> recap.

Each step compares what the host has (facts gathered by one host-side
command) with what the workspace wants, and acts only on a difference; that
difference is what "changed" means, so a second deploy reports 0 changed
and uploads nothing. Hosts run in parallel and independently: one host's
failure is recorded in its result, never raised past it.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from flctl.core import pki
from flctl.core.agentconfig import AgentConfig, render_agent_config
from flctl.core.fsutil import atomic_write
from flctl.core.inventory import Host
from flctl.core.layout import (
    REMOTE_STATE_ROOT,
    Endpoint,
    HostPaths,
    agent_endpoint,
    certificate_names,
    host_paths,
)
from flctl.core.renderers import render_nft_ruleset
from flctl.deploy.connector import Connector, HostUnreachable
from flctl.deploy.hostcmd import ConnectOptions, StepFailed, connect, hostctl
from flctl.deploy.install import (
    INSTALL_DIR,
    VENV_PYTHON,
    BundleCache,
    ensure_agent_software,
    installed,
)
from flctl.deploy.overlay import Hub
from flctl.errors import FlctlError
from flctl.workspace import Workspace, read_wheel_lock

ProgressFn = Callable[[str, str], None]
VerifyFn = Callable[[Host, Endpoint], dict[str, Any]]
ConfirmFn = Callable[[Host, ConnectOptions, str], None]

# A firewall change is rolled back by the host itself unless a NEW SSH
# connection confirms it within this many seconds.
FIREWALL_ROLLBACK_S = 60.0


def confirm_with_new_connection(host: Host, options: ConnectOptions, state_dir: str) -> None:
    """Prove SSH still works with a fresh connection (an open one proves
    nothing: established flows survive most rulesets), then disarm."""
    fresh = connect(host, options)
    try:
        fresh.python = VENV_PYTHON
        answer = hostctl(fresh, "fw-confirm", "--state", state_dir, timeout=30)
    finally:
        fresh.close()
    if answer.get("rolled_back") or not answer.get("disarmed"):
        raise StepFailed("the rollback timer fired before the confirmation")


@dataclass
class StepResult:
    name: str
    changed: bool
    detail: str = ""


@dataclass
class HostResult:
    host: str
    status: str = "ok"  # ok | changed | failed | unreachable
    steps: list[StepResult] = field(default_factory=list)
    error: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    exit_code: int = 0  # of the expected error that failed this host, if any

    @property
    def changed(self) -> int:
        return sum(1 for step in self.steps if step.changed)

    def as_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "status": self.status,
            "changed": self.changed,
            "steps": [{"name": s.name, "changed": s.changed, "detail": s.detail} for s in self.steps],
            "error": self.error,
        }


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def connect_options(workspace: Workspace, accept_new_host_keys: bool = False) -> ConnectOptions:
    return ConnectOptions(workspace.paths.known_hosts, accept_new_host_keys)


@dataclass
class DeployContext:
    """Everything a host's deploy needs from the workspace, read once."""

    workspace: Workspace
    ca_key: bytes
    ca_cert: bytes
    check: bool
    verify: VerifyFn | None
    options: ConnectOptions
    bundles: BundleCache
    task_files: dict[str, bytes]
    hub: Hub
    confirm_new_connection: ConfirmFn
    rollback_after_s: float = FIREWALL_ROLLBACK_S


def workspace_task_files(tasks_dir: Path) -> dict[str, bytes]:
    """The user's task code, shipped to SSH hosts (relative path -> bytes)."""
    if not tasks_dir.is_dir():
        return {}
    return {str(p.relative_to(tasks_dir)): p.read_bytes() for p in sorted(tasks_dir.rglob("*.py"))
            if "__pycache__" not in p.parts}


def run_guarded(result: HostResult, action: Callable[[], None]) -> HostResult:
    """Turn a host's expected failures into its recap; never raise past it."""
    try:
        action()
        result.status = "changed" if result.changed else "ok"
    except HostUnreachable as exc:
        result.status, result.error = "unreachable", exc.message
    except FlctlError as exc:
        result.status, result.error, result.exit_code = "failed", exc.message, exc.exit_code
    except OSError as exc:
        result.status, result.error = "failed", f"{type(exc).__name__}: {exc}"
    return result


class HostDeploy:
    """The steps for one host; each records whether it changed something."""

    def __init__(self, ctx: DeployContext, host: Host, index: int, progress: ProgressFn) -> None:
        self.ctx = ctx
        self.host = host
        self.endpoint = agent_endpoint(host, ctx.workspace.settings, index)
        self.paths: HostPaths = host_paths(host, str(ctx.workspace.paths.state))
        self.progress = progress
        self.result = HostResult(host.name)
        self.overlay = (host.connection == "ssh"
                        and ctx.workspace.settings.agent.listen == "overlay")
        self.wg_public_key: str | None = None

    def step(self, name: str, changed: bool, detail: str = "") -> None:
        self.result.steps.append(StepResult(name, changed, detail))
        self.progress(self.host.name, f"{name}: {'changed' if changed else 'ok'}")

    def run(self) -> HostResult:
        def action() -> None:
            self.progress(self.host.name, "connecting")
            connector = connect(self.host, self.ctx.options)
            try:
                self._apply(connector)
            finally:
                connector.close()

        return run_guarded(self.result, action)

    def _apply(self, connector: Connector) -> None:
        if self.host.connection == "ssh":
            self.progress(self.host.name, "checking the host")
            self.result.facts["host"] = ensure_agent_software(
                connector, self.host, self.ctx.bundles, check=self.ctx.check, step=self.step)
            if self.ctx.check and self.result.changed:
                self.step("agent", True, "would configure and start after installing")
                return
        root = str(self.paths.root)
        self.progress(self.host.name, "gathering facts")
        facts = hostctl(connector, "facts", "--root", root, "--data", self.host.data_path)
        self.result.facts.update(facts)
        self._check_port(facts)
        data = facts["data"]
        if "error" in data:
            raise StepFailed(f"data: {data['error']}")
        self.step("data", False, f"{data['n_train']} train / {data['n_test']} test examples")
        changed = self._certificate(connector, facts)
        changed |= self._file(connector, "ca.crt", str(self.paths.ca_cert), self.ctx.ca_cert,
                              facts["files"].get("ca.crt"))
        changed |= self._task_code(connector, facts)
        if self.overlay:
            self._tunnel(connector, facts)
            self._firewall(connector, facts)
        config_text = render_agent_config(self._agent_config()).encode()
        changed |= self._file(connector, "agent config", str(self.paths.config), config_text,
                              facts["files"].get("agent.json"))
        self._service(connector, facts, changed)

    def verify(self) -> None:
        """After the hub is up: the agent answers over mutual TLS where the
        coordinator will reach it."""
        if self.ctx.check or self.ctx.verify is None or self.result.status not in ("ok", "changed"):
            return

        def action() -> None:
            info = self.ctx.verify(self.host, self.endpoint)  # type: ignore[misc]
            if info.get("name") != self.host.name:
                raise StepFailed(f"verify: agent answered as {info.get('name')!r}")
            self.step("verify", False, f"agent {info.get('version')} answers on "
                                       f"{self.endpoint.connect_address}:{self.endpoint.port}")

        run_guarded(self.result, action)

    def _tunnel(self, connector: Connector, facts: dict[str, Any]) -> None:
        """Host end of the WireGuard overlay; its private key is made here, on the host."""
        hub = self.ctx.hub
        wg_dir = self.paths.root / "wg"
        have: dict[str, str] = facts.get("wg_files") or {}
        known = hub.known_peers().get(self.host.name, {})
        if "private.key" in have and known.get("public_key"):
            self.wg_public_key = known["public_key"]
        elif self.ctx.check:
            self.step("tunnel", True, "would make the host's WireGuard key and bring it up")
            return
        else:
            self.wg_public_key = hostctl(connector, "wg-key", "--dir", str(wg_dir))["public_key"]
        changed = False
        psk = hub.preshared_key(self.host.name)
        if have.get("hub.psk") != sha256(psk):
            if not self.ctx.check:
                connector.put(str(wg_dir / "hub.psk"), psk, 0o600)
            changed = True
        config = hub.host_config(str(self.host.overlay_ip), str(wg_dir / "private.key"),
                                 str(wg_dir / "hub.psk"), connector.local_address()).encode()
        config_path = wg_dir / f"{hub.interface}.conf"
        if have.get(config_path.name) != sha256(config):
            if not self.ctx.check:
                connector.put(str(config_path), config, 0o600)
            changed = True
        down = hub.interface not in facts.get("net_interfaces", [])
        if not (changed or down):
            self.step("tunnel", False, f"{hub.interface} {self.host.overlay_ip}")
            return
        if self.ctx.check:
            self.step("tunnel", True, f"would bring up {hub.interface}")
            return
        answer = hostctl(connector, "wg-up", "--config", str(config_path))
        self.step("tunnel", True, f"{hub.interface} {self.host.overlay_ip}: {answer.get('result')} "
                                  f"({answer.get('implementation', 'wireguard')})")

    def _firewall(self, connector: Connector, facts: dict[str, Any]) -> None:
        """flctl's own nftables table: the agent port only from the hub, over the overlay."""
        settings = self.ctx.workspace.settings
        ruleset = render_nft_ruleset(
            interface=self.ctx.hub.interface, hub_overlay_ip=str(self.ctx.hub.overlay_ip),
            agent_port=self.endpoint.port, wg_port=settings.overlay.port,
            ssh_port=self.host.ssh_port).encode()
        path = self.paths.root / "firewall.nft"
        loaded = facts.get("firewall") or {}
        if (facts["files"].get("firewall.nft") == sha256(ruleset) and loaded.get("present")
                and loaded.get("as_applied") and not loaded.get("armed")):
            self.step("firewall", False, "inet flctl")
            return
        if self.ctx.check:
            self.step("firewall", True, "would apply table inet flctl")
            return
        state = str(self.paths.root / "firewall")
        connector.put(str(path), ruleset, 0o600)
        applied = hostctl(connector, "fw-apply", "--ruleset", str(path), "--state", state,
                          "--timeout", str(self.ctx.rollback_after_s))
        if not applied.get("armed"):
            self.step("firewall", bool(applied.get("changed")), "inet flctl")
            return
        try:
            self.ctx.confirm_new_connection(self.host, self.ctx.options, state)
        except FlctlError as exc:
            raise StepFailed(
                f"firewall: no new SSH connection after applying the rules ({exc.message}); "
                f"the host restores its previous rules within {self.ctx.rollback_after_s:.0f} s"
            ) from None
        self.step("firewall", True, "applied table inet flctl, confirmed over a new SSH connection")

    def _check_port(self, facts: dict[str, Any]) -> None:
        ours = facts.get("service_pid") is not None
        if not ours and self.endpoint.port in facts.get("listening_ports", []):
            raise StepFailed(f"port {self.endpoint.port} is already in use on the host "
                             "(set agent.port in flctl.yaml or agent_port for this host)")

    def _agent_config(self) -> AgentConfig:
        settings = self.ctx.workspace.settings
        if self.host.connection == "local":
            task_path = (str(self.ctx.workspace.paths.tasks),)
        else:
            task_path = (str(self.paths.tasks),)
        return AgentConfig(
            name=self.host.name,
            project=settings.project,
            bind_address=self.endpoint.bind_address,
            port=self.endpoint.port,
            ca_cert=str(self.paths.ca_cert),
            cert=str(self.paths.cert),
            key=str(self.paths.key),
            data_path=self.host.data_path,
            state_file=str(self.paths.state),
            task_path=task_path,
            max_message_mb=settings.limits.max_message_mb,
        )

    def _certificate_is_current(self, facts: dict[str, Any]) -> str | None:
        """None if the host's certificate is what we want, else why not."""
        if not facts.get("key_exists"):
            return "no key yet"
        cert_pem = facts.get("cert_pem")
        if not cert_pem:
            return "no certificate yet"
        if not pki.verify_issued_by(cert_pem.encode(), self.ctx.ca_cert):
            return "issued by another CA"
        info = pki.certificate_info(cert_pem.encode())
        dns, ips = certificate_names(self.host, self.endpoint)
        if sorted(info["dns_names"]) != sorted(dns) or sorted(info["ip_addresses"]) != sorted(ips):
            return "names changed"
        return None

    def _certificate(self, connector: Connector, facts: dict[str, Any]) -> bool:
        reason = self._certificate_is_current(facts)
        if reason is None:
            self.step("certificate", False)
            return False
        if self.ctx.check:
            self.step("certificate", True, f"would issue ({reason})")
            return True
        dns, ips = certificate_names(self.host, self.endpoint)
        args = ["csr", "--root", str(self.paths.root), "--cn", self.host.name]
        for name in dns:
            args += ["--dns", name]
        for ip in ips:
            args += ["--ip", ip]
        answer = hostctl(connector, *args)
        cert = pki.sign_csr(self.ctx.ca_key, self.ctx.ca_cert, answer["csr_pem"].encode())
        connector.put(str(self.paths.cert), cert, 0o644)
        self.step("certificate", True, f"issued: {reason}")
        return True

    def _file(self, connector: Connector, name: str, path: str, wanted: bytes,
              current_sha: str | None) -> bool:
        if current_sha == sha256(wanted):
            self.step(name, False)
            return False
        if not self.ctx.check:
            connector.put(path, wanted, 0o644)
        self.step(name, True, "would upload" if self.ctx.check else "uploaded")
        return True

    def _task_code(self, connector: Connector, facts: dict[str, Any]) -> bool:
        """Ship the workspace's task modules to SSH hosts (local ones read them in place)."""
        have: dict[str, str] = facts.get("tasks") or {}
        if self.host.connection == "local" or not (self.ctx.task_files or have):
            return False
        stale = {name: data for name, data in self.ctx.task_files.items()
                 if have.get(name) != sha256(data)}
        extra = sorted(set(have) - set(self.ctx.task_files))
        if not stale and not extra:
            self.step("task code", False, f"{len(self.ctx.task_files)} files")
            return False
        if not self.ctx.check:
            for name, data in stale.items():
                connector.put(str(self.paths.tasks / name), data, 0o644)
            for name in extra:
                connector.run(["rm", "-f", "--", str(self.paths.tasks / name)])
        verb = "would upload" if self.ctx.check else "uploaded"
        self.step("task code", True, f"{verb} {len(stale)}, removed {len(extra)}")
        return True

    def _service(self, connector: Connector, facts: dict[str, Any], inputs_changed: bool) -> None:
        running = facts.get("service_pid") is not None
        if running and not inputs_changed:
            self.step("agent", False, f"running (pid {facts['service_pid']})")
            return
        action = "restart" if running else "start"
        if self.ctx.check:
            self.step("agent", True, f"would {action}")
            return
        hostctl(connector, action, "--root", str(self.paths.root),
                "--port", str(self.endpoint.port))
        self.step("agent", True, "started" if action == "start" else "restarted")


def _pool_map(hosts: list[Host], forks: int, job: Callable[[Host], HostResult]) -> list[HostResult]:
    with ThreadPoolExecutor(max_workers=max(1, min(forks, len(hosts) or 1))) as pool:
        return list(pool.map(job, hosts))


def deploy(
    workspace: Workspace,
    hosts: list[Host],
    *,
    check: bool = False,
    forks: int = 16,
    verify: VerifyFn | None = None,
    accept_new_host_keys: bool = False,
    bundles: BundleCache | None = None,
    progress: ProgressFn = lambda host, message: None,
    confirm_new_connection: ConfirmFn = confirm_with_new_connection,
    rollback_after_s: float = FIREWALL_ROLLBACK_S,
) -> list[HostResult]:
    """Deploy to `hosts` in parallel, then bring the hub in line, then verify.

    Results come back in the order given; when the overlay is used, a last
    entry named "hub" reports this machine's end of it.
    """
    ctx = DeployContext(
        workspace=workspace,
        ca_key=Path(workspace.paths.ca_key).read_bytes(),
        ca_cert=Path(workspace.paths.ca_cert).read_bytes(),
        check=check,
        verify=verify,
        options=connect_options(workspace, accept_new_host_keys),
        bundles=bundles or BundleCache(lock=read_wheel_lock(workspace.paths)),
        task_files=workspace_task_files(workspace.paths.tasks),
        hub=Hub(workspace),
        confirm_new_connection=confirm_new_connection,
        rollback_after_s=rollback_after_s,
    )
    order = {host.name: index for index, host in enumerate(workspace.inventory.hosts)}
    jobs = {host.name: HostDeploy(ctx, host, order[host.name], progress) for host in hosts}
    results = _pool_map(hosts, forks, lambda host: jobs[host.name].run())
    overlay_jobs = [job for job in jobs.values() if job.overlay]
    if overlay_jobs:
        results.append(_hub_step(ctx, overlay_jobs, progress))
    with ThreadPoolExecutor(max_workers=max(1, min(forks, len(jobs) or 1))) as pool:
        list(pool.map(HostDeploy.verify, jobs.values()))  # after the hub is up
    lock = None if check else ctx.bundles.updated_lock()
    if lock is not None:
        atomic_write(workspace.paths.wheel_lock, lock.render())
    return results


def _hub_step(ctx: DeployContext, jobs: list[HostDeploy], progress: ProgressFn) -> HostResult:
    """Add the hosts' public keys to the hub and bring its interface in line."""
    result = HostResult("hub")

    def action() -> None:
        port = ctx.workspace.settings.overlay.port
        updates = {job.host.name: {"public_key": job.wg_public_key,
                                   "overlay_ip": str(job.host.overlay_ip),
                                   "endpoint": f"{job.host.ssh_host}:{port}"}
                   for job in jobs if job.wg_public_key}
        if ctx.check:
            known = ctx.hub.known_peers()
            stale = any(known.get(name) != peer for name, peer in updates.items())
            result.steps.append(StepResult("tunnel", stale, "would update peers" if stale else ""))
            return
        progress("hub", "bringing up the hub interface")
        peers = ctx.hub.record_peers(updates)
        outcome = ctx.hub.apply(peers)
        result.steps.append(StepResult("tunnel", outcome != "unchanged",
                                       f"{ctx.hub.interface} {ctx.hub.overlay_ip}: {outcome}, "
                                       f"{len(peers)} peers"))

    return run_guarded(result, action)


def teardown(workspace: Workspace, hosts: list[Host], *, forks: int = 16,
             accept_new_host_keys: bool = False,
             progress: ProgressFn = lambda host, message: None) -> list[HostResult]:
    """Stop agents and remove what deploy put on each host (tunnel, firewall
    table, keys, software, state), then drop them from the hub; safe to repeat."""
    options = connect_options(workspace, accept_new_host_keys)
    hub = Hub(workspace)

    def one(host: Host) -> HostResult:
        result = HostResult(host.name)
        root = host_paths(host, str(workspace.paths.state)).root

        def action() -> None:
            progress(host.name, "removing")
            connector = connect(host, options)
            try:
                if host.connection == "local":
                    answer = hostctl(connector, "remove", "--root", str(root))
                    result.steps.append(StepResult("agent", bool(answer.get("changed"))))
                    return
                if installed(connector):
                    connector.python = VENV_PYTHON
                    config = root / "wg" / f"{hub.interface}.conf"
                    down = hostctl(connector, "wg-down", "--config", str(config))
                    result.steps.append(StepResult("tunnel", bool(down.get("changed"))))
                    fw = hostctl(connector, "fw-remove", "--state", str(root / "firewall"))
                    result.steps.append(StepResult("firewall", bool(fw.get("changed"))))
                    answer = hostctl(connector, "remove", "--root", str(root))
                    result.steps.append(StepResult("agent", bool(answer.get("changed"))))
                gone = connector.run_shell(
                    f"found=; for p in {root} {INSTALL_DIR}; do [ -e $p ] && found=1; done; "
                    f"rm -rf -- {root} {INSTALL_DIR}; "
                    f"rmdir {REMOTE_STATE_ROOT} 2>/dev/null; echo ${{found:-0}}")
                result.steps.append(StepResult("files", gone.stdout.strip() == "1"))
            finally:
                connector.close()

        return run_guarded(result, action)

    results = _pool_map(hosts, forks, one)
    removed = {r.host for r in results if r.status in ("ok", "changed")}
    if removed & set(hub.known_peers()) or (hub.config_path.exists() and not hub.known_peers()):
        hub_result = HostResult("hub")

        def drop_peers() -> None:
            peers = hub.record_peers({}, removed=removed)
            outcome = hub.apply(peers)
            hub_result.steps.append(StepResult("tunnel", outcome != "unchanged", outcome))

        results.append(run_guarded(hub_result, drop_peers))
    return results
