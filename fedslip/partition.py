"""Client partitions: label proportions per client -> disjoint train / val / test rows.

Each client gets a class distribution ``p_i`` (dominant-class skew, Dirichlet, or uniform); its
train, validation and test rows are all drawn with that distribution (train and validation from the
train split, test from the test split), without replacement and disjoint between clients. The global
test set is a stratified (balanced where the split is) subset of the whole test split.

flwr-datasets' partitioners split a whole dataset into partitions of data-dependent size; here every
client has a fixed size and a test set that mirrors its train distribution, so the draw is done
directly from per-class pools (a few lines of numpy, deterministic for a seed).

``partition = "natural"``: the clients are given by the data, one per value of the column ``partition_by``
(flwr-datasets' ``NaturalIdPartitioner`` convention: one partition per unique value, ids in sorted order of
the values). Each client's rows are its group's: validation and training rows from its group of the train
split (shuffled with (seed, group name), so a client's rows do not depend on which other groups take part),
its test rows its group of the test split (an official per-group test set), each capped by the
``*_samples_per_client`` sizes. ``NaturalIdPartitioner`` itself is not used: it partitions one Hugging Face
``Dataset`` into partitions of whatever size the groups have, while each client here needs its group of two
splits, capped and with validation rows carved out, from the CSV rows already read (``TextSplit.groups``).

``partition = "own"``: no shared dataset. Each client's rows are its own file (``own_rows`` splits it,
on the client); the server's partition holds only the global test set of its own test split.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .config import ExperimentConfig
from .data import DataError, TextSplit


@dataclass
class ClientRows:
    train: list[int]
    val: list[int]
    test: list[int]
    proportions: list[float]


@dataclass
class Partition:
    clients: list[ClientRows]
    global_test: list[int]
    client_names: list[str] = field(default_factory=list)  # partition="natural": client i's group; else empty

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> Partition:
        raw = json.loads(Path(path).read_text())
        return cls(clients=[ClientRows(**c) for c in raw["clients"]], global_test=raw["global_test"],
                   client_names=raw.get("client_names", []))

    def names(self, num_clients: int) -> list[str]:
        """What reports call each client: its group (``partition = "natural"``), else its id."""
        return list(self.client_names) or [str(c) for c in range(num_clients)]


def partition_splits(cfg: ExperimentConfig, train: TextSplit, test: TextSplit) -> Partition:
    """The partition of a shared dataset that ``cfg.partition`` names."""
    if cfg.partition == "natural":
        return natural_partition(cfg, train, test)
    return make_partition(cfg, train.labels, test.labels)


def client_proportions(cfg: ExperimentConfig, rng: np.random.Generator) -> np.ndarray:
    """Class proportions, one row per client."""
    c, n = cfg.num_labels, cfg.num_clients
    if cfg.partition == "iid":
        return np.full((n, c), 1.0 / c)
    if cfg.partition == "dirichlet":
        return rng.dirichlet(np.full(c, cfg.dirichlet_alpha), size=n)
    props = np.full((n, c), (1.0 - cfg.dominant_fraction) / (c - 1))
    props[np.arange(n), np.arange(n) % c] = cfg.dominant_fraction
    return props


def counts_for(proportions: np.ndarray, total: int) -> np.ndarray:
    """Integer class counts summing to ``total`` (largest-remainder rounding)."""
    exact = proportions * total
    counts = np.floor(exact).astype(int)
    short = total - counts.sum()
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


class _Pools:
    """Shuffled per-class row pools of one split; ``take`` removes rows so draws are disjoint."""

    def __init__(self, labels: np.ndarray, num_labels: int, rng: np.random.Generator, name: str):
        self.name = name
        self.pools = [list(rng.permutation(np.flatnonzero(labels == k))) for k in range(num_labels)]

    def take(self, counts: np.ndarray, what: str) -> list[int]:
        rows: list[int] = []
        for k, need in enumerate(counts):
            if need > len(self.pools[k]):
                raise DataError(f"{what} needs {need} rows of class {k} but the {self.name} split has only "
                                f"{len(self.pools[k])} left; lower samples_per_client / "
                                f"test_samples_per_client / val_samples_per_client or num_clients")
            rows += [int(r) for r in self.pools[k][:need]]
            del self.pools[k][:need]
        return sorted(rows)


def make_partition(cfg: ExperimentConfig, train_labels: np.ndarray, test_labels: np.ndarray) -> Partition:
    rng = np.random.default_rng(cfg.seed)
    props = client_proportions(cfg, rng)
    train_pools = _Pools(train_labels, cfg.num_labels, rng, "train")
    test_pools = _Pools(test_labels, cfg.num_labels, rng, "test")
    clients = []
    for i, p in enumerate(props):
        clients.append(ClientRows(
            train=train_pools.take(counts_for(p, cfg.samples_per_client), f"client {i} train"),
            val=train_pools.take(counts_for(p, cfg.val_samples_per_client), f"client {i} validation"),
            test=test_pools.take(counts_for(p, cfg.test_samples_per_client), f"client {i} test"),
            proportions=[float(x) for x in p],
        ))
    return Partition(clients=clients, global_test=stratified_subset(test_labels, cfg, rng))


def natural_groups(cfg: ExperimentConfig, train: TextSplit) -> list[str]:
    """The groups that become clients: ``natural_groups``, else every value of the train split's column,
    sorted; refused unless there is one client per group."""
    present = sorted(set(train.groups))
    groups = list(cfg.natural_groups) or present
    unknown = [g for g in groups if g not in present]
    if unknown:
        raise DataError(f"natural_groups {unknown} are not values of column {cfg.partition_by!r} in {train.source} "
                        f"(its values: {', '.join(present)})")
    if len(groups) != cfg.num_clients:
        raise DataError(f"partition='natural' by {cfg.partition_by!r} gives {len(groups)} clients "
                        f"({', '.join(groups)}) but num_clients={cfg.num_clients}: set num_clients = "
                        f"{len(groups)}, or pick groups with natural_groups")
    return groups


def group_seed(seed: int, group: str) -> list[int]:
    """The seed of one group's shuffle: (run seed, a stable hash of the group's name)."""
    return [seed, int.from_bytes(hashlib.sha256(group.encode()).digest()[:4], "little")]


def natural_partition(cfg: ExperimentConfig, train: TextSplit, test: TextSplit) -> Partition:
    """One client per group (module docstring): its group's train rows shuffled with ``group_seed``, the first
    ``val_samples_per_client`` its validation rows, the next (at most) ``samples_per_client`` its training
    rows; its group's test rows (shuffled likewise, at most ``test_samples_per_client``) its test rows."""
    groups = natural_groups(cfg, train)
    train_groups, test_groups = np.asarray(train.groups), np.asarray(test.groups)
    clients = []
    for group in groups:
        rng = np.random.default_rng(group_seed(cfg.seed, group))
        own = [int(r) for r in rng.permutation(np.flatnonzero(train_groups == group))]
        own_test = [int(r) for r in rng.permutation(np.flatnonzero(test_groups == group))]
        val = cfg.val_samples_per_client
        if len(own) <= val:
            raise DataError(f"group {group!r} has {len(own)} train rows in {train.source}; val_samples_per_client="
                            f"{val} leaves it none to train on")
        if not own_test:
            raise DataError(f"group {group!r} has no rows in {test.source}: it would have no test set")
        rows = sorted(own[val:val + cfg.samples_per_client])
        shares = np.bincount(train.labels[rows], minlength=cfg.num_labels) / len(rows)
        test_rows = sorted(own_test[:cfg.test_samples_per_client])
        clients.append(ClientRows(train=rows, val=sorted(own[:val]), test=test_rows,
                                  proportions=[float(x) for x in shares]))
    global_test = stratified_subset(test.labels, cfg, np.random.default_rng(cfg.seed))
    return Partition(clients=clients, global_test=global_test, client_names=groups)


