"""Deploy: facts -> plan against desired state -> apply -> verify -> recap.

Each step compares what the host has (facts gathered by one host-side
command) with what the workspace wants, and acts only on a difference; that
difference is what "changed" means, so a second deploy reports 0 changed
and uploads nothing. Hosts run in parallel and independently: one host's
failure is recorded in its result, never raised past it.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from flctl.core import pki
from flctl.core.agentconfig import AgentConfig, render_agent_config
from flctl.core.inventory import Host
from flctl.core.layout import Endpoint, HostPaths, agent_endpoint, certificate_names, host_paths
from flctl.deploy.connector import Connector, HostUnreachable
from flctl.deploy.local import LocalConnector
from flctl.errors import FlctlError
from flctl.workspace import Workspace

HOSTCTL = "flctl.agent.hostctl"

ProgressFn = Callable[[str, str], None]


class StepFailed(FlctlError):
    """A deploy step failed on one host."""


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


def connect(host: Host) -> Connector:
    if host.connection == "local":
        return LocalConnector(host.name)
    raise HostUnreachable(f"{host.name}: SSH connections are not available in this build")


def hostctl(connector: Connector, *args: str, timeout: float = 120.0) -> dict[str, Any]:
    """Run one host-side command and decode its JSON answer."""
    result = connector.run([connector.python, "-m", HOSTCTL, *args], timeout=timeout)
    try:
        answer = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else {}
    except json.JSONDecodeError:
        answer = {}
    if result.returncode != 0 or "error" in answer:
        reason = answer.get("error") or (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise StepFailed(f"{args[0]}: {reason}")
    return answer


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class DeployContext:
    """Everything a host's deploy needs from the workspace, read once."""

    workspace: Workspace
    ca_key: bytes
    ca_cert: bytes
    check: bool
    verify: Callable[[Host, Endpoint], dict[str, Any]] | None


class HostDeploy:
    """The steps for one host; each returns whether it changed something."""

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
        try:
            connector = connect(self.host)
        except HostUnreachable as exc:
            self.result.status, self.result.error = "unreachable", exc.message
            return self.result
        try:
            self._apply(connector)
            self.result.status = "changed" if self.result.changed else "ok"
        except HostUnreachable as exc:
            self.result.status, self.result.error = "unreachable", exc.message
        except FlctlError as exc:
            self.result.status, self.result.error = "failed", exc.message
        except OSError as exc:
            self.result.status, self.result.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            connector.close()
        return self.result

    def _apply(self, connector: Connector) -> None:
        root = str(self.paths.root)
        self.progress(self.host.name, "gathering facts")
        facts = hostctl(connector, "facts", "--root", root)
        self.result.facts = facts
        data = hostctl(connector, "check-data", "--path", self.host.data_path)
        self.step("data", False, f"{data['n_train']} train / {data['n_test']} test examples")
        cert_changed = self._certificate(connector, facts)
        ca_changed = self._file(connector, "ca.crt", str(self.paths.ca_cert), self.ctx.ca_cert,
                                facts["files"].get("ca.crt"))
        config_text = render_agent_config(self._agent_config()).encode()
        config_changed = self._file(connector, "agent config", str(self.paths.config),
                                    config_text, facts["files"].get("agent.json"))
        self._service(connector, facts, cert_changed or ca_changed or config_changed)
        if not self.ctx.check and self.ctx.verify is not None:
            info = self.ctx.verify(self.host, self.endpoint)
            if info.get("name") != self.host.name:
                raise StepFailed(f"verify: agent answered as {info.get('name')!r}")
            self.step("verify", False, f"agent {info.get('version')} answers on port "
                                       f"{self.endpoint.port}")

    def _agent_config(self) -> AgentConfig:
        settings = self.ctx.workspace.settings
        task_path = (str(self.ctx.workspace.paths.tasks),) if self.host.connection == "local" else (
            str(self.paths.root / "tasks"),)
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
        self.step("agent", True, f"{action}ed" if action == "start" else "restarted")


def deploy(
    workspace: Workspace,
    hosts: list[Host],
    *,
    check: bool = False,
    forks: int = 16,
    verify: Callable[[Host, Endpoint], dict[str, Any]] | None = None,
    progress: ProgressFn = lambda host, message: None,
) -> list[HostResult]:
    """Deploy to `hosts` in parallel; results come back in inventory order."""
    ctx = DeployContext(
        workspace=workspace,
        ca_key=Path(workspace.paths.ca_key).read_bytes(),
        ca_cert=Path(workspace.paths.ca_cert).read_bytes(),
        check=check,
        verify=verify,
    )
    order = {host.name: index for index, host in enumerate(workspace.inventory.hosts)}
    jobs = [HostDeploy(ctx, host, order[host.name], progress) for host in hosts]
    with ThreadPoolExecutor(max_workers=max(1, min(forks, len(jobs) or 1))) as pool:
        return list(pool.map(lambda job: job.run(), jobs))


def teardown(workspace: Workspace, hosts: list[Host], *, forks: int = 16,
             progress: ProgressFn = lambda host, message: None) -> list[HostResult]:
    """Stop agents and remove what deploy put on each host; safe to repeat."""

    def one(host: Host) -> HostResult:
        result = HostResult(host.name)
        paths = host_paths(host, str(workspace.paths.state))
        try:
            connector = connect(host)
        except HostUnreachable as exc:
            result.status, result.error = "unreachable", exc.message
            return result
        try:
            progress(host.name, "removing")
            answer = hostctl(connector, "remove", "--root", str(paths.root))
            result.steps.append(StepResult("remove", bool(answer.get("changed"))))
            result.status = "changed" if result.changed else "ok"
        except FlctlError as exc:
            result.status, result.error = "failed", exc.message
        finally:
            connector.close()
        return result

    with ThreadPoolExecutor(max_workers=max(1, min(forks, len(hosts) or 1))) as pool:
        return list(pool.map(one, hosts))
