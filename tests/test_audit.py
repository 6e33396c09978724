"""``fedslip audit``: the server's view is recorded exactly, and the classifier-bias attack reads each
client's dominant class from it far above chance where that class is obvious."""

from __future__ import annotations

import json

import pytest
import torch

import fedslip
from fedslip.audit import audit
from fedslip.cli import main
from fedslip.experiment import RunDirError, prepare
from fedslip.storage import load_tensors


def test_recorded_changes_are_what_the_server_averaged(tiny_cfg, tmp_path):
    cfg = tiny_cfg(rounds=1, audit=True)
    fedslip.run(cfg, tmp_path / "run", progress=False, log=False)
    recorded = load_tensors(tmp_path / "run" / "audit" / "round-0001.safetensors")
    final = load_tensors(tmp_path / "run" / "global.safetensors")
    start = prepare(cfg).model.global_state()
    clients = sorted({int(k.split("/")[0]) for k in recorded})
    assert clients == list(range(cfg.num_clients))
    for name, t in final.items():  # FedAvg of equal-sized clients: the start plus the mean recorded change
        mean = sum(recorded[f"{c}/{name}"] for c in clients) / len(clients)
        assert torch.allclose(t, start[name] + mean, atol=1e-6), name


def test_bias_attack_finds_obvious_dominant_classes_and_cannot_run_without_the_head(tiny_cfg, tmp_path, capsys):
    """Every client holds one class only: the class whose bias grew most is that class."""
    cfg = tiny_cfg(rounds=2, dominant_fraction=1.0, audit=True)
    fedslip.run(cfg, tmp_path / "fedavg", progress=False, log=False)
    result = audit(tmp_path / "fedavg")
    assert result["available"] and result["chance"] == 0.25 and result["guesses"] == 2 * cfg.num_clients
    assert result["accuracy"] >= 0.75, result  # far above chance (0.25)
    assert result["truth"] == [0, 1, 2, 3]
    assert json.loads((tmp_path / "fedavg" / "audit" / "audit.json").read_text()) == result
    assert main(["audit", str(tmp_path / "fedavg")]) == 0 and "accuracy" in capsys.readouterr().out
    fedslip.run(tiny_cfg(method="fedper", rounds=1, dominant_fraction=1.0, audit=True), tmp_path / "fedper",
                progress=False, log=False)
    assert audit(tmp_path / "fedper")["available"] is False  # the head never leaves the clients
    fedslip.run(tiny_cfg(rounds=1), tmp_path / "plain", progress=False, log=False)
    with pytest.raises(RunDirError, match="run it with --audit"):
        audit(tmp_path / "plain")
