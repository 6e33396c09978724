"""Server side: client sampling, update validation, and aggregation of the global track with a Flower
strategy (``flwr.serverapp.strategy``), the same in every engine.

Every update is validated first (key set, shapes, dtypes, finite values, optional norm and size bounds);
a rejected one is logged with its reason and left out. The valid ones reach the strategy's
``aggregate_train`` as Flower reply ``Message``s (``train_reply``): ``aggregation = "fedavg"`` is
``SampleWeightedFedAvg`` (Flower's FedAvg, mean ``w = sum_i n_i w_i / sum_i n_i``), ``"median"`` and
``"trimmed_mean"`` are Flower's ``FedMedian`` and ``FedTrimmedAvg`` (coordinate-wise, robust to outliers).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.server.strategy.aggregate import aggregate
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg

from . import codecs, comm, privacy
from .config import ExperimentConfig

log = logging.getLogger("fedslip")


class UpdateError(ValueError):
    """A client update does not fit the global track (keys, shapes, dtypes, values, size or norm)."""


class RoundFailed(RuntimeError):
    """Too few valid client updates to apply the round."""


def sample_clients(cfg: ExperimentConfig, round_idx: int) -> list[int]:
    """Clients that train in ``round_idx``: a seeded draw of max(1, round(fraction_fit * n))."""
    return _draw(cfg, round_idx, cfg.fraction_fit, stream=101)


def eval_clients(cfg: ExperimentConfig, round_idx: int) -> list[int]:
    """Clients evaluated after ``round_idx``: a seeded draw of max(1, round(eval_fraction * n)), drawn
    independently of the training sample; every client after the last round."""
    if round_idx >= cfg.rounds:
        return list(range(cfg.num_clients))
    return _draw(cfg, round_idx, cfg.eval_fraction, stream=202)


def global_view_clients(cfg: ExperimentConfig) -> list[int]:
    """Clients whose own models are also scored on the global test set after the last round: a seeded
    draw of max(1, round(eval_fraction * n)) (each costs a pass over the global test set)."""
    return _draw(cfg, cfg.rounds, cfg.eval_fraction, stream=303)


def _draw(cfg: ExperimentConfig, round_idx: int, fraction: float, stream: int) -> list[int]:
    n, k = cfg.num_clients, cfg.clients_for(fraction)
    if k >= n:
        return list(range(n))
    rng = np.random.default_rng([cfg.seed, round_idx, stream])
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


@contextlib.contextmanager
def quiet_flower_log() -> Iterator[None]:
    """Flower's logger at WARNING for the duration (its INFO lines describe Flower's own round loop)."""
    flower_log = logging.getLogger("flwr")
    level = flower_log.level
    flower_log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        flower_log.setLevel(level)


ARRAYS, METRICS, NUM_EXAMPLES = "arrays", "metrics", "num-examples"  # Flower strategies' record keys
REPLY_TTL_S = 3600.0


class SampleWeightedFedAvg(FedAvg):
    """Flower's FedAvg, with the sample-weighted mean computed in one division,
    ``sum_i n_i w_i / sum_i n_i`` (``flwr.server.strategy.aggregate.aggregate``), as in every published
    FedSLIP run. FedAvg's own ``aggregate_arrayrecords`` sums ``w_i * (n_i / N)``: the same mean up to
    float rounding, but rounding differences grow over training and would move the published numbers
    in their last digits. Reply checks and metric averaging are FedAvg's."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid:
            return None, None
        contents = [msg.content for msg in valid]
        names = list(contents[0][self.arrayrecord_key])
        results = [([c[self.arrayrecord_key][n].numpy() for n in names],
                     int(next(iter(c.metric_records.values()))[self.weighted_by_key])) for c in contents]
        arrays = ArrayRecord({n: Array(np.asarray(a)) for n, a in zip(names, aggregate(results), strict=True)})
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)


def make_strategy(cfg: ExperimentConfig) -> FedAvg:
    """The Flower strategy that aggregates the global track for ``cfg.aggregation``."""
    common = {"fraction_train": cfg.fraction_fit, "min_train_nodes": cfg.min_fit_clients,
              "min_available_nodes": cfg.num_clients, "weighted_by_key": NUM_EXAMPLES, "arrayrecord_key": ARRAYS}
    if cfg.aggregation == "median":
        return FedMedian(**common)
    if cfg.aggregation == "trimmed_mean":
        return FedTrimmedAvg(beta=cfg.trim_fraction, **common)
    return SampleWeightedFedAvg(**common)


