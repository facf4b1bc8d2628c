"""Differential privacy for federated training: DP-FedAvg and its privacy accountant.

mechanism.py clips and noises updates (central: the coordinator's
`CentralDP` strategy wrapper; local: `privatize_locally` on each host);
accountant.py turns the rounds run into (epsilon, delta) and answers
whether one more round still fits a target epsilon.
"""

from __future__ import annotations

from flctl.core.privacy.accountant import (
    CONVERSIONS,
    DEFAULT_ORDERS,
    PrivacyError,
    RdpAccountant,
    compute_rdp,
    epsilon_from_rdp,
    sgm_rdp,
)
from flctl.core.privacy.mechanism import (
    SECRET_STATE_KEYS,
    CentralDP,
    CentralDPRound,
    clip_update,
    local_accounting,
    privatize_locally,
    round_noise_rng,
)

PRIVACY_MODES = ("off", "central", "local")

__all__ = ["CONVERSIONS", "DEFAULT_ORDERS", "PRIVACY_MODES", "SECRET_STATE_KEYS", "CentralDP",
           "CentralDPRound", "PrivacyError", "RdpAccountant", "clip_update", "compute_rdp",
           "epsilon_from_rdp", "local_accounting", "privatize_locally", "round_noise_rng",
           "sgm_rdp"]
