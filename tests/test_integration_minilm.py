"""Integration on the real embedded MiniLM and the real AG News files (small slices).

Needs the AG News copy (FEDSLIP_DATA_DIR or ../shared/data/ag_news); CI provides it.
"""

from __future__ import annotations

import pytest
from conftest import real_data_dir

import fedslip

pytestmark = pytest.mark.integration
DATA = real_data_dir()


@pytest.fixture(scope="module")
def agnews():
    if DATA is None:
        pytest.fail("AG News data not found: set FEDSLIP_DATA_DIR (the Makefile does when ../shared exists)")
    return str(DATA)


def test_minilm_fedavg_learns_on_ag_news(agnews, tmp_path):
    # IID isolates "does the pipeline learn": with 80% skew FedAvg needs far more rounds than a test has.
    cfg = fedslip.make_config(dict(data_dir=agnews, rounds=2, samples_per_client=64, test_samples_per_client=64,
                                   global_test_samples=400, local_epochs=3, batch_size=16, kstep=0,
                                   partition="iid"))
    summary = fedslip.run(cfg, tmp_path / "run", progress=False)
    assert summary["global_accuracy"] > 0.6, summary["global_accuracy"]
    assert summary["personalized_accuracy"] > 0.6


def test_minilm_fedslip_personalizes_on_skewed_clients(agnews, tmp_path):
    cfg = fedslip.make_config(dict(method="fedslip", data_dir=agnews, rounds=2, samples_per_client=64,
                                   test_samples_per_client=64, global_test_samples=200, local_epochs=3,
                                   batch_size=16, kstep=0, private_warmup_rounds=0))
    summary = fedslip.run(cfg, tmp_path / "run", progress=False)
    assert summary["private_bytes_transmitted"] == 0
    floors = summary["majority_floor_per_client"]
    # the personalized model does at least as well as always predicting the client's dominant class
    assert summary["personalized_accuracy"] >= sum(floors) / len(floors) - 0.05
