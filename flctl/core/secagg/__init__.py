"""Secure aggregation (SecAgg, Bonawitz et al. 2017; SecAgg+, Bell et al. 2020).

The server learns the (weighted) sum of the hosts' updates and nothing else,
even when hosts drop out mid-round, as long as every host whose mask must be
removed keeps `threshold` of its neighbourhood (SecAgg: all n hosts; SecAgg+:
itself and its k neighbours on a pseudo-random Harary graph). Pure message logic:
the agent and coordinator carry the payloads (dicts with base64 strings, and
one uint32 array per host) in ordinary frames.
"""

from flctl.core.secagg.client import SecAggClient
from flctl.core.secagg.fixedpoint import (
    FixedPointError,
    FixedPointParams,
    decode,
    decode_weighted,
    encode,
    encode_weighted,
    flatten,
    unflatten,
)
from flctl.core.secagg.graph import CommunicationGraph, default_neighbours, effective_degree
from flctl.core.secagg.keys import PeerError, SecAggError
from flctl.core.secagg.protocol import NeighbourFn, complete_graph, default_threshold
from flctl.core.secagg.server import NeighbourhoodError, SecAggResult, SecAggServer
from flctl.core.secagg.shamir import ShamirError

__all__ = [
    "CommunicationGraph", "FixedPointError", "FixedPointParams", "NeighbourFn",
    "NeighbourhoodError", "PeerError", "SecAggClient", "SecAggError", "SecAggResult",
    "SecAggServer", "ShamirError", "complete_graph", "decode", "decode_weighted",
    "default_neighbours", "default_threshold", "effective_degree", "encode", "encode_weighted",
    "flatten", "unflatten",
]
