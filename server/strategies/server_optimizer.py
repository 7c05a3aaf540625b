"""The server's optimiser step, applied to the round's average of client adapters.

Flower's FedAvgM, FedAdam, FedYogi and FedAdagrad (`flwr.serverapp.strategy`) each take FedAvg's
weighted average and then move the global model along it with a server optimiser. fedtune computes
that average in more than one place (FedAvg over plain replies, the unmasked sum of secure
aggregation, plus the server's Gaussian noise under client-level DP), so the step is kept apart
from the averaging and applied last: to the securely computed average, and after the noise (a
post-processing of a DP release, so it costs no privacy). The updates below are Flower's, term for
term (tests/server/test_server_optimizer.py checks each against Flower's own class):

- FedAvgM (Hsu et al. 2019, arXiv:1909.06335): m_t = mu m_{t-1} + (x_t - avg),
  x_{t+1} = x_t - eta m_t.
- FedAdam, FedYogi, FedAdagrad (Reddi et al. 2021, arXiv:2003.00295): delta_t = avg - x_t,
  m_t = beta_1 m_{t-1} + (1 - beta_1) delta_t, v_t per optimiser,
  x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau) (FedAdam with Adam's bias correction on eta).
"""

from __future__ import annotations

import numpy as np

from fedtune.common.config import FederationConfig

State = dict[str, np.ndarray]


class ServerOptimizer:
    """No server step (FedAvg, FedProx): the average is the new global adapter."""

    name = "fedavg"

    def __init__(self, federation: FederationConfig) -> None:
        self.eta = federation.server_step_size
        self.moments: dict[str, State] = {}  # name ("m", "v") -> tensors, checkpointed

    def step(self, current: State, average: State, server_round: int) -> State:
        """The new global adapter from the current one and this round's average."""
        return average

    def state_arrays(self) -> State:
        """The optimiser's moments, flat ("m/<tensor>"), to checkpoint beside the adapter."""
        return {f"{moment}/{k}": v for moment, tensors in self.moments.items()
                for k, v in tensors.items()}

    def load_state_arrays(self, arrays: State) -> None:
        self.moments = {}
        for key, value in arrays.items():
            moment, _, name = key.partition("/")
            self.moments.setdefault(moment, {})[name] = value


class FedAvgM(ServerOptimizer):
    """Server momentum on the pseudo-gradient x_t - avg (Flower's FedAvgM, SGD convention)."""

    name = "fedavgm"

    def __init__(self, federation: FederationConfig) -> None:
        super().__init__(federation)
        self.mu = federation.server_momentum

    def step(self, current: State, average: State, server_round: int) -> State:
        pseudo_gradient = {k: current[k] - average[k] for k in current}
        if "m" in self.moments:
            pseudo_gradient = {k: self.mu * self.moments["m"][k] + g
                               for k, g in pseudo_gradient.items()}
        if self.mu > 0:
            self.moments["m"] = pseudo_gradient
        return {k: (current[k] - self.eta * g).astype(current[k].dtype)
                for k, g in pseudo_gradient.items()}


class FedOpt(ServerOptimizer):
    """The adaptive family: first moment of delta_t, a second moment set by `second_moment`."""

    def __init__(self, federation: FederationConfig) -> None:
        super().__init__(federation)
        self.beta_1, self.beta_2 = federation.beta_1, federation.beta_2
        self.tau = federation.tau

    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def step_size(self, server_round: int) -> float:
        return self.eta

    def step(self, current: State, average: State, server_round: int) -> State:
        delta_t = {k: average[k] - current[k] for k in current}
        m = self.moments.get("m") or {k: np.zeros_like(d) for k, d in delta_t.items()}
        v = self.moments.get("v") or {k: np.zeros_like(d) for k, d in delta_t.items()}
        m_t = {k: self.beta_1 * m[k] + (1 - self.beta_1) * d for k, d in delta_t.items()}
        v_t = {k: self.second_moment(v[k], d * d) for k, d in delta_t.items()}
        self.moments = {"m": m_t, "v": v_t}
        eta = self.step_size(server_round)
        return {k: (x + eta * m_t[k] / (np.sqrt(v_t[k]) + self.tau)).astype(x.dtype)
                for k, x in current.items()}


class FedAdam(FedOpt):
    name = "fedadam"

    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return self.beta_2 * v + (1 - self.beta_2) * delta_sq

    def step_size(self, server_round: int) -> float:
        # Flower's bias-corrected eta (Kingma & Ba 2014, the line before their Section 2.1)
        return float(self.eta * np.sqrt(1 - self.beta_2 ** (server_round + 1.0))
                     / (1 - self.beta_1 ** (server_round + 1.0)))


class FedYogi(FedOpt):
    name = "fedyogi"

    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return v - (1.0 - self.beta_2) * delta_sq * np.sign(v - delta_sq)


class FedAdagrad(FedOpt):
    name = "fedadagrad"

    def __init__(self, federation: FederationConfig) -> None:
        super().__init__(federation)
        self.beta_1 = 0.0  # Adagrad keeps no first moment (as Flower's FedAdagrad)

    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return v + delta_sq


OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    "fedavg": ServerOptimizer, "fedprox": ServerOptimizer, "fedavgm": FedAvgM,
    "fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}


def server_optimizer(federation: FederationConfig) -> ServerOptimizer:
    """The server step of `federation.strategy` (FedProx's difference is on the clients); an
    empty strategy must first be resolved for the run's kind (`RunConfig.aggregation`)."""
    if not federation.strategy:
        raise ValueError("federation.strategy is empty: pass RunConfig.aggregation")
    return OPTIMIZERS[federation.strategy](federation)
