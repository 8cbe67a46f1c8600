"""FedAvg (McMahan et al., 2017): local SGD on the client, example-weighted mean on the server.

Records: the server sends "arrays" (global model) and "config" (with "algorithm" = "fedavg");
a client replies with "arrays" (its local model) and one MetricRecord holding "num-examples".
"""

from __future__ import annotations

from .base import ClientHalf
from .server import ServerHalf


class FedAvg(ServerHalf):
    """Flower's FedAvg with fedpsg's robust aggregation, EMA/SWA and checkpoints.

    See `strategies.server.ServerHalf` for the parameters.
    """

    algorithm = "fedavg"


# FedAvg's client half is plain local SGD: the base ClientHalf itself.
FedAvgClient = ClientHalf
