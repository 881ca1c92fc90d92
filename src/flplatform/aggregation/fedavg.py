"""The weighted-mean strategies: FedAvg, and FedProx (FedAvg on the server, a proximal term on clients).

Both use the base class's streaming weighted mean unchanged (:class:`~.base.Aggregator`).
"""

from __future__ import annotations

from typing import Any

from .base import Aggregator
from .options import OptionSpec


class FedAvg(Aggregator):
    name = "fedavg"
    description = "Weighted mean of the client models (McMahan et al. 2017), streamed as updates arrive."


class FedProx(Aggregator):
    name = "fedprox"
    description = (
        "FedAvg aggregation for clients trained with a proximal term mu/2·||w - w_global||² "
        "(Li et al. 2020); proximal_mu is sent to the clients."
    )
    options = {
        "proximal_mu": OptionSpec(float, 0.01, "Weight of the clients' proximal term.", minimum=0.0),
    }

    @property
    def client_config(self) -> dict[str, Any]:
        return {"proximal_mu": self.config["proximal_mu"]}