def train_reply(cid: int, update: dict[str, torch.Tensor], num_examples: int) -> Message:
    """A client's validated update as the reply a Flower strategy aggregates: the global track under
    ``arrays``, its weight under ``metrics["num-examples"]``, the client id as group id and source."""
    content = RecordDict({ARRAYS: ArrayRecord(update), METRICS: MetricRecord({NUM_EXAMPLES: num_examples})})
    metadata = Metadata(run_id=0, message_id=f"reply-{cid}", src_node_id=cid, dst_node_id=0,
                        reply_to_message_id="", group_id=str(cid), created_at=time.time(), ttl=REPLY_TTL_S,
                        message_type=MessageType.TRAIN)
    return Message(content, metadata=metadata)


@dataclass
class RoundUpdates:
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    # each accepted client's change of the global track as received (before any DP clipping): kept
    # only with ``audit`` (fedslip/audit.py), for the honest-but-curious server's view
    changes: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


class Server:
    """Holds the global track between rounds; validates the clients' serialized replies (from any engine)
    and aggregates the valid ones with ``strategy`` (a Flower strategy, ``make_strategy``).

    ``state`` is the server's exact global track, ``reference`` what the clients hold: the same tensors
    with the fp32 download codec; with a lossy one, the sum of every decoded download so far
    (``codecs``), and ``state - reference`` is what later downloads still have to send. Clients train
    from ``reference``, so a lossy upload is decoded on top of it, and the aggregate moves ``state`` by
    the clients' mean change: ``state <- aggregate(reference + u_i) + (state - reference)``.
    """

    def __init__(self, cfg: ExperimentConfig, initial_state: dict[str, torch.Tensor], round_idx: int = 0,
                 reference: dict[str, torch.Tensor] | None = None, download: bytes | None = None,
                 held: dict[int, int] | None = None):
        self.cfg, self.round = cfg, round_idx
        self.state = initial_state
        self.strategy = make_strategy(cfg)
        self.upload, self.download = codecs.of(cfg, "upload"), codecs.of(cfg, "download")
        self.layout = codecs.layout_of(initial_state)
        self.full_payload_bytes = len(comm.encode(initial_state))
        # lossy downloads: the round of the shared reference each client confirmed it holds (a client that
        # missed a download is absent and gets the full state, ``download_for``)
        self.held: dict[int, int] = dict(held or {})
        self._sent_full: set[int] = set()  # clients sent this round's full-state download
        self._full: tuple[bytes, dict[str, torch.Tensor]] | None = None  # (payload, what it decodes to)
        if self.download.lossless:
            self.reference, self.payload = self.state, comm.encode(self.state)
        elif reference is not None and download is not None:  # resumed: what the clients hold and were sent
            self.reference, self.payload = reference, download
            self.base_round = codecs.payload_rounds(download)[0]
        else:  # a fresh run: the clients hold nothing yet (zeros)
            self.reference = {n: torch.zeros_like(t) for n, t in initial_state.items()}
            self._publish(base_round=-1)

    def _publish(self, base_round: int) -> None:
        """Encode ``state - reference`` as this round's download, and add what it carries to ``reference``."""
        change = {n: self.state[n] - self.reference[n] for n in self.state}
        self.payload = codecs.pack(self.download, change, base_round, self.round)
        self.base_round = base_round  # the round whose reference this download's change applies to (-1: zeros)
        update, _, _ = codecs.unpack(self.payload, self.download, self.layout)
        self.reference = codecs.apply(self.reference, update)

    def resume_state(self) -> tuple[dict[str, torch.Tensor] | None, bytes | None, dict[int, int] | None]:
        """What a checkpoint keeps besides ``state`` to resume exactly: with a lossy download codec the
        clients' reference, the download they were last sent and which client holds which round's
        reference; nothing with fp32."""
        return (None, None, None) if self.download.lossless else (self.reference, self.payload, dict(self.held))

    def broadcast(self) -> bytes:
        """This round's download as the clients on the chain receive it: the weights (fp32) or the change
        since the reference they hold (``download_for`` picks each client's)."""
        return self.payload

    def download_for(self, cid: int) -> bytes:
        """What client ``cid`` is sent of this round's global track. fp32: the weights. A lossy codec: the
        change ``broadcast()`` carries to a client that holds its base (the previous round's reference,
        or this round's already), else the full state (``codecs.pack_full``): a client that was not
        sampled, failed or joined late cannot apply a change to a reference it never received."""
        if self.download.lossless or self.base_round < 0 or self.held.get(cid) in (self.base_round, self.round):
            return self.payload
        if self._full is None:
            payload = codecs.pack_full(self.download, self.state, self.round)
            self._full = payload, codecs.unpack_full(payload, self.download, self.layout)
        self._sent_full.add(cid)
        return self._full[0]

    def downloads(self, cids: Iterable[int]) -> dict[int, bytes]:
        """``download_for`` each client in ``cids``."""
        return {cid: self.download_for(cid) for cid in cids}

    def delivered(self, cids: Iterable[int]) -> None:
        """Clients that answered a message of this round: a client sent the change now holds this round's
        reference; one sent the full state holds its own decoding of it, off the chain of changes."""
        if self.download.lossless:
            return
        for cid in cids:
            if cid in self._sent_full:
                self.held.pop(cid, None)
            else:
                self.held[cid] = self.round

    def payload_limit(self) -> int:
        return self.cfg.max_payload_bytes or 2 * self.full_payload_bytes

    def received_weights(self, cid: int, payload: bytes) -> dict[str, torch.Tensor]:
        """A client's global track as its reply carries it, placed on the shared reference: the weights
        (fp32), or the reference of this round plus the decoded update. A client that trained from the
        full-state download changed its own decoding of it: its change is placed on the reference, so
        every client's change counts alike. An update of another round's reference is refused."""
        if self.upload.lossless:
            weights = comm.decode(payload)
            if cid in self._sent_full and self._full is not None:
                full = self._full[1]
                weights = {n: self.reference[n] + (w - full[n]) if n in full else w for n, w in weights.items()}
            return weights
        update, base, _ = codecs.unpack(payload, self.upload, self.layout)
        if base != self.round:
            raise UpdateError(f"update of the global track of round {base}; this round's is {self.round}")
        return codecs.apply(self.reference, update)

    def aggregate(self, replies: dict[int, tuple[bytes, int]], failed: dict[int, str] | None = None,
                  round_idx: int = 0) -> RoundUpdates:
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
                update = self.received_weights(cid, payload)
                validate_update(update, self.reference, self.cfg.max_update_norm)
                if num_examples <= 0:
                    raise UpdateError(f"num_examples={num_examples} must be > 0")
            except (UpdateError, comm.PayloadError) as e:
                log.warning("rejected update of client %d: %s", cid, e)
                outcome.rejected[cid] = str(e)
                continue
            if self.cfg.audit:
                outcome.changes[cid] = {n: update[n] - self.reference[n] for n in update}
            if privacy.central(self.cfg):  # clipped change, uniform weight (fedslip/privacy.py)
                update, num_examples = privacy.clip(update, self.reference, self.cfg.dp_clip), 1
            valid.append(train_reply(cid, update, num_examples))
            outcome.accepted.append(cid)
        if len(valid) < self.cfg.min_fit_clients:
            raise RoundFailed(f"only {len(valid)} valid client update(s), min_fit_clients={self.cfg.min_fit_clients}"
                              f" (rejected or failed: {outcome.rejected})")
        with quiet_flower_log():  # the strategy's "aggregate_train: Received ..." line each round is noise here
            arrays, _ = self.strategy.aggregate_train(round_idx, valid)
        aggregated = {n: t.to(self.state[n].dtype) for n, t in arrays.to_torch_state_dict().items()}
        if privacy.central(self.cfg):
            aggregated = privacy.add_noise(aggregated, self.cfg, round_idx, averaged=len(valid))
        previous = self.round
        self.round = round_idx
        self._sent_full, self._full = set(), None
        if self.download.lossless:
            self.state = self.reference = aggregated
            self.payload = comm.encode(self.state)
        else:
            self.state = {n: aggregated[n] + (self.state[n] - self.reference[n]) for n in aggregated}
            self._publish(base_round=previous)
        return outcome
