"""End-to-end runs on the tiny backbone: files, metrics, byte accounting, determinism, refusals."""

from __future__ import annotations

import json
import logging
import re
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

import fedslip
from fedslip import comm
from fedslip.cli import main
from fedslip.config import ConfigError
from fedslip.data import DataError
from fedslip.experiment import RunDirError
from fedslip.model import BackboneError
from fedslip.report import build_report, load_run

ROUND_KEYS = {"round", "global_accuracy", "personalized_accuracy", "personalized_accuracy_per_client",
              "train_loss", "upload_bytes", "download_bytes", "seconds", "private_bytes_transmitted"}
SUMMARY_KEYS = {"method", "seed", "rounds", "num_clients", "global_accuracy", "personalized_accuracy",
                "personalized_accuracy_per_client", "comm_bytes_per_round", "kstep_accuracy",
                "kstep_accuracy_per_client", "private_bytes_transmitted", "wall_seconds", "versions"}


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("runs") / "fedavg"
    cfg = fedslip.make_config(dict(method="fedavg_lora", backbone="tiny", data_dir=str(data_dir), rounds=2,
                                   samples_per_client=32, test_samples_per_client=16, global_test_samples=64,
                                   batch_size=16, kstep=3, precision="fp32"))
    return out, cfg, fedslip.run(cfg, out, progress=False)


def test_every_file_of_a_run_has_the_same_mode(baseline_run):
    """Atomic writes (summary.json, safetensors) get the mode plain writes get (config.toml), not 0600."""
    out, _, _ = baseline_run
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert "summary.json" in modes and "checkpoint/state.json" in modes and "global.safetensors" in modes
    assert len(set(modes.values())) == 1, modes


def test_run_writes_every_file_and_metric(baseline_run):
    out, cfg, summary = baseline_run
    for name in ("config.toml", "partition.json", "metrics.jsonl", "summary.json", "global.safetensors"):
        assert (out / name).is_file(), name
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(ROUND_KEYS <= set(r) for r in rows)
    assert SUMMARY_KEYS <= set(summary)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert fedslip.load_config(out / "config.toml") == cfg
    assert len(summary["kstep_accuracy_per_client"]) == 4 and 0 <= summary["kstep_accuracy"] <= 1
    # fedavg: the personalized model is the global model
    assert rows[-1]["personalized_accuracy"] == rows[-1]["global_track_local_accuracy"]


def test_bytes_counted_are_the_serialized_payloads(baseline_run):
    out, cfg, summary = baseline_run
    payload_len = len(comm.encode(load_file(out / "global.safetensors")))
    for row in read_metrics(out):
        assert row["download_bytes"] == payload_len * cfg.num_clients
        assert row["upload_bytes"] == payload_len * cfg.num_clients
    assert summary["comm_bytes_per_round"] == 2 * payload_len * cfg.num_clients
    assert summary["private_bytes_transmitted"] == 0


