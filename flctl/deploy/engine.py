"""Deploy: every host in parallel, then the hub, then verify; and teardown.

Each host's steps live in flctl.deploy.host_deploy (its network under one
armed rollback in flctl.deploy.network_steps); here they are run side by
side, one host's failure recorded in its result, never raised past it.
Before any host, the coordinator's own certificate is renewed when due and
the CA's revocation list is brought up to date, so every host gets both.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from flctl.core.frozen import FrozenDisagreement, reference_digest
from flctl.core.frozen import mismatch as frozen_mismatch
from flctl.core.fsutil import atomic_write
from flctl.core.inventory import Host
from flctl.core.layout import AGENT_USER, REMOTE_STATE_ROOT, agent_endpoint, host_paths
from flctl.core.members import record_members
from flctl.deploy.certificates import CertificateStore
from flctl.deploy.host_deploy import (
    ConfirmFn,
    DeployContext,
    HostDeploy,
    ProgressFn,
    VerifyFn,
    workspace_frozen_files,
    workspace_task_files,
    workspace_task_requirements,
)
from flctl.deploy.install import INSTALL_DIR, VENV_PYTHON, BundleCache, installed
from flctl.deploy.overlay import Hub
from flctl.deploy.remote import ConnectOptions, StepFailed, call_helper, check_routes, connect
from flctl.deploy.results import DONE, HostResult, StepResult, run_guarded
from flctl.deploy.site_network import bring_site_peers_in_line, check_site_reach
from flctl.workspace import (
    Workspace,
    deployed_overlay_addresses,
    read_wheel_lock,
    record_overlay_addresses,
)

# A network change is rolled back by the host itself unless a NEW SSH
# connection confirms it within this many seconds.
FIREWALL_ROLLBACK_S = 60.0


def confirm_with_new_connection(host: Host, options: ConnectOptions, state_dir: str) -> None:
    """Prove SSH still works with a fresh connection (an open one proves
    nothing: established flows survive most rulesets), then disarm."""
    fresh = connect(host, options)
    try:
        fresh.python = VENV_PYTHON
        answer = call_helper(fresh, "fw-confirm", "--state", state_dir, timeout=30)
    finally:
        fresh.close()
    if answer.get("rolled_back") or not answer.get("disarmed"):
        raise StepFailed("the rollback timer fired before the confirmation")


def connect_options(workspace: Workspace, accept_new_host_keys: bool = False) -> ConnectOptions:
    return ConnectOptions(workspace.paths.known_hosts, accept_new_host_keys,
                          ssh_config=workspace.ssh_config)


def _pool_map(hosts: list[Host], forks: int, job: Callable[[Host], HostResult],
              progress: ProgressFn) -> list[HostResult]:
    """`job` on every host, `forks` at a time; each host's last progress line
    says it is done (views count those: "3 of 8 hosts done")."""
    def one(host: Host) -> HostResult:
        result = job(host)
        progress(host.name, f"{DONE} ({result.status})")
        return result

    with ThreadPoolExecutor(max_workers=max(1, min(forks, len(hosts) or 1))) as pool:
        return list(pool.map(one, hosts))


def _coordinator_step(store: CertificateStore, check: bool) -> HostResult | None:
    """Renew the coordinator's certificate when due; a result only if it changed."""
    reason = store.coordinator_reason()
    if reason is None:
        if store.paths.coordinator_cert.exists():
            store.record(store.paths.coordinator_cert.read_bytes())
        return None
    result = HostResult("coordinator")

    def action() -> None:
        if not check:
            store.renew_coordinator(revoke_old=reason == "revoked")
        result.steps.append(StepResult("certificate", True,
                                       f"{'would renew' if check else 'renewed'}: {reason}"))

    return run_guarded(result, action)


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
    strict: bool = False,
) -> list[HostResult]:
    """Deploy to `hosts` in parallel, then bring the hub in line, then verify.
    With `strict`, a resource limit a host cannot enforce fails that host.

    Results come back in the order given; when the overlay is used, a last
    entry named "hub" reports this machine's end of it, and one named
    "coordinator" comes first when its certificate was renewed.
    """
    check_routes(hosts, connect_options(workspace))
    store = CertificateStore(workspace.paths)
    coordinator = _coordinator_step(store, check)
    ctx = DeployContext(
        workspace=workspace,
        certificates=store,
        crl=store.current_crl(write=not check),
        check=check,
        verify=verify,
        options=connect_options(workspace, accept_new_host_keys),
        bundles=bundles or BundleCache(lock=read_wheel_lock(workspace.paths)),
        task_files=workspace_task_files(workspace.paths.tasks),
        task_requirements=workspace_task_requirements(workspace.paths.tasks),
        frozen_files=workspace_frozen_files(workspace.paths.frozen),
        hub=Hub(workspace),
        confirm_new_connection=confirm_new_connection,
        rollback_after_s=rollback_after_s,
        strict=strict,
    )
    order = {host.name: index for index, host in enumerate(workspace.inventory.hosts)}
    jobs = {host.name: HostDeploy(ctx, host, order[host.name], progress) for host in hosts}
    peers_before = ctx.hub.known_peers()
    results = _pool_map(hosts, forks, lambda host: jobs[host.name].run(), progress)
    overlay_jobs = [job for job in jobs.values()
                    if job.network is not None and job.network.overlay]
    if overlay_jobs:
        results.append(_hub_step(ctx, overlay_jobs, progress))
        # every key is known now: sites' direct tunnels rendered without one get it
        bring_site_peers_in_line(ctx, overlay_jobs, forks, progress, peers_before)
    with ThreadPoolExecutor(max_workers=max(1, min(forks, len(jobs) or 1))) as pool:
        list(pool.map(HostDeploy.verify, jobs.values()))  # after the hub is up
    check_site_reach(ctx, overlay_jobs, forks, progress)
    _agree_on_frozen(ctx, list(jobs.values()))
    lock = None if check else ctx.bundles.updated_lock()
    if lock is not None:
        atomic_write(workspace.paths.wheel_lock, lock.render())
    if not check:
        deployed = {r.host for r in results if r.status in ("ok", "changed")}
        seed = set(deployed_overlay_addresses(workspace.paths))   # before this deploy's
        record_overlay_addresses(workspace.paths, {h.name: str(h.overlay_ip) for h in hosts
                                                   if h.name in deployed})
        record_members(workspace.paths.members,
                       {h.name: agent_endpoint(h, workspace.settings, order[h.name])
                        for h in hosts if h.name in deployed}, seed=seed)
    return ([coordinator] if coordinator is not None else []) + results


