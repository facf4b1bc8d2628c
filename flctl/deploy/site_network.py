"""Deploy's site phase for SSH hosts: direct tunnels and a reach check.

A site's aggregator and members are direct WireGuard peers (besides the
hub). Each host's key is made on that host during its own deploy, in
parallel with the others, so on a fresh deploy a host's tunnel is rendered
before its site mates' keys exist. Once the hub has recorded every key,
`bring_site_peers_in_line` reconnects to the site hosts whose tunnel lacks
(or has other) site peers and brings it in line; on a second deploy nothing
is stale and no host is touched.

After the overlay is up and the agents run, `check_site_reach` asks each
site's aggregator, from the aggregator host itself, to open a TCP
connection to every member's agent over the overlay (its own included, as
it fits itself over its own port): a site whose
aggregator cannot reach a member is one line, and the aggregator and that
member fail in the recap; other hosts and sites go on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from flctl.core.schema import MapOf
from flctl.core.sites import Site
from flctl.core.text import clean_text
from flctl.deploy.host_deploy import DeployContext, HostDeploy, ProgressFn
from flctl.deploy.install import VENV_PYTHON
from flctl.deploy.remote import call_helper, connect
from flctl.deploy.results import run_guarded
from flctl.errors import FlctlError

REACH_SPEC = {"unreachable": MapOf(str)}
REACH_TIMEOUT_S = 5.0


def _healthy(job: HostDeploy) -> bool:
    return job.result.status in ("ok", "changed")


def bring_site_peers_in_line(ctx: DeployContext, jobs: Sequence[HostDeploy], forks: int,
                             progress: ProgressFn,
                             before: Mapping[str, Mapping[str, str]]) -> None:
    """Re-render the tunnel of every deployed site host whose site peers were
    not all known when its own deploy rendered it (after the hub step).
    `before`: the hub's record as this deploy began; a host whose key or
    address changed while a site mate of it was left out (--limit) is warned."""
    if ctx.check:
        return
    known = ctx.hub.known_peers()
    _warn_left_out_mates(jobs, before, known)
    stale = [job for job in jobs if job.network is not None and _healthy(job)
             and job.network.site_peers_stale(known)]

    def resync(job: HostDeploy) -> None:
        def action() -> None:
            progress(job.host.name, "adding its site peers")
            connector = connect(job.host, ctx.options)
            try:
                connector.python = VENV_PYTHON
                assert job.network is not None
                job.network.apply(connector, job.gather_facts(connector), step="site peers")
            finally:
                connector.close()

        run_guarded(job.result, action)

    with ThreadPoolExecutor(max_workers=max(1, min(forks, len(stale) or 1))) as pool:
        list(pool.map(resync, stale))


def _warn_left_out_mates(jobs: Sequence[HostDeploy], before: Mapping[str, Mapping[str, str]],
                         known: Mapping[str, Mapping[str, str]]) -> None:
    deployed = {job.host.name for job in jobs}
    for job in jobs:
        site, name = job.site, job.host.name
        if site is None or not _healthy(job) or before.get(name) == known.get(name):
            continue
        mates = [m for m in site.members if m != name] if site.aggregator == name \
            else [site.aggregator]
        left_out = [m for m in mates if m not in deployed and m in before]
        if left_out:
            job.result.warnings.append(
                f"site {site.name}: deploy {', '.join(left_out)} too, so its tunnel learns "
                f"{name}'s new WireGuard key or address")


def check_site_reach(ctx: DeployContext, jobs: Sequence[HostDeploy], forks: int,
                     progress: ProgressFn) -> None:
    """Each deployed SSH aggregator must reach its members' agents over the overlay."""
    if ctx.check or ctx.workspace.settings.agent.listen != "overlay":
        return
    by_name = {job.host.name: job for job in jobs}
    aggregators = [job for job in jobs if job.site is not None and job.remote
                   and job.site.aggregator == job.host.name and _healthy(job)
                   and len(job.site.members) > 1]

    def one(job: HostDeploy) -> list[tuple[str, str]]:
        """(member, reason) for each member the aggregator cannot reach."""
        site: Site = job.site  # type: ignore[assignment]
        members = list(site.members)   # itself too: it fits itself over its own port
        targets = job.site_fields()["site_members"]
        progress(job.host.name, f"checking it reaches site {site.name}'s members")
        args = ["reach", "--timeout", f"{REACH_TIMEOUT_S:g}"]
        for name in members:
            args += ["--to", f"{name}={targets[name]}"]
        try:
            connector = connect(job.host, ctx.options)
            try:
                connector.python = VENV_PYTHON
                unreachable = call_helper(connector, *args, timeout=REACH_TIMEOUT_S + 30,
                                          spec=REACH_SPEC)["unreachable"]
            finally:
                connector.close()
        except (FlctlError, OSError) as exc:
            why = exc.message if isinstance(exc, FlctlError) else str(exc)
            return [(m, f"the check could not run ({why})") for m in members]
        return [(m, clean_text(unreachable[m])) for m in members if m in unreachable]

    with ThreadPoolExecutor(max_workers=max(1, min(forks, len(aggregators) or 1))) as pool:
        found = list(pool.map(one, aggregators))
    for job, failures in zip(aggregators, found):
        for member, reason in failures:
            site = job.site
            assert site is not None
            line = (f"{site.name}: aggregator {job.host.name} cannot reach {member} "
                    f"({job.site_fields()['site_members'][member]}) over the overlay: {reason}")
            for name in (job.host.name, member):
                if name in by_name:
                    by_name[name].refuse(line)
