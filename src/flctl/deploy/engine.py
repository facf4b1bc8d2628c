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
from flctl.core.inventory import Host
from flctl.core.layout import (
    REMOTE_STATE_ROOT,
    Endpoint,
    HostPaths,
    agent_endpoint,
    certificate_names,
    host_paths,
)
from flctl.deploy.connector import Connector, HostUnreachable
from flctl.deploy.hostcmd import ConnectOptions, StepFailed, connect, hostctl
from flctl.deploy.install import (
    INSTALL_DIR,
    VENV_PYTHON,
    BundleCache,
    ensure_agent_software,
    installed,
)
from flctl.errors import FlctlError
from flctl.workspace import Workspace

ProgressFn = Callable[[str, str], None]
VerifyFn = Callable[[Host, Endpoint], dict[str, Any]]


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
        result.status, result.error = "failed", exc.message
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
        config_text = render_agent_config(self._agent_config()).encode()
        changed |= self._file(connector, "agent config", str(self.paths.config), config_text,
                              facts["files"].get("agent.json"))
        self._service(connector, facts, changed)
        if not self.ctx.check and self.ctx.verify is not None:
            info = self.ctx.verify(self.host, self.endpoint)
            if info.get("name") != self.host.name:
                raise StepFailed(f"verify: agent answered as {info.get('name')!r}")
            self.step("verify", False, f"agent {info.get('version')} answers on "
                                       f"{self.endpoint.connect_address}:{self.endpoint.port}")

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
) -> list[HostResult]:
    """Deploy to `hosts` in parallel; results come back in the order given."""
    ctx = DeployContext(
        workspace=workspace,
        ca_key=Path(workspace.paths.ca_key).read_bytes(),
        ca_cert=Path(workspace.paths.ca_cert).read_bytes(),
        check=check,
        verify=verify,
        options=connect_options(workspace, accept_new_host_keys),
        bundles=bundles or BundleCache(),
        task_files=workspace_task_files(workspace.paths.tasks),
    )
    order = {host.name: index for index, host in enumerate(workspace.inventory.hosts)}
    return _pool_map(hosts, forks,
                     lambda host: HostDeploy(ctx, host, order[host.name], progress).run())


def teardown(workspace: Workspace, hosts: list[Host], *, forks: int = 16,
             accept_new_host_keys: bool = False,
             progress: ProgressFn = lambda host, message: None) -> list[HostResult]:
    """Stop agents and remove what deploy put on each host; safe to repeat."""
    options = connect_options(workspace, accept_new_host_keys)

    def one(host: Host) -> HostResult:
        result = HostResult(host.name)
        root = str(host_paths(host, str(workspace.paths.state)).root)

        def action() -> None:
            progress(host.name, "removing")
            connector = connect(host, options)
            try:
                if host.connection == "local":
                    answer = hostctl(connector, "remove", "--root", root)
                    result.steps.append(StepResult("agent", bool(answer.get("changed"))))
                    return
                if installed(connector):
                    connector.python = VENV_PYTHON
                    answer = hostctl(connector, "remove", "--root", root)
                    result.steps.append(StepResult("agent", bool(answer.get("changed"))))
                gone = connector.run_shell(
                    f"found=; for p in {root} {INSTALL_DIR}; do [ -e $p ] && found=1; done; "
                    f"rm -rf -- {root} {INSTALL_DIR}; "
                    f"rmdir {REMOTE_STATE_ROOT} 2>/dev/null; echo ${{found:-0}}")
                result.steps.append(StepResult("files", gone.stdout.strip() == "1"))
            finally:
                connector.close()

        return run_guarded(result, action)

    return _pool_map(hosts, forks, one)