def own_partition(cfg: ExperimentConfig, test_labels: np.ndarray) -> Partition:
    """The server's partition when clients bring their own files: no client rows, only the global test set."""
    return Partition(clients=[], global_test=stratified_subset(test_labels, cfg, np.random.default_rng(cfg.seed)))


def own_rows(cfg: ExperimentConfig, cid: int, num_rows: int, source: str) -> ClientRows:
    """Client ``cid``'s split of its own file of ``num_rows`` rows: shuffled with (seed, client id), then
    ``test_samples_per_client`` test rows, ``val_samples_per_client`` validation rows and up to
    ``samples_per_client`` training rows (fewer when the file has fewer: its own data is all it has)."""
    held_out = cfg.test_samples_per_client + cfg.val_samples_per_client
    if num_rows <= held_out:
        raise DataError(f"{source} has {num_rows} rows; client {cid} needs more than test_samples_per_client + "
                        f"val_samples_per_client = {held_out} (the rest are its training rows)")
    order = [int(r) for r in np.random.default_rng([cfg.seed, cid]).permutation(num_rows)]
    test = cfg.test_samples_per_client
    return ClientRows(train=sorted(order[held_out:held_out + cfg.samples_per_client]),
                      val=sorted(order[test:held_out]), test=sorted(order[:test]), proportions=[])


def stratified_subset(labels: np.ndarray, cfg: ExperimentConfig, rng: np.random.Generator) -> list[int]:
    """``global_test_samples`` rows keeping the split's class shares; 0 or >= len: every row."""
    n = cfg.global_test_samples
    if n == 0 or n >= len(labels):
        return list(range(len(labels)))
    shares = np.bincount(labels, minlength=cfg.num_labels) / len(labels)
    pools = _Pools(labels, cfg.num_labels, rng, "test")
    return pools.take(counts_for(shares, n), "global test set")
