"""Server side: client sampling, update validation and aggregation of the global track.

Aggregation reuses flwr's implementations: ``fedavg`` is the sample-weighted mean
``w = sum_i n_i w_i / sum_i n_i`` (``flwr...aggregate``); ``median`` and ``trimmed_mean`` are the
coordinate-wise robust variants. Every update is validated first (key set, shapes, dtypes, finite
values, optional norm and size bounds); a rejected one is logged with its reason and left out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.server.strategy.aggregate import aggregate, aggregate_median, aggregate_trimmed_avg

from . import comm
from .config import ExperimentConfig

log = logging.getLogger("fedslip")


class UpdateError(ValueError):
    """A client update does not fit the global track (keys, shapes, dtypes, values, size or norm)."""


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


def validate_update(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                    max_update_norm: float = 0.0) -> None:
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
    if max_update_norm:
        norm = float(torch.sqrt(sum(((update[n].double() - r.double()) ** 2).sum() for n, r in reference.items())))
        if norm > max_update_norm:
            raise UpdateError(f"update norm {norm:.4g} exceeds max_update_norm={max_update_norm:g}")


def combine(updates: list[tuple[dict[str, torch.Tensor], int]], method: str = "fedavg",
            trim_fraction: float = 0.2) -> dict[str, torch.Tensor]:
    """Aggregate validated updates with flwr's fedavg / median / trimmed-mean."""
    names = list(updates[0][0])
    results = [([u[n].numpy() for n in names], num) for u, num in updates]
    if method == "median":
        arrays = aggregate_median(results)
    elif method == "trimmed_mean":
        arrays = aggregate_trimmed_avg(results, trim_fraction)
    else:
        arrays = aggregate(results)
    ref = updates[0][0]
    return {n: torch.from_numpy(np.asarray(a)).to(ref[n].dtype).reshape(ref[n].shape) for n, a in zip(names, arrays)}


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

    def payload_limit(self) -> int:
        return self.cfg.max_payload_bytes or 2 * len(self.broadcast())

    def aggregate(self, replies: dict[int, tuple[bytes, int]], failed: dict[int, str] | None = None) -> RoundUpdates:
        """Validate each (payload, num_examples) reply and aggregate the valid ones into the global track.

        ``failed`` lists clients that raised instead of replying; they count as rejected. Raises
        ``RoundFailed`` (leaving the global track unchanged) if fewer than ``min_fit_clients`` remain.
        """
        outcome, valid = RoundUpdates(rejected=dict(failed or {})), []
        limit = self.payload_limit()
        for cid, (payload, num_examples) in sorted(replies.items()):
            try:
                if len(payload) > limit:
                    raise UpdateError(f"payload of {len(payload)} bytes exceeds the limit of {limit}")
                update = comm.decode(payload)
                validate_update(update, self.state, self.cfg.max_update_norm)
                if num_examples <= 0:
                    raise UpdateError(f"num_examples={num_examples} must be > 0")
            except (UpdateError, comm.PayloadError) as e:
                log.warning("rejected update of client %d: %s", cid, e)
                outcome.rejected[cid] = str(e)
                continue
            valid.append((update, num_examples))
            outcome.accepted.append(cid)
        if len(valid) < self.cfg.min_fit_clients:
            raise RoundFailed(f"only {len(valid)} valid client update(s), min_fit_clients={self.cfg.min_fit_clients}"
                              f" (rejected or failed: {outcome.rejected})")
        self.state = combine(valid, self.cfg.aggregation, self.cfg.trim_fraction)
        return outcome
