"""Folding at a site (flctl.core.sitefold) and a site's reply at the coordinator
(flctl.coordinator.sites), without processes: the same sums as flat rounds."""

from __future__ import annotations

import numpy as np
import pytest

from flctl.coordinator.replies import HostProfile
from flctl.coordinator.sites import SiteJob, check_site_reply
from flctl.core.privacy import CentralDP
from flctl.core.sitefold import FOLD_CLIPPED, FoldSpec, SiteError, SiteFold, fold_spec
from flctl.core.sites import Site
from flctl.core.strategies import FedAdam, FedAvg, FedMedian
from flctl.errors import FlctlError, TrainingError

RNG = np.random.default_rng(5)
MODEL = [RNG.normal(size=(50, 20)).astype(np.float32), RNG.normal(size=20).astype(np.float32)]
HOSTS = {f"h{i}": ([(w + RNG.normal(scale=0.05, size=w.shape)).astype(np.float32)
                    for w in MODEL], int(RNG.integers(10, 200))) for i in range(7)}
SITES = {"a": ["h0", "h1", "h2"], "b": ["h3", "h4", "h5"]}   # h6 in no site


def flat_and_sited(strategy_for):
    flat = strategy_for().start_round(MODEL, 1)
    for name, (update, n) in HOSTS.items():
        flat.add(name, update, n)
    strategy = strategy_for()
    sited = strategy.start_round(MODEL, 1)
    spec = fold_spec(strategy, 0.0)
    assert spec is not None
    for site, members in SITES.items():
        fold = SiteFold(MODEL, 1, spec, members)
        for member in members:
            update, n = HOSTS[member]
            fold.add(member, update, n, {"train_loss": 0.5}, 0.1)
        delta, total, metrics = fold.result()
        assert total == sum(HOSTS[m][1] for m in members)
        assert metrics["train_loss"] == pytest.approx(0.5)
        assert [d.dtype for d in delta] == [w.dtype for w in MODEL]
        sited.add_site(site, members, delta, total, len(members))
    sited.add("h6", *HOSTS["h6"])
    assert sited.count == flat.count == 7
    return flat.result(), sited.result()


@pytest.mark.parametrize("strategy_for", [
    FedAvg, lambda: FedAdam(eta=0.05),
    lambda: CentralDP(FedAvg(), clip_norm=0.3, noise_multiplier=0.5, expected_participants=7,
                      noise_seed=99),
], ids=["fedavg", "fedadam", "central-dp"])
def test_a_site_fold_is_the_flat_sum(strategy_for) -> None:
    flat, sited = flat_and_sited(strategy_for)
    for a, b in zip(flat, sited):
        assert np.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_dp_folds_clipped_and_robust_strategies_cannot_fold() -> None:
    dp = CentralDP(FedAvg(), clip_norm=0.3, noise_multiplier=1.0, expected_participants=3)
    assert fold_spec(dp, 0.0) == FoldSpec(FOLD_CLIPPED, True, 0.0, 0.3)
    assert fold_spec(FedMedian(), 0.0) is None


def test_a_site_refuses_what_a_flat_round_refuses() -> None:
    fold = SiteFold(MODEL, 1, FoldSpec("mean", max_update_norm=0.01), ["h0", "h1"])
    with pytest.raises(FlctlError, match="exceeds training.max_update_norm"):
        fold.add("h0", *HOSTS["h0"], {}, 0.0)
    bad = [w.copy() for w in MODEL]
    bad[1][0] = np.nan
    with pytest.raises(FlctlError):
        SiteFold(MODEL, 1, FoldSpec("mean"), ["h0"]).add("h0", bad, 5, {}, 0.0)
    with pytest.raises(SiteError, match="claims True examples"):
        fold.add("h1", MODEL, True, {}, 0.0)
    fold.drop("h0", "deadline exceeded")
    with pytest.raises(SiteError, match="h0: deadline exceeded"):
        fold.result()
    with pytest.raises(SiteError, match="fold.mode"):
        FoldSpec.from_meta({"mode": "median"})
    with pytest.raises(SiteError, match="clip_norm > 0"):
        FoldSpec.from_meta({"mode": "clipped"})


def job() -> SiteJob:
    site = Site("berlin", "b2", ("b1", "b2", "b3"), 6)
    return SiteJob(site, None, ("b1", "b2"))   # type: ignore[arg-type]


def profile(name: str) -> HostProfile:
    return HostProfile(name, n_train=100, n_eval=10)


def answered(examples: int, loss: float = 0.2) -> dict:
    return {"status": "answered", "examples": examples, "train_loss": loss, "fit_s": 0.5}


def test_a_site_reply_is_checked_member_by_member() -> None:
    members = {"b1": answered(60), "b2": {"status": "dropped", "reason": "deadline exceeded"}}
    ok, lost = check_site_reply(job(), 60, {"members": members}, profile)
    assert ok == {"b1": {"train_loss": 0.2, "examples": 60, "fit_s": 0.5}}
    assert lost == {"b2": "deadline exceeded"}
    for reply, why in [
        ({"members": {**members, "b3": answered(5)}}, "not asked for \\(b3\\)"),
        ({"members": {"b1": answered(60), "b2": answered(50)}}, "claims 60 examples, its "
                                                                "members' sum to 110"),
        ({"members": {"b1": answered(600)}}, "b1: update rejected: it claims 600"),
        ({"members": {"b1": answered(60, float("nan"))}}, "not a finite number"),
        ({}, "says nothing of its members"),
        ({"members": {"b2": {"status": "dropped"}}}, "counts no member"),
    ]:
        with pytest.raises(TrainingError, match=why):
            check_site_reply(job(), 60, reply, profile)
    assert job().failed("refused") == "site berlin: aggregator b2: refused"
