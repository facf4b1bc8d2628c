"""The host side of secure aggregation keeps a round's secrets for one use only."""

from __future__ import annotations

from pathlib import Path

import pytest

from flctl.agent.secure import SecureRounds
from flctl.core import pki
from flctl.core.agentconfig import AgentConfig
from flctl.core.secagg import FixedPointParams
from flctl.errors import FlctlError


@pytest.fixture
def rounds(tmp_path: Path) -> SecureRounds:
    ca_key, ca_cert = pki.make_ca("test CA")
    key, cert = pki.issue_certificate(ca_key, ca_cert, "h0", ["h0"])
    for name, pem in (("ca.crt", ca_cert), ("h0.crt", cert), ("h0.key", key)):
        (tmp_path / name).write_bytes(pem)
    config = AgentConfig(name="h0", project="t", bind_address="127.0.0.1", port=0,
                         ca_cert=str(tmp_path / "ca.crt"), cert=str(tmp_path / "h0.crt"),
                         key=str(tmp_path / "h0.key"), data_path=str(tmp_path / "d.npz"),
                         state_file=str(tmp_path / "s.json"))
    return SecureRounds(config)


def advertise(rounds: SecureRounds, round_id: str) -> dict:
    return rounds.advertise({"round_id": round_id, "params": FixedPointParams().to_dict()})


def test_a_round_is_advertised_once(rounds: SecureRounds) -> None:
    first = advertise(rounds, "run/1/1")
    assert first["host"] == "h0" and first["round"] == "run/1/1"
    with pytest.raises(FlctlError, match="already advertised"):
        advertise(rounds, "run/1/1")
    assert advertise(rounds, "run/1/2")["c_pk"] != first["c_pk"]  # a retry: fresh keys


def test_an_unknown_or_finished_round_is_refused(rounds: SecureRounds) -> None:
    with pytest.raises(FlctlError, match="is unknown here"):
        rounds.share({"round_id": "never"})
    advertise(rounds, "run/2/1")
    with pytest.raises(FlctlError):
        rounds.unmask({"round_id": "run/2/1", "dropped": [], "survivors": ["h0"]})
    with pytest.raises(FlctlError, match="is unknown here"):  # its secrets are gone
        rounds.unmask({"round_id": "run/2/1", "dropped": [], "survivors": ["h0"]})
