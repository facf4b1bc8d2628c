"""One host's deploy: facts -> compare with the workspace -> change what differs.

Each step compares what the host has (facts gathered by one helper call,
schema-checked: a host's answer is never trusted) with what the workspace
wants, and acts only on a difference; that difference is what "changed"
means, so a second deploy reports 0 changed and uploads nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from flctl.core.agentconfig import AgentConfig, render_agent_config
from flctl.core.facts import HELPER_FACTS_KEY, resolve_gpus
from flctl.core.frozen import frozen_files, is_sha256, short
from flctl.core.fsutil import file_sha256, sha256_hex
from flctl.core.inventory import Host
from flctl.core.layout import (
    AGENT_USER,
    Endpoint,
    HostPaths,
    agent_endpoint,
    certificate_names,
    host_paths,
)
from flctl.core.limits import (
    AgentLimits,
    HostCapabilities,
    cpu_percent,
    enforcement,
    memory_bytes,
)
from flctl.core.requirements import REQUIREMENTS_FILE, parse_requirements
from flctl.core.schema import Field, MapOf, Maybe, count
from flctl.core.settings import AgentSettings
from flctl.core.tasks import BUILTIN_TASKS
from flctl.core.text import clean_text
from flctl.deploy.certificates import CertificateStore
from flctl.deploy.connector import CommandResult, Connector, upload_files
from flctl.deploy.install import BundleCache, ensure_agent_software
from flctl.deploy.network_steps import NetworkSteps
from flctl.deploy.overlay import Hub
from flctl.deploy.remote import ConnectOptions, StepFailed, call_helper, connect, helper_answer
from flctl.deploy.results import HostResult, StepResult, run_guarded
from flctl.deploy.site_steps import local_site_certificate, site_fields
from flctl.workspace import Workspace

ProgressFn = Callable[[str, str], None]
VerifyFn = Callable[[Host, Endpoint], dict[str, Any]]
ConfirmFn = Callable[[Host, ConnectOptions, str], None]

# What flctl.agent.task_check reports: the task imports, the data reads.
TASK_CHECK_SPEC = {
    "task": Maybe(str),
    "error": Maybe(str),
    "data": Maybe({"n_train": count(), "n_test": count(), "n_features": Maybe(count()),
                   "n_classes": Maybe(count())}),
    "versions": Maybe(MapOf(Any)),
}
FACTS_SPEC = {
    "flctl_version": str,
    "agent_version": Maybe(str),
    "python": str,
    "arch": str,
    "init_system": str,
    "disk_free_bytes": count(),
    "listening_ports": [Field(int, 0, 65535)],
    "key_exists": bool,
    "site_key_exists": Maybe(bool),
    "site_cert_pem": Maybe(str),
    "files": MapOf(Maybe(str)),
    "wg_files": MapOf(Maybe(str)),
    "net_interfaces": [str],
    "firewall": Maybe({"present": Maybe(bool), "as_applied": Maybe(bool),
                       "armed": Maybe(count()), "error": Maybe(str)}),
    "cert_pem": Maybe(str),
    "tasks": MapOf(Maybe(str)),
    "frozen": Maybe(MapOf(Maybe(str))),
    "service": str,
    "service_pid": Maybe(count()),
    "agent_pid": Maybe(count()),
    "agent_user_exists": Maybe(bool),
    "boot_current": bool,
    "task_check": Maybe(TASK_CHECK_SPEC),
    "gpu_count": count(),
    "limits": Maybe({"cgroup": Maybe(str), "cpu": bool, "memory": bool}),
}
CSR_SPEC = {"csr_pem": str}


@dataclass
class DeployContext:
    """Everything a host's deploy needs from the workspace, read once."""

    workspace: Workspace
    certificates: CertificateStore
    crl: bytes
    check: bool
    verify: VerifyFn | None
    options: ConnectOptions
    bundles: BundleCache
    task_files: dict[str, bytes]
    task_requirements: tuple[str, ...]
    # the workspace's frozen/ (relative path -> (file, sha256)), shipped once
    frozen_files: dict[str, tuple[Path, str]]
    hub: Hub
    confirm_new_connection: ConfirmFn
    rollback_after_s: float
    # a resource limit the host cannot enforce fails it (else: a warning)
    strict: bool = False


