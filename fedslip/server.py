"""Server side: client sampling, update validation and FedAvg over the global track.

FedAvg here is the sample-weighted mean of the clients' global-track tensors,
``w = sum_i n_i w_i / sum_i n_i``, accumulated in float64 so that the result does not depend on
client order beyond float rounding of the final cast.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from . import comm
from .config import ExperimentConfig

log = logging.getLogger("fedslip")


class UpdateError(ValueError):
    """A client update does not fit the global track (keys, shapes, dtypes or values)."""


class RoundFailed(RuntimeError):
    """Too few valid client updates to apply the round."""


def sample_clients(cfg: ExperimentConfig, round_idx: int) -> list[int]:
    """Clients that train in ``round_idx``: a seeded draw of max(1, round(fraction_fit * n))."""
    n = cfg.num_clients
    k = max(1, round(cfg.fraction_fit * n))
    if k >= n:
        return list(range(n))
    rng = np.random.default_rng([cfg.seed, round_idx, 101])
    return sorted(int(c) for c in rng.choice(n, size=k, replace=False))


def validate_update(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    missing, extra = sorted(set(reference) - set(update)), sorted(set(update) - set(reference))
    if missing or extra:
        raise UpdateError(f"key set differs from the global track: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, ref in reference.items():
        t = update[name]
        if t.shape != ref.shape:
            raise UpdateError(f"{name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        if t.dtype != ref.dtype:
            raise UpdateError(f"{name} has dtype {t.dtype}, expected {ref.dtype}")
        if not torch.isfinite(t).all():
            raise UpdateError(f"{name} contains NaN or Inf")


def fedavg(updates: list[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    total = sum(n for _, n in updates)
    names = updates[0][0].keys()
    return {name: (sum(u[name].double() * n for u, n in updates) / total).to(updates[0][0][name].dtype)
            for name in names}


@dataclass
class RoundUpdates:
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)


class Server:
    """Holds the global track between rounds; engines hand it the clients' serialized replies."""

    def __init__(self, cfg: ExperimentConfig, initial_state: dict[str, torch.Tensor]):
        self.cfg = cfg
        self.state = initial_state

    def broadcast(self) -> bytes:
        return comm.encode(self.state)

    def aggregate(self, replies: dict[int, tuple[bytes, int]]) -> RoundUpdates:
        """Validate each (payload, num_examples) reply, FedAvg the valid ones into the global track."""
        outcome, valid = RoundUpdates(), []
        for cid, (payload, num_examples) in sorted(replies.items()):
            try:
                update = comm.decode(payload)
                validate_update(update, self.state)
                if num_examples <= 0:
                    raise UpdateError(f"num_examples={num_examples} must be > 0")
            except (UpdateError, comm.PayloadError) as e:
                log.warning("rejected update of client %d: %s", cid, e)
                outcome.rejected[cid] = str(e)
                continue
            valid.append((update, num_examples))
            outcome.accepted.append(cid)
        if not valid:
            raise RoundFailed(f"no valid client update this round (rejected: {outcome.rejected})")
        self.state = fedavg(valid)
        return outcome
