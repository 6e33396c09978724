"""Client partitions: label proportions per client -> disjoint train / val / test rows.

Each client gets a class distribution ``p_i`` (dominant-class skew, Dirichlet, or uniform); its
train, validation and test rows are all drawn with that distribution (train and validation from the
train split, test from the test split), without replacement and disjoint between clients. The global
test set is a stratified (balanced where the split is) subset of the whole test split.

flwr-datasets' partitioners split a whole dataset into partitions of data-dependent size; here every
client has a fixed size and a test set that mirrors its train distribution, so the draw is done
directly from per-class pools (a few lines of numpy, deterministic for a seed).

``partition = "own"``: no shared dataset. Each client's rows are its own file (``own_rows`` splits it,
on the client); the server's partition holds only the global test set of its own test split.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .config import ExperimentConfig
from .data import DataError


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

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> Partition:
        raw = json.loads(Path(path).read_text())
        return cls(clients=[ClientRows(**c) for c in raw["clients"]], global_test=raw["global_test"])


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