def _agree_on_frozen(ctx: DeployContext, jobs: list[HostDeploy]) -> None:
    """The verified hosts must hold the same frozen part (flctl.core.frozen):
    the pinned training.frozen_sha256, else what most of them have; each
    other host fails with one line (a run would leave it out)."""
    verified = {job.host.name: job for job in jobs
                if any(step.name == "verify" for step in job.result.steps)
                and job.result.status in ("ok", "changed")}
    reported = {name: job.frozen for name, job in verified.items()}
    if not any(reported.values()) and not ctx.workspace.settings.training.frozen_sha256:
        return
    try:
        want = reference_digest(reported, ctx.workspace.settings.training.frozen_sha256 or None)
    except FrozenDisagreement as exc:
        for job in verified.values():
            job.refuse(str(exc))
        return
    for name, job in sorted(verified.items()):
        line = frozen_mismatch(name, job.frozen, want)
        if line is not None:
            job.refuse(line)


def _endpoint(address: str | None, port: int) -> str:
    """address:port as WireGuard reads it (an IPv6 literal bracketed)."""
    bare = (address or "").strip("[]")
    return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"


def _hub_step(ctx: DeployContext, jobs: list[HostDeploy], progress: ProgressFn) -> HostResult:
    """Add the hosts' public keys to the hub and bring its interface in line."""
    result = HostResult("hub")

    def action() -> None:
        port = ctx.workspace.settings.overlay.port
        updates = {job.host.name: {"public_key": job.wg_public_key,
                                   "overlay_ip": str(job.host.overlay_ip),
                                   "endpoint": _endpoint(job.address, port)}
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
    check_routes(hosts, options)
    hub = Hub(workspace)

    def one(host: Host) -> HostResult:
        result = HostResult(host.name)
        root = host_paths(host, str(workspace.paths.state)).root

        def action() -> None:
            progress(host.name, "removing")
            connector = connect(host, options)
            try:
                if host.connection == "local":
                    answer = call_helper(connector, "remove", "--root", str(root))
                    result.steps.append(StepResult("agent", bool(answer.get("changed"))))
                    return
                if installed(connector):
                    connector.python = VENV_PYTHON
                    config = root / "wg" / f"{hub.interface}.conf"
                    down = call_helper(connector, "wg-down", "--config", str(config))
                    result.steps.append(StepResult("tunnel", bool(down.get("changed"))))
                    fw = call_helper(connector, "fw-remove", "--state", str(root / "firewall"))
                    result.steps.append(StepResult("firewall", bool(fw.get("changed"))))
                    answer = call_helper(connector, "remove", "--root", str(root))
                    result.steps.append(StepResult("agent", bool(answer.get("changed"))))
                    user = call_helper(connector, "remove-user", "--name", AGENT_USER,
                                       "--unless-used-under", str(REMOTE_STATE_ROOT))
                    result.steps.append(StepResult("agent user", bool(user.get("changed"))))
                gone = connector.run_shell(
                    f"found=; for p in {root} {INSTALL_DIR}; do [ -e $p ] && found=1; done; "
                    f"rm -rf -- {root} {INSTALL_DIR}; "
                    f"rmdir {REMOTE_STATE_ROOT} 2>/dev/null; echo ${{found:-0}}")
                result.steps.append(StepResult("files", gone.stdout.strip() == "1"))
            finally:
                connector.close()

        return run_guarded(result, action)

    results = _pool_map(hosts, forks, one, progress)
    removed = {r.host for r in results if r.status in ("ok", "changed")}
    record_members(workspace.paths.members, torn_down=removed,
                   seed=deployed_overlay_addresses(workspace.paths))
    if removed & set(hub.known_peers()) or (hub.config_path.exists() and not hub.known_peers()):
        hub_result = HostResult("hub")

        def drop_peers() -> None:
            peers = hub.record_peers({}, removed=removed)
            outcome = hub.apply(peers)
            hub_result.steps.append(StepResult("tunnel", outcome != "unchanged", outcome))

        results.append(run_guarded(hub_result, drop_peers))
    return results