class HostDeploy:
    """The steps for one host; each records whether it changed something."""

    def __init__(self, ctx: DeployContext, host: Host, index: int, progress: ProgressFn) -> None:
        self.ctx = ctx
        self.host = host
        self.endpoint = agent_endpoint(host, ctx.workspace.settings, index)
        self.paths: HostPaths = host_paths(host, str(ctx.workspace.paths.state))
        self.progress = progress
        self.result = HostResult(host.name)
        self.remote = host.connection == "ssh"
        # deployed hosts run the agent as its own user; local ones as the operator
        self.user = AGENT_USER if self.remote else None
        self.network = NetworkSteps(self) if self.remote else None
        self.frozen: str | None = None   # the frozen part's digest its agent reports
        # where the host is on the network: ssh_host, or its HostName when
        # ssh_host is an ssh_config alias (known once connected)
        self.address = host.ssh_host
        self.limits = ""   # how its resource limits are enforced (told when it starts)
        # the site it is in (flctl.core.sites), None for a loose host
        self.site = ctx.workspace.inventory.site_of(host.name)
        # the helper's facts as the bootstrap brought them (its raw answer), if it did
        self._prefetched: str | None = None

    @property
    def wg_public_key(self) -> str | None:
        return self.network.wg_public_key if self.network else None

    def step(self, name: str, changed: bool, detail: str = "") -> None:
        self.result.steps.append(StepResult(name, changed, detail))
        self.progress(self.host.name, f"{name}: {'changed' if changed else 'ok'}")

    def run(self) -> HostResult:
        def action() -> None:
            self.progress(self.host.name, "connecting")
            connector = connect(self.host, self.ctx.options)
            try:
                self._resolved_address(connector)
                self._apply(connector)
            finally:
                connector.close()

        return run_guarded(self.result, action)

    def _resolved_address(self, connector: Connector) -> None:
        """Take the address ssh_config gave; an agent listening on the underlay
        is reached (and certified) at ssh_host itself, so that must be it."""
        self.address = getattr(connector, "address", None) or self.host.ssh_host
        if self.remote and self.address != self.host.ssh_host and \
                self.ctx.workspace.settings.agent.listen == "underlay":
            raise StepFailed(
                f"agent.listen: underlay reaches the agent at ssh_host, which is the "
                f"ssh_config alias {self.host.ssh_host!r} (HostName {self.address}): write "
                f"ssh_host: {self.address} (a 'Host {self.address}' entry in ssh_config "
                "still applies to it)")

    def _apply(self, connector: Connector) -> None:
        if self.remote:
            self.progress(self.host.name, "checking the host")
            bootstrap = ensure_agent_software(connector, self.host, self.ctx.bundles,
                                              check=self.ctx.check, step=self.step,
                                              task_requirements=self.ctx.task_requirements,
                                              tell=lambda line: self.progress(self.host.name,
                                                                              line),
                                              facts_args=self._facts_args())
            answer = bootstrap.pop(HELPER_FACTS_KEY, None)
            # gathered before the agent's user exists, they would say it does not
            self._prefetched = answer if bootstrap.get("agent_user") == "yes" else None
            self.result.facts["host"] = bootstrap
            if self.ctx.check and self.result.changed:
                self.step("agent", True, "would configure and start after installing")
                return
            self._agent_user(connector, bootstrap)
        self.progress(self.host.name, "gathering facts")
        facts = self.gather_facts(connector)
        self._check_port(facts)
        self._limits(facts)
        try:
            gpus = resolve_gpus(self.host.gpus, facts["gpu_count"])
        except ValueError as exc:
            raise StepFailed(str(exc)) from None
        changed = self._certificate(connector, facts)
        changed |= self._site_certificate(connector, facts)
        changed |= self._file(connector, "ca.crt", str(self.paths.ca_cert), self.ctx.certificates.ca_cert,
                              facts["files"].get("ca.crt"))
        changed |= self._file(connector, "revocation list", str(self.paths.crl), self.ctx.crl,
                              facts["files"].get("ca.crl"))
        code_changed = self._task_code(connector, facts)
        code_changed |= self._frozen_part(connector, facts)
        changed |= code_changed
        if self.network is not None:
            self.network.apply(connector, facts)
        config_text = render_agent_config(self._agent_config(gpus)).encode()
        config_changed = self._file(connector, "agent config", str(self.paths.config),
                                    config_text, facts["files"].get("agent.json"))
        changed |= config_changed
        software_changed = any(s.changed for s in self.result.steps if s.name == "agent software")
        software_changed |= self._older_agent(facts)
        self._task_check(connector, facts, config_changed or code_changed or software_changed)
        if self.remote:
            self._boot(connector, facts, config_changed or self.result.changed > 0)
        # new agent software (an upgrade of flctl) is new code: a running agent restarts
        self._service(connector, facts, changed or software_changed)

    def _older_agent(self, facts: dict[str, Any]) -> bool:
        """A running agent that started with other code than the flctl installed
        now (an upgrade; local hosts run this machine's flctl) must restart."""
        running, installed = facts.get("agent_version"), facts["flctl_version"]
        if facts.get("service_pid") is None or running == installed:
            return False
        self.step("agent version", True, f"running {running or 'an older flctl'}, "
                                         f"installed {installed}: restarting it")
        return True

    def _facts_args(self) -> list[str]:
        args = ["facts", "--root", str(self.paths.root)]
        if self.user:
            args += ["--user", self.user]
        return args

    def gather_facts(self, connector: Connector) -> dict[str, Any]:
        """The helper's facts: those the bootstrap brought along when the
        software stayed as it was, else asked for now; checked either way."""
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None:
            facts = helper_answer("facts", CommandResult(0, prefetched, ""), FACTS_SPEC)
        else:
            facts = call_helper(connector, *self._facts_args(), spec=FACTS_SPEC)
        self.result.facts.update(facts)
        return facts

    def verify(self) -> None:
        """After the hub is up: the agent answers over mutual TLS where the
        coordinator will reach it."""
        if self.ctx.check or self.ctx.verify is None or self.result.status not in ("ok", "changed"):
            return

        def action() -> None:
            info = self.ctx.verify(self.host, self.endpoint)  # type: ignore[misc]
            if not isinstance(info, dict) or info.get("name") != self.host.name:
                name = info.get("name") if isinstance(info, dict) else None
                raise StepFailed(f"verify: agent answered as {name!r}")
            if info.get("frozen_error"):
                raise StepFailed(f"verify: {clean_text(info['frozen_error'])}")
            frozen = info.get("frozen")
            sha = frozen.get("sha256") if isinstance(frozen, dict) else None
            self.frozen = sha if is_sha256(sha) else None
            part = f"; frozen part {short(self.frozen)}" if self.frozen else ""
            self.step("verify", False, f"agent {info.get('version')} answers on "
                                       f"{self.endpoint.connect_address}:{self.endpoint.port}"
                                       f"{part}")

        run_guarded(self.result, action)

    # ------------------------------------------------------------ steps

    def refuse(self, line: str) -> None:
        """After the hosts' own steps, a check across hosts failed this one (its
        frozen part is not the others', its site aggregator cannot reach it)."""
        def action() -> None:
            raise StepFailed(line)
        run_guarded(self.result, action)

    def _agent_user(self, connector: Connector, bootstrap: dict[str, str]) -> None:
        """The unprivileged user the agent runs as (made once, by the helper)."""
        if bootstrap.get("agent_user") == "yes":
            self.step("agent user", False, AGENT_USER)
        elif self.ctx.check:
            self.step("agent user", True, f"would create system user {AGENT_USER}")
        else:
            made = call_helper(connector, "ensure-user", "--name", AGENT_USER,
                               spec={"changed": bool, "uid": count()})
            self.step("agent user", made["changed"],
                      f"created system user {AGENT_USER} (uid {made['uid']})" if made["changed"]
                      else AGENT_USER)

    def _task_check(self, connector: Connector, facts: dict[str, Any],
                    inputs_changed: bool) -> None:
        """On the host, as the agent's user: the task imports and reads its data.
        Run when the task, its config or the software changed, or the last check
        failed; a built-in task's data must also fit the model's shape."""
        training = self.ctx.workspace.settings.training
        previous = facts.get("task_check")
        current = previous if (previous and not previous.get("error") and not inputs_changed
                               and previous.get("task") == training.task) else None
        if current is None:
            if self.ctx.check:   # a check changes nothing on the host
                self.step("task check", False, "would check that the task starts on the host")
                return
            self.progress(self.host.name, "checking the task")
            current = call_helper(connector, "task-check", "--root", str(self.paths.root),
                                  timeout=900, spec={"check": TASK_CHECK_SPEC})["check"]
        if current.get("error"):
            raise StepFailed(f"task: {current['error']}")
        data = current.get("data") or {}
        if training.task in BUILTIN_TASKS:
            want = training.task_params
            if want.get("n_features") is not None and data.get("n_features") != want["n_features"]:
                raise StepFailed(f"data: {data.get('n_features')} features per example; "
                                 f"training.task_params.n_features is {want['n_features']}")
            if want.get("n_classes") is not None and (data.get("n_classes") or 0) > \
                    want["n_classes"]:
                raise StepFailed(f"data: labels up to {data['n_classes'] - 1}; "
                                 f"training.task_params.n_classes is {want['n_classes']}")
        versions = current.get("versions") or {}
        found = "; torch " + str(versions["torch"]) if versions.get("torch") else ""
        self.step("task check", False, f"{training.task}: {data.get('n_train')} train / "
                                       f"{data.get('n_test')} test examples{found}")

    def _limits(self, facts: dict[str, Any]) -> None:
        """Which mechanism will enforce each resource limit here; one that cannot
        be enforced is a warning (the host still deploys), or with --strict its failure."""
        wanted = host_limits(self.host, self.ctx.workspace.settings.agent)
        if not wanted.any:
            return
        caps = HostCapabilities.from_facts({**(facts.get("limits") or {}),
                                            "init_system": facts.get("init_system")})
        how = enforcement(wanted, caps)
        if how.problems and self.ctx.strict:
            raise StepFailed(f"limits (--strict): {how.problems[0]}")
        self.result.warnings.extend(how.problems)
        self.limits = how.detail(wanted)
        self.step("limits", False, self.limits)

    def _check_port(self, facts: dict[str, Any]) -> None:
        ours = facts.get("service_pid") is not None
        if not ours and self.endpoint.port in facts.get("listening_ports", []):
            raise StepFailed(f"port {self.endpoint.port} is already in use on the host "
                             "(set agent.port in flctl.yaml or agent_port for this host)")

    def _agent_config(self, gpus: str | None) -> AgentConfig:
        settings = self.ctx.workspace.settings
        tasks_dir = (self.ctx.workspace.paths.tasks if self.host.connection == "local"
                     else self.paths.tasks)
        limits = host_limits(self.host, settings.agent)
        return AgentConfig(
            name=self.host.name,
            project=settings.project,
            bind_address=self.endpoint.bind_address,
            port=self.endpoint.port,
            ca_cert=str(self.paths.ca_cert),
            cert=str(self.paths.cert),
            key=str(self.paths.key),
            crl=str(self.paths.crl),
            data_path=self.host.data_path,
            data_params=dict(self.host.data_params),
            state_file=str(self.paths.state),
            task=settings.training.task,
            tasks_dir=str(tasks_dir),
            user=self.user,
            max_message_mb=settings.limits.max_message_mb,
            gpus=gpus,
            frozen_path=self._frozen_path(),
            cpu_quota=limits.cpu_percent,
            memory_max=limits.memory_bytes,
            nice=limits.nice,
            **self.site_fields(),
        )

    def site_fields(self) -> dict[str, Any]:
        """The agent config's site fields for this host (flctl.deploy.site_steps)."""
        return site_fields(self.ctx.workspace.inventory, self.ctx.workspace.settings,
                           self.host, self.paths)

    def _certificate(self, connector: Connector, facts: dict[str, Any]) -> bool:
        dns, ips = certificate_names(self.host, self.endpoint)
        reissue = self.ctx.certificates.host_reissue(self.host.name, facts.get("cert_pem"),
                                                     facts["key_exists"], dns, ips)
        if reissue is None:
            self.step("certificate", False)
            return False
        if self.ctx.check:
            self.step("certificate", True, f"would issue ({reissue.reason})")
            return True
        args = ["csr", "--root", str(self.paths.root), "--cn", self.host.name]
        for name in dns:
            args += ["--dns", name]
        for ip in ips:
            args += ["--ip", ip]
        if self.user:
            args += ["--owner", self.user]
        if reissue.new_key:
            args.append("--new-key")
        answer = call_helper(connector, *args, spec=CSR_SPEC)
        cert = self.ctx.certificates.sign_host(self.host.name, answer["csr_pem"].encode(),
                                               dns, ips)
        connector.put(str(self.paths.cert), cert, 0o644)
        key = ", new key" if reissue.new_key else ""
        self.step("certificate", True, f"issued: {reissue.reason}{key}")
        return True

    def _site_certificate(self, connector: Connector, facts: dict[str, Any]) -> bool:
        """An aggregator's site certificate. On an SSH host its key and CSR are
        made on the host (the key never leaves it), the CA here signs for
        exactly this site and host, and the certificate goes back; renewed like
        the host's. A local aggregator's is made here (flctl.deploy.site_steps)."""
        site = self.site
        if site is None or site.aggregator != self.host.name:
            return False
        if not self.remote:   # a local aggregator: its key is made on this machine
            changed, detail = local_site_certificate(self.ctx.certificates, site, self.paths,
                                                     self.ctx.check)
            self.step("site certificate", changed, detail)
            return changed
        current = facts.get("site_cert_pem")
        reissue = self.ctx.certificates.site_reissue(self.host.name, site.name,
                                                     current.encode() if current else None,
                                                     bool(facts.get("site_key_exists")))
        if reissue is None:
            self.step("site certificate", False, f"site {site.name}")
            return False
        if self.ctx.check:
            self.step("site certificate", True, f"would issue ({reissue.reason})")
            return True
        args = ["csr", "--root", str(self.paths.root), "--cn", self.host.name,
                "--key", self.paths.site_key.name]
        if self.user:
            args += ["--owner", self.user]
        if reissue.new_key:
            args.append("--new-key")
        answer = call_helper(connector, *args, spec=CSR_SPEC)
        cert = self.ctx.certificates.sign_site(self.host.name, site.name,
                                               answer["csr_pem"].encode())
        connector.put(str(self.paths.site_cert), cert, 0o644)
        key = ", new key" if reissue.new_key else ""
        self.step("site certificate", True, f"site {site.name}: {reissue.reason}{key}")
        return True

    def _file(self, connector: Connector, name: str, path: str, wanted: bytes,
              current_sha: str | None) -> bool:
        if current_sha == sha256_hex(wanted):
            self.step(name, False)
            return False
        if not self.ctx.check:
            connector.put(path, wanted, 0o644)
        self.step(name, True, "would upload" if self.ctx.check else "uploaded")
        return True

    def _task_code(self, connector: Connector, facts: dict[str, Any]) -> bool:
        """Ship the workspace's task modules to SSH hosts (local ones read them in place)."""
        have: dict[str, Any] = facts.get("tasks") or {}
        if self.host.connection == "local" or not (self.ctx.task_files or have):
            return False
        stale = {name: data for name, data in self.ctx.task_files.items()
                 if have.get(name) != sha256_hex(data)}
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

    def _frozen_path(self) -> str | None:
        """Where this host's agent finds the frozen part: the host's own
        frozen_path, else the workspace's frozen/ (shipped to SSH hosts)."""
        if self.host.frozen_path is not None:
            return self.host.frozen_path
        if not self.ctx.frozen_files:
            return None
        return str(self.ctx.workspace.paths.frozen if self.host.connection == "local"
                   else self.paths.frozen)

    def _frozen_part(self, connector: Connector, facts: dict[str, Any]) -> bool:
        """Ship the workspace's frozen/ to an SSH host that has no frozen_path of
        its own: only files whose sha256 differs, streamed from disk."""
        have: dict[str, Any] = facts.get("frozen") or {}
        wanted = {} if self.host.frozen_path is not None else self.ctx.frozen_files
        if self.host.connection == "local" or not (wanted or have):
            return False
        stale = {name: file for name, (file, sha) in wanted.items() if have.get(name) != sha}
        extra = sorted(set(have) - set(wanted))
        if not stale and not extra:
            size = sum(file.stat().st_size for file, _ in wanted.values())
            self.step("frozen part", False, f"{len(wanted)} files, {size / 1e6:.1f} MB")
            return False
        if not self.ctx.check:
            upload_files(connector, [(file, str(self.paths.frozen / name))
                                     for name, file in stale.items()],
                         f"frozen part ({len(stale)} files)",
                         lambda line: self.progress(self.host.name, line))
            for name in extra:
                connector.run(["rm", "-f", "--", str(self.paths.frozen / name)])
        size = sum(file.stat().st_size for file in stale.values())
        verb = "would upload" if self.ctx.check else "uploaded"
        self.step("frozen part", True,
                  f"{verb} {len(stale)} ({size / 1e6:.1f} MB), removed {len(extra)}")
        return True

    def _boot(self, connector: Connector, facts: dict[str, Any], maybe_stale: bool) -> None:
        """What brings tunnel, table and agent back, in that order, after a reboot."""
        if facts["boot_current"] and (not maybe_stale or self.ctx.check):
            self.step("boot", False)
            return
        if self.ctx.check:
            self.step("boot", True, "would install the boot units")
            return
        answer = call_helper(connector, "install-boot", "--root", str(self.paths.root),
                             spec={"result": str, "service": str})
        how = "systemd units" if answer["service"] == "systemd" else "cron @reboot"
        if answer["result"] == "none":
            self.step("boot", False, "no systemd and no cron: after a reboot, deploy again")
        else:
            self.step("boot", answer["result"] == "changed", how)

    def _service(self, connector: Connector, facts: dict[str, Any], inputs_changed: bool) -> None:
        running = facts.get("service_pid") is not None
        if running and not inputs_changed:
            self.step("agent", False, f"running (pid {facts['service_pid']})")
            return
        action = "restart" if running else "start"
        if self.ctx.check:
            self.step("agent", True, f"would {action}")
            return
        call_helper(connector, action, "--root", str(self.paths.root),
                    "--port", str(self.endpoint.port))
        done = "started" if action == "start" else "restarted"
        self.step("agent", True, f"{done}; limits: {self.limits}" if self.limits else done)


