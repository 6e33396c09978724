"""Run health: a run that learned nothing says so (log, metrics.jsonl, summary.json, report, exit code)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

import fedslip
from fedslip import cli, health
from fedslip.api import resume
from fedslip.experiment import RunDir, prepare
from fedslip.report import build_report, load_run


def _row(round_idx, glob=0.80, personal=0.90, loss=0.5, per_client=(0.9, 0.9, 0.9, 0.9), chance=0.25,
         floors=(0.8, 0.8, 0.8, 0.8)):
    return {"round": round_idx, "global_accuracy": glob, "personalized_accuracy": personal, "train_loss": loss,
            "personalized_accuracy_per_client": list(per_client), "global_chance": chance,
            "majority_floor_per_client": list(floors)}


def _symptoms(history):
    return [e["symptom"] for e in health.check_round(history)]


def test_a_learning_run_has_no_health_entries():
    history = [_row(1, 0.5, 0.85, 1.0), _row(2, 0.7, 0.88, 0.8), _row(3, 0.8, 0.9, 0.81), _row(4, 0.82, 0.91, 0.82)]
    assert all(_symptoms(history[:r]) == [] for r in range(1, 5))


def test_global_accuracy_within_two_points_of_chance_two_rounds_running_from_round_two():
    assert _symptoms([_row(1, glob=0.25)]) == []  # round 1 may still sit at the prior
    assert _symptoms([_row(1, glob=0.26), _row(2, glob=0.2699)]) == ["global_at_chance"]
    assert _symptoms([_row(1, glob=0.26), _row(2, glob=0.2701)]) == []
    assert _symptoms([_row(1, glob=0.5), _row(2, glob=0.25)]) == []  # one bad round is not a stuck run
    assert _symptoms([_row(1, glob=0.25), _row(2, glob=0.2695)]) == []  # rising by more than 1 point: learning
    # chance is what the evaluation set gives a constant prediction: its majority share
    assert _symptoms([_row(1, glob=0.4, chance=0.4), _row(2, glob=0.41, chance=0.4)]) == ["global_at_chance"]


def test_personalized_at_or_below_the_clients_mean_floor_from_round_three():
    floors = (0.7, 0.9, 0.8, 0.8)
    stuck = [_row(1), _row(2, personal=0.795, floors=floors), _row(3, personal=0.8, floors=floors)]
    entries = health.check_round(stuck)
    assert [e["symptom"] for e in entries] == ["personalized_at_floor"]
    assert entries[0]["floor"] == pytest.approx(0.8)
    # FedAvg on skewed clients sits below its floors in rounds 1-2
    assert _symptoms([_row(1, personal=0.8, floors=floors), _row(2, personal=0.8, floors=floors)]) == []
    assert _symptoms([*stuck[:2], _row(3, personal=0.81, floors=floors)]) == []
    assert _symptoms([*stuck[:1], _row(2, personal=0.6), _row(3, personal=0.7)]) == []  # climbing


def test_loss_not_finite_and_loss_rising_two_rounds():
    assert _symptoms([_row(1, loss=math.nan)]) == ["loss_not_finite"]
    assert _symptoms([_row(1, loss=1.0), _row(2, loss=math.inf)]) == ["loss_not_finite"]
    rising = [_row(1, loss=1.0), _row(2, loss=1.2), _row(3, loss=1.5)]
    assert _symptoms(rising) == ["loss_rising"]
    assert _symptoms(rising[:2]) == []  # one rise is not a trend
    assert _symptoms([_row(1, loss=1.0), _row(2, loss=1.02), _row(3, loss=1.04)]) == []  # noise of a stuck model
    # RISE_FACTOR = 1.1: overall rises just below and just above it
    assert _symptoms([_row(1, loss=1.0), _row(2, loss=1.05), _row(3, loss=1.099)]) == []
    assert _symptoms([_row(1, loss=1.0), _row(2, loss=1.05), _row(3, loss=1.101)]) == ["loss_rising"]
    assert _symptoms([_row(1, loss=1.0), _row(2, loss=1.5), _row(3, loss=1.4)]) == []


def test_loss_rising_with_sampled_clients_compares_the_global_test_loss():
    """Rounds that trained different clients have training losses over different data: a round of harder
    clients is not a diverging run; the global test loss (the same rows each round) is what must rise."""
    def row(r, loss, glob_loss, participants):
        return {**_row(r, loss=loss), "global_loss": glob_loss, "participants": participants}

    harder_clients = [row(1, 0.3, 0.5, [1, 2]), row(2, 0.35, 0.49, [3, 4]), row(3, 0.45, 0.48, [5, 6])]
    assert _symptoms(harder_clients) == []
    diverging = [row(1, 0.3, 0.5, [1, 2]), row(2, 0.3, 0.6, [3, 4]), row(3, 0.3, 0.7, [5, 6])]
    entries = health.check_round(diverging)
    assert [e["symptom"] for e in entries] == ["loss_rising"] and entries[0]["global_loss"] == [0.5, 0.6, 0.7]
    assert "global test loss" in entries[0]["detail"]
    same_clients = [row(1, 0.3, 0.5, [1, 2]), row(2, 0.35, 0.49, [1, 2]), row(3, 0.45, 0.48, [1, 2])]
    assert _symptoms(same_clients) == ["loss_rising"]  # every client trained each round: its own loss


def test_a_client_far_below_the_others_two_rounds_running():
    behind = (0.9, 0.92, 0.74, 0.91)
    entries = health.check_round([_row(1), _row(2, per_client=behind), _row(3, per_client=behind)])
    assert [(e["symptom"], e["client"]) for e in entries] == [("client_behind", 2)]
    assert _symptoms([_row(1, per_client=behind), _row(2, per_client=behind)]) == []  # not before round 3
    assert _symptoms([_row(1), _row(2, per_client=behind), _row(3, per_client=(0.9, 0.92, 0.76, 0.91))]) == []
    assert _symptoms([_row(1), _row(2), _row(3, per_client=behind)]) == []  # one round behind
    few = (0.9, 0.5, None, None)
    assert _symptoms([_row(1), _row(2, per_client=few), _row(3, per_client=few)]) == []  # needs 3 clients


def test_a_client_that_failed_is_flagged_in_the_round_it_failed():
    """A lost client makes the round's means cover fewer clients: flagged at once, from round 1, naming every
    failed client, its stage and the reason."""
    failed = {**_row(1), "rejected": {"3": "RuntimeError: disk lost"}, "failed_evaluations": {"1": "OSError: rows"}}
    entries = health.check_round([failed])
    assert [e["symptom"] for e in entries] == ["client_failed"]
    assert entries[0]["failures"] == [{"client": 3, "stage": "fit", "reason": "RuntimeError: disk lost"},
                                      {"client": 1, "stage": "evaluate", "reason": "OSError: rows"}]
    assert entries[0]["detail"] == "client 3 (fit): RuntimeError: disk lost; client 1 (evaluate): OSError: rows"
    assert _symptoms([{**_row(1), "rejected": {}, "failed_evaluations": {}}]) == []
    assert _symptoms([_row(1), {**_row(2), "failed_evaluations": {"0": "x"}}]) == ["client_failed"]


def test_every_entry_names_cause_and_fix():
    assert set(health.ADVICE) == {"global_at_chance", "personalized_at_floor", "loss_not_finite", "loss_rising",
                                  "client_behind", "client_failed"}
    line = health.message(health.check_round([_row(1, glob=0.25), _row(2, glob=0.25)])[0])
    assert "round 2" in line and "global_at_chance" in line and "fedslip tune" in line


def _run(tiny_cfg, path, **overrides):
    cfg = tiny_cfg(rounds=3, **overrides)
    return cfg, fedslip.run(cfg, path, progress=False, log=False)


def test_a_diverging_run_is_flagged(tiny_cfg, tmp_path, caplog, monkeypatch):
    """Constructed, not left to a trajectory: the clients report training losses 1.0, 1.3, 1.7 in rounds 1-3 (what
    a learning rate far too high gives) while lr 1e-9 keeps the global track at its prior. The health entries are
    logged, written per round to metrics.jsonl, gathered in summary.json and replayed from metrics.jsonl alone."""
    from fedslip.client import Client

    original = Client.fit

    def fit(self, payload, round_idx):
        reply = original(self, payload, round_idx)
        return dataclasses.replace(reply, metrics={**reply.metrics, "train_loss": (1.0, 1.3, 1.7)[round_idx - 1]})

    monkeypatch.setattr(Client, "fit", fit)
    with caplog.at_level("WARNING", logger="fedslip"):
        _, summary = _run(tiny_cfg, tmp_path / "run", lr=1e-9)
    symptoms = [(e["round"], e["symptom"]) for e in summary["health"] if e["symptom"] != "client_behind"]
    assert symptoms == [(2, "global_at_chance"), (3, "loss_rising"), (3, "global_at_chance"),
                        (3, "personalized_at_floor")]
    assert next(e for e in summary["health"] if e["symptom"] == "loss_rising")["train_loss"] == [1.0, 1.3, 1.7]
    assert any("loss_rising" in r.getMessage() and "learning rate" in r.getMessage() for r in caplog.records)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in rows] == [1.0, 1.3, 1.7]
    assert [e for row in rows for e in row["health"]] == summary["health"]  # per round, and all in the summary
    assert health.check_history(rows) == summary["health"]  # replayed from metrics.jsonl alone
    assert rows[0]["health"] == []


def test_a_run_stuck_at_its_prior_is_flagged(tiny_cfg, tmp_path):
    cfg, summary = _run(tiny_cfg, tmp_path / "run", lr=1e-9)
    symptoms = [(e["round"], e["symptom"]) for e in summary["health"] if e["symptom"] != "client_behind"]
    assert symptoms == [(2, "global_at_chance"), (3, "global_at_chance"), (3, "personalized_at_floor")]
    # each client's floor comes from its own evaluation reply: equal to the floor of the rows it holds
    assert summary["majority_floor_per_client"] == [c.majority_floor for c in prepare(cfg).clients]
    report = build_report([load_run(tmp_path / "run")], tmp_path / "report")
    assert report is not None
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Health" in text and "| `run` | 2 | global_at_chance |" in text


def test_strict_health_stops_a_run_that_lost_a_client_with_exit_code_3(tiny_cfg, tmp_path, data_dir, capsys,
                                                                       monkeypatch):
    from fedslip.client import Client

    original = Client.fit

    def fit(self, payload, round_idx):
        if self.cid == 1:
            raise RuntimeError("client 1 lost its disk")
        return original(self, payload, round_idx)

    monkeypatch.setattr(Client, "fit", fit)
    out = tmp_path / "run"
    code = cli.main(["run", "--method", "fedavg_lora", "--backbone", "tiny", "--data-dir", str(data_dir),
                     "--rounds", "2", "--samples-per-client", "32", "--test-samples-per-client", "16",
                     "--global-test-samples", "64", "--batch-size", "16", "--kstep", "0", "--precision", "fp32",
                     "--strict-health", "--out", str(out), "--quiet"])
    assert code == 3
    assert ("round 1 failed its health checks (strict_health): client_failed: client 1 (fit): RuntimeError: "
            "client 1 lost its disk") in capsys.readouterr().err
    assert RunDir(out).load_checkpoint().round == 1 and not (out / "summary.json").exists()


def test_strict_health_stops_after_the_checkpoint_with_exit_code_3(tiny_cfg, tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    code = cli.main(["run", "--method", "fedavg_lora", "--backbone", "tiny", "--data-dir", str(data_dir),
                     "--rounds", "3", "--samples-per-client", "32", "--test-samples-per-client", "16",
                     "--global-test-samples", "64", "--batch-size", "16", "--kstep", "0", "--precision", "fp32",
                     "--lr", "1e-9", "--strict-health", "--out", str(out), "--quiet"])
    assert code == 3
    assert "round 2 failed its health checks (strict_health): global_at_chance" in capsys.readouterr().err
    checkpoint = RunDir(out).load_checkpoint()
    assert checkpoint.round == 2 and not (out / "summary.json").exists()
    # strict_health is a run-only key: the run can be finished without it
    text = (out / "config.toml").read_text().replace("strict_health = true", "strict_health = false")
    (out / "config.toml").write_text(text)
    assert resume(out, progress=False, log=False)["rounds"] == 3
