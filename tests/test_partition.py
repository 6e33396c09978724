"""Partitions: skew as configured, test rows mirror train distribution, disjoint, deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from fedslip.config import make_config
from fedslip.data import DataError
from fedslip.partition import Partition, counts_for, make_partition

TRAIN = np.repeat(np.arange(4), 300)
TEST = np.repeat(np.arange(4), 100)


def part(**kw):
    cfg = make_config({"samples_per_client": 100, "test_samples_per_client": 40, "global_test_samples": 200,
                       "val_samples_per_client": 20, **kw})
    return make_partition(cfg, TRAIN, TEST)


def test_dominant_skew_counts_are_exact():
    p = part(dominant_fraction=0.8)
    for i, c in enumerate(p.clients):
        train_counts = np.bincount(TRAIN[c.train], minlength=4)
        assert train_counts[i % 4] == 80 and train_counts.sum() == 100
        assert sorted(np.delete(train_counts, i % 4)) == [6, 7, 7]
        assert np.bincount(TEST[c.test], minlength=4)[i % 4] == 32


@pytest.mark.parametrize("kind", ["dominant", "dirichlet", "iid"])
def test_test_and_val_rows_follow_the_train_distribution(kind):
    p = part(partition=kind)
    for c in p.clients:
        assert np.array_equal(np.bincount(TEST[c.test], minlength=4), counts_for(np.array(c.proportions), 40))
        assert np.array_equal(np.bincount(TRAIN[c.train], minlength=4), counts_for(np.array(c.proportions), 100))
        assert np.array_equal(np.bincount(TRAIN[c.val], minlength=4), counts_for(np.array(c.proportions), 20))


def test_rows_are_disjoint_between_clients_and_between_train_and_val():
    p = part(num_clients=6)
    train_rows = [r for c in p.clients for r in c.train + c.val]
    test_rows = [r for c in p.clients for r in c.test]
    assert len(train_rows) == len(set(train_rows))
    assert len(test_rows) == len(set(test_rows))


def test_global_test_set_is_stratified_and_whole_split_when_zero():
    assert np.array_equal(np.bincount(TEST[part().global_test]), [50, 50, 50, 50])
    assert part(global_test_samples=0).global_test == list(range(len(TEST)))


def test_deterministic_for_a_seed_and_different_across_seeds(tmp_path):
    a, b, c = part(seed=3), part(seed=3), part(seed=4)
    assert a == b and a != c
    a.save(tmp_path / "p.json")
    assert Partition.load(tmp_path / "p.json") == a


def test_iid_is_balanced():
    for c in part(partition="iid").clients:
        assert list(np.bincount(TRAIN[c.train], minlength=4)) == [25, 25, 25, 25]


def test_more_samples_than_the_data_allows_is_a_clear_error():
    with pytest.raises(DataError, match="needs .* rows of class 0 but the train split has only"):
        part(samples_per_client=400)
    with pytest.raises(DataError, match="test split"):
        part(test_samples_per_client=200)


def test_dirichlet_alpha_sets_the_skew_of_the_rows_each_client_holds():
    """Dirichlet(alpha) proportions, seen in the rows drawn (not in the partition's own proportions): at
    alpha 0.05 a client's largest class holds most of its rows (E[max share] ~ 0.9 for 4 classes) and most
    clients lack some class entirely; at alpha 100 every class share is 0.25 +- 0.1 (its std is 0.02)."""
    train, test = np.repeat(np.arange(4), 3000), np.repeat(np.arange(4), 1000)

    def shares(alpha):
        cfg = make_config({"partition": "dirichlet", "dirichlet_alpha": alpha, "num_clients": 10,
                           "samples_per_client": 100, "test_samples_per_client": 40, "val_samples_per_client": 20,
                           "global_test_samples": 200})
        clients = make_partition(cfg, train, test).clients
        return np.array([np.bincount(train[c.train], minlength=4) / 100 for c in clients])

    skewed, even = shares(0.05), shares(100.0)
    assert skewed.max(axis=1).mean() >= 0.7 and (skewed.min(axis=1) == 0).sum() >= 5, skewed
    assert np.abs(even - 0.25).max() <= 0.1, even