def host_limits(host: Host, agent: AgentSettings) -> AgentLimits:
    """The host's own limits (inventory), else flctl.yaml's agent.* ones."""
    return AgentLimits(
        cpu_percent=cpu_percent(host.agent_cpu_quota or agent.cpu_quota),
        memory_bytes=memory_bytes(host.agent_memory_max or agent.memory_max),
        nice=host.agent_nice if host.agent_nice is not None else agent.nice)


def workspace_task_requirements(tasks_dir: Path) -> tuple[str, ...]:
    """tasks/requirements.txt, checked (file and line named on a mistake)."""
    path = tasks_dir / REQUIREMENTS_FILE
    if not path.is_file():
        return ()
    return tuple(parse_requirements(path.read_text(encoding="utf-8"), str(path)))


def workspace_frozen_files(frozen_dir: Path) -> dict[str, tuple[Path, str]]:
    """The workspace's frozen part, each file with its sha256 (hashed once per deploy)."""
    if not frozen_dir.is_dir():
        return {}
    return {str(p.relative_to(frozen_dir)): (p, file_sha256(p)) for p in frozen_files(frozen_dir)}


def workspace_task_files(tasks_dir: Path) -> dict[str, bytes]:
    """The user's task code, shipped to SSH hosts (relative path -> bytes)."""
    if not tasks_dir.is_dir():
        return {}
    return {str(p.relative_to(tasks_dir)): p.read_bytes() for p in sorted(tasks_dir.rglob("*.py"))
            if "__pycache__" not in p.parts}
