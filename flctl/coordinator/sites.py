"""Sites at the coordinator: which sampled hosts go through which aggregator,
which settings a site can serve, and what a site's reply may claim.

Sampling stays per host, so a run with sites samples the very hosts a flat
run with the same seed does. The sampled hosts of a site become one
`site_fit` to its aggregator (which relays even when it was not sampled
itself); hosts in no site, and sites whose aggregator is not in this run,
are fitted directly as before. Every member stays a host in the round's
records. A site's reply is a host's answer like any other: its member list
must be a subset of those asked, each member's count within its profile
(replies.check_fit_counts), and the total their sum; anything else drops the
site for the round, with the aggregator named.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flctl.coordinator.replies import HostProfile, check_fit_counts
from flctl.core.settings import TrainingSettings
from flctl.core.sitefold import FoldSpec, fold_spec
from flctl.core.sites import Site
from flctl.core.text import clean_text
from flctl.core.uplink import UplinkSpec
from flctl.errors import TrainingError
from flctl.net.agent_client import AgentClient

MAX_REASON_CHARS = 200


@dataclass(frozen=True)
class SiteJob:
    """One site's part of a round: its aggregator's client and the members asked."""

    site: Site
    client: AgentClient
    members: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"site {self.site.name}"

    def abort(self) -> None:
        self.client.abort()

    def failed(self, reason: str) -> str:
        """What each member's record says when the site as a whole fails."""
        return f"site {self.site.name}: aggregator {self.site.aggregator}: {reason}"


class SitePlan:
    def __init__(self, sites: Mapping[str, Site], clients: Sequence[AgentClient]) -> None:
        self.clients = {c.name: c for c in clients}
        # a site serves a run when its aggregator is one of the run's hosts
        self.sites = {name: site for name, site in sites.items()
                      if site.aggregator in self.clients}
        self.site_of = {member: site for site in self.sites.values()
                        for member in site.members}

    @property
    def active(self) -> bool:
        return bool(self.sites)

    def fold(self, training: TrainingSettings, strategy: object,
             uplink: UplinkSpec) -> FoldSpec | None:
        """How sites fold for this run (None: no sites); a setting a site cannot
        serve is one line naming it and the site."""
        if not self.sites:
            return None
        site = next(iter(sorted(self.sites.values(), key=lambda s: s.line)))
        where = (f"the inventory's site {site.name!r} (aggregator {site.aggregator}, line "
                 f"{site.line})")
        if training.secure_aggregation:
            raise TrainingError(f"training.secure_aggregation cannot run with {where}: its "
                                f"aggregator would see its members' updates; turn one off")
        if uplink.sends_delta:
            setting = ("training.compression " + training.compression
                       if uplink.compression != "float32" else "local DP (training.privacy)")
            raise TrainingError(f"{setting} cannot run with {where}: sites fold plain "
                                f"weights; use compression float32 or remove the aggregator")
        spec = fold_spec(strategy, training.max_update_norm)
        if spec is None:
            raise TrainingError(f"training.strategy {training.strategy} cannot run with "
                                f"{where}: a site forwards one mean, and {training.strategy} "
                                f"needs every update; use a FedAvg-family strategy or "
                                f"remove the aggregator")
        return spec

    def group(self, chosen: Sequence[AgentClient]) -> tuple[list[AgentClient], list[SiteJob]]:
        """The sampled hosts fitted directly, and one job per site with sampled members."""
        direct: list[AgentClient] = []
        members: dict[str, list[str]] = {}
        for client in chosen:
            site = self.site_of.get(client.name)
            if site is None:
                direct.append(client)
            else:
                members.setdefault(site.name, []).append(client.name)
        jobs = [SiteJob(self.sites[name], self.clients[self.sites[name].aggregator],
                        tuple(names)) for name, names in members.items()]
        return direct, jobs


def _number(value: Any, low: float, high: float) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not low <= value <= high:
        return None
    return float(value)


def check_site_reply(job: SiteJob, num_examples: Any, metrics: dict[str, Any],
                     profile: Callable[[str], HostProfile],
                     ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """What each member's record may say (answered: examples, train_loss, fit_s;
    dropped: the aggregator's reason), once the reply holds up; else TrainingError."""
    reported = metrics.get("members")
    if not isinstance(reported, dict):
        raise TrainingError("its reply says nothing of its members")
    strangers = sorted(str(m) for m in reported if m not in job.members)
    if strangers:
        shown = ", ".join(clean_text(m)[:64] for m in strangers[:4])
        raise TrainingError(f"its reply names hosts it was not asked for ({shown})")
    answered: dict[str, dict[str, Any]] = {}
    dropped: dict[str, str] = {}
    for member in job.members:
        record = reported.get(member)
        if not isinstance(record, dict) or record.get("status") not in ("answered", "dropped"):
            dropped[member] = f"site {job.site.name}: its aggregator reports nothing of it"
            continue
        if record["status"] == "dropped":
            why = record.get("reason")
            dropped[member] = clean_text(why)[:MAX_REASON_CHARS] if isinstance(why, str) \
                else "dropped at its site"
            continue
        examples, loss = record.get("examples"), record.get("train_loss")
        try:
            check_fit_counts(profile(member), examples, {"train_loss": loss})
        except TrainingError as exc:
            raise TrainingError(f"{member}: {exc.message}") from None
        answered[member] = {"train_loss": None if loss is None else float(loss),
                            "examples": examples,
                            "fit_s": _number(record.get("fit_s"), 0.0, 1e9) or 0.0}
    if not answered:
        raise TrainingError("its reply counts no member's update")
    total = sum(int(r["examples"]) for r in answered.values())
    if isinstance(num_examples, bool) or num_examples != total:
        raise TrainingError(f"its reply claims {num_examples!r} examples, its members' "
                            f"sum to {total}")
    return answered, dropped