def test_same_seed_same_results(baseline_run, tmp_path):
    out, cfg, summary = baseline_run
    again = fedslip.run(cfg, tmp_path / "again", progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read_metrics(out)) == strip(read_metrics(tmp_path / "again"))
    assert again["kstep_accuracy_per_client"] == summary["kstep_accuracy_per_client"]
    a, b = load_file(out / "global.safetensors"), load_file(tmp_path / "again" / "global.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kstep_on_a_finished_run_reproduces_its_kstep_and_changes_nothing(baseline_run, tmp_path):
    out, cfg, summary = baseline_run
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # K-step is re-run to choose its steps and learning rate: on a test-split run only when asked to
    with pytest.raises(ConfigError, match=r"was evaluated on the test split .* pass --allow-test"):
        fedslip.kstep(out, cfg.kstep)
    assert not (out / "kstep").exists()
    again = fedslip.kstep(out, cfg.kstep, allow_test=True)
    assert again["kstep_accuracy_per_client"] == summary["kstep_accuracy_per_client"]
    assert json.loads((out / "kstep" / f"steps{cfg.kstep}-lr{cfg.kstep_lr:g}.json").read_text()) == again
    other = fedslip.kstep(out, 6, lr=0.05, allow_test=True)
    assert (out / "kstep" / "steps6-lr0.05.json").is_file() and other["kstep_lr"] == 0.05
    assert main(["kstep", "--run", str(out), "--steps", "2", "--allow-test"]) == 0
    assert (out / "kstep" / f"steps2-lr{cfg.kstep_lr:g}.json").is_file()
    assert {p: p.read_bytes() for p in before} == before, "the run's own files are untouched"
    with pytest.raises(ConfigError, match="steps > 0"):
        fedslip.kstep(out, 0)
    with pytest.raises(RunDirError, match="is not a run directory"):
        fedslip.kstep(tmp_path, 3)
    (tmp_path / "config.toml").write_bytes((out / "config.toml").read_bytes())  # an interrupted run
    with pytest.raises(RunDirError, match="run not finished in .*; continue with fedslip run --resume"):
        fedslip.kstep(tmp_path, 3)


def test_kstep_lr_is_the_kstep_learning_rate(baseline_run):
    """A K-step at a vanishing learning rate leaves every client at its zero-shot accuracy."""
    out, cfg, summary = baseline_run
    still = fedslip.kstep(out, 3, lr=1e-12, allow_test=True)
    assert still["kstep_accuracy_per_client"] == summary["personalized_accuracy_per_client"]


def test_centralized_trains_one_model_on_the_union_of_the_clients_rows(tiny_cfg, tmp_path):
    from fedslip.experiment import RunDir, build_pooled_trainer, prepare

    cfg = tiny_cfg(method="centralized", num_clients=3)
    setup = prepare(cfg)
    pooled = build_pooled_trainer(setup, RunDir(tmp_path / "x"))
    assert torch.equal(pooled.train.labels, torch.cat([c.train.labels for c in setup.clients]))
    assert pooled.train.input_ids == [i for c in setup.clients for i in c.train.input_ids]
    summary = fedslip.run(cfg, tmp_path / "central", progress=False)
    rows = read_metrics(tmp_path / "central")
    assert all(r["upload_bytes"] == r["download_bytes"] == 0 for r in rows), "nothing crosses a wire"
    assert len(summary["personalized_accuracy_per_client"]) == 3
    assert rows[-1]["personalized_accuracy"] == rows[-1]["global_track_local_accuracy"]
    with pytest.raises(ConfigError, match="centralized"):
        tiny_cfg(method="centralized", engine="flower-sim")
    with pytest.raises(ConfigError, match="private_head"):
        tiny_cfg(method="fedavg_lora", private_head="bias")


def test_fraction_fit_samples_clients(tiny_cfg, tmp_path, monkeypatch):
    """Each round trains the seeded draw of round(0.5 * 4) = 2 clients, numpy's choice seeded with (seed,
    round, 101): computed here, and for seed 4 a different pair each round ([2, 3], then [0, 1])."""
    from fedslip.client import Client

    trained = []
    original = Client.fit
    monkeypatch.setattr(Client, "fit", lambda self, payload, r: trained.append((r, self.cid)) or original(
        self, payload, r))
    cfg = tiny_cfg(fraction_fit=0.5, rounds=2, num_clients=4, seed=4)
    summary = fedslip.run(cfg, tmp_path / "r", progress=False)
    rows = read_metrics(tmp_path / "r")
    drawn = [sorted(np.random.default_rng([4, r, 101]).choice(4, size=2, replace=False).tolist()) for r in (1, 2)]
    assert drawn == [[2, 3], [0, 1]]
    assert [r["participants"] for r in rows] == drawn
    assert sorted(trained) == [(r, c) for r, chosen in enumerate(drawn, start=1) for c in chosen]
    assert rows[0]["upload_bytes"] == rows[0]["download_bytes"]
    assert summary["rounds_trained_per_client"] == [1, 1, 1, 1]


def test_the_rounds_each_client_trained_are_counted_and_reported(tiny_cfg):
    """Sampled and not rejected = trained; a client never sampled trained 0 rounds, and the report says how
    many client runs never trained."""
    from fedslip.report import RunRecord, rarely_trained_lines
    from fedslip.rounds import rounds_trained

    history = [{"participants": [0, 1], "rejected": {"1": "norm too large"}}, {"participants": [0, 2]},
               {"participants": [2, 0], "rejected": {}}]
    assert rounds_trained(history, 4) == [3, 0, 2, 0]
    run = RunRecord(Path("fedavg_lora-seed0"), tiny_cfg(fraction_fit=0.5, rounds=3, num_clients=4),
                    {"rounds_trained_per_client": [3, 0, 2, 0]}, [])
    assert rarely_trained_lines([run])[-1] == ("- fedavg_lora: min 0, median 1, max 3 of 3 rounds; 2 of 4 client "
                                               "runs never trained")
    assert rarely_trained_lines([RunRecord(run.path, tiny_cfg(rounds=3, num_clients=4), run.summary, [])]) == []


def test_eval_fraction_evaluates_a_seeded_sample_each_round_and_everyone_last(tiny_cfg, tmp_path, caplog):
    from fedslip.server import eval_clients, global_view_clients

    cfg = tiny_cfg(method="fedslip", num_clients=4, eval_fraction=0.5, rounds=3)
    with caplog.at_level(logging.INFO, logger="fedslip"):
        summary = fedslip.run(cfg, tmp_path / "r", progress=False)
    lines = [r.getMessage() for r in caplog.records if "| global" in r.getMessage()]
    assert ["(2/4 clients)" in line for line in lines] == [True, True, False]  # each round's mean says what it covers
    rows = read_metrics(tmp_path / "r")
    drawn = [eval_clients(cfg, r) for r in (1, 2)]
    assert all(len(d) == 2 for d in drawn) and drawn[0] != drawn[1]  # a fresh draw each round
    for row, chosen in zip(rows[:2], drawn):
        assert row["evaluated"] == chosen
        measured = {c for c, a in enumerate(row["personalized_accuracy_per_client"]) if a is not None}
        assert measured == set(chosen)  # only the drawn clients were evaluated, and none counts as failed
        assert row["failed_evaluations"] == {} and row["personalized_accuracy"] == pytest.approx(
            np.mean([row["personalized_accuracy_per_client"][c] for c in chosen]))
    assert "evaluated" not in rows[2] and None not in rows[2]["personalized_accuracy_per_client"]
    assert summary["complete"] and None not in summary["personalized_accuracy_per_client"]
    # after the last round a sample of clients is also scored on the global test set (n x its size at 1.0)
    scored = global_view_clients(cfg)
    on_global = summary["personalized_global_test_accuracy_per_client"]
    assert len(scored) == 2 and {c for c, a in enumerate(on_global) if a is not None} == set(scored)
    # the report shows the clients outside that sample as "–", and numpy warns about nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_report([load_run(tmp_path / "r")], tmp_path / "report")
    row = next(line for line in (tmp_path / "report" / "report.md").read_text().splitlines()
               if line.startswith("| fedslip on the global test set |"))
    cells = row.strip("|").split("|")[1:]
    assert [i for i, cell in enumerate(cells) if cell.strip() == "–"] == sorted(set(range(4)) - set(scored))


def test_existing_run_is_refused_and_kept(baseline_run):
    out, cfg, _ = baseline_run
    before = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(RunDirError, match="already holds a run"):
        fedslip.run(cfg, out, progress=False)
    assert (out / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize("overrides, error", [
    ({"data_dir": "/nonexistent/agnews"}, DataError),
    ({"samples_per_client": 10_000}, DataError),
    ({"backbone": "./no/such/model"}, BackboneError),
    ({"lora_targets": ["nothing_here"]}, BackboneError),
])
def test_bad_input_fails_before_anything_is_written(tiny_cfg, tmp_path, overrides, error):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(error):
        fedslip.run(tiny_cfg(**overrides), out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_overwrite_replaces_only_run_files(baseline_run, tiny_cfg, tmp_path):
    out = tmp_path / "run"
    fedslip.run(tiny_cfg(rounds=1, method="fedslip", private_warmup_rounds=0), out, progress=False)
    mine = [out / "notes.txt", out / "clients" / "0" / "notes.txt", out / "checkpoint" / "notes.txt"]
    for f in mine:
        f.write_text("keep me")
    fedslip.run(tiny_cfg(rounds=2), out, overwrite=True, progress=False)
    assert len(read_metrics(out)) == 2 and all(f.read_text() == "keep me" for f in mine)
    # the fedslip run's private state went (fedavg_lora keeps only its rows' fingerprint, rows.json)
    assert sorted({p.name for p in (out / "clients").rglob("*") if p.is_file()}) == ["notes.txt", "rows.json"]


def test_overwrite_refuses_a_directory_without_a_runs_config(tiny_cfg, tmp_path):
    out = tmp_path / "run"
    (out / "clients" / "0").mkdir(parents=True)
    (out / "summary.json").write_text("{}")
    (out / "clients" / "0" / "private.safetensors").write_text("not ours")
    with pytest.raises(RunDirError, match="no config.toml"):
        fedslip.run(tiny_cfg(rounds=1), out, overwrite=True, progress=False)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "clients", "clients/0", "clients/0/private.safetensors", "summary.json"]


@pytest.mark.process  # the console script in its own process
def test_cli_run_and_errors(data_dir, tmp_path):
    base = [sys.executable, "-m", "fedslip.cli", "run", "--backbone", "tiny", "--data-dir", str(data_dir),
            "--rounds", "1", "--samples-per-client", "16", "--test-samples-per-client", "8",
            "--global-test-samples", "32", "--kstep", "0", "--quiet"]
    ok = subprocess.run(base + ["--out", str(tmp_path / "cli")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["method"] == "fedslip"  # the one default method
    assert "round 1/1" not in ok.stderr
    loud = subprocess.run([a for a in base if a != "--quiet"] + ["--out", str(tmp_path / "loud")],
                          capture_output=True, text=True)
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d round 1/1 \| global", loud.stderr, re.M), loud.stderr
    assert "\x1b[" not in loud.stderr  # no ANSI colour when redirected
    assert "aggregate_train" not in loud.stderr  # Flower's strategy line describes Flower's loop, not ours
    again = run_cli(*base[3:], "--out", tmp_path / "cli")  # the errors: in this process (run_cli)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    bad = run_cli(*base[3:], "--out", tmp_path / "x", "--rounds", "0")
    assert bad.returncode == 2 and "rounds must be > 0" in bad.stderr
    assert "Traceback" not in bad.stderr
    taken = tmp_path / "deploy" / "run"
    taken.mkdir(parents=True)
    (taken / "summary.json").write_text("{}")
    deploy = run_cli("deploy-local", "--workdir", tmp_path / "deploy", "--backbone", "tiny", "--data-dir", data_dir)
    assert deploy.returncode == 2 and "already holds a run" in deploy.stderr
    assert (taken / "summary.json").read_text() == "{}"
    assert [p.name for p in (tmp_path / "deploy").iterdir()] == ["run"]  # no SuperLink, nodes or logs started


def test_api_rejects_invalid_config_object():
    with pytest.raises(ConfigError):
        fedslip.make_config({"num_clients": 0})
