"""Experiment tracking (fedslip/tracking.py): every tracker and callback gets exactly the rows that
metrics.jsonl gets; a missing library is refused before the run; round lines reach a plain script."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import pytest

import fedslip
from fedslip import tracking


def jsonl(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("tracked") / "run"
    cfg = fedslip.make_config(method="fedslip", backbone="tiny", data_dir=str(data_dir), rounds=3, num_clients=2,
                              samples_per_client=32, test_samples_per_client=16, global_test_samples=32,
                              batch_size=16, kstep=0, precision="fp32", report_to=["csv", "tensorboard", "mlflow"])
    seen = []
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        summary = fedslip.run(cfg, out, progress=False, callbacks=[seen.append])
    finally:
        mp.undo()
    return out, summary, seen


def test_callbacks_get_every_round_row_as_written(tracked):
    out, _, seen = tracked
    assert [r["round"] for r in seen] == [1, 2, 3]
    assert seen == jsonl(out)


def test_csv_tensorboard_and_mlflow_hold_the_rows_values(tracked):
    out, summary, _ = tracked
    rows = jsonl(out)
    with open(out / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(r["round"]) for r in table] == [1, 2, 3]
    assert [float(r["global_accuracy"]) for r in table] == [r["global_accuracy"] for r in rows]
    assert [float(r["personalized_accuracy_per_client/client1"]) for r in table] == \
        [r["personalized_accuracy_per_client"][1] for r in rows]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("global_accuracy")
    assert [e.step for e in scalars] == [1, 2, 3]
    assert [e.value for e in scalars] == pytest.approx([r["global_accuracy"] for r in rows], rel=1e-6)
    assert events.Scalars("summary/personalized_accuracy")[0].value == pytest.approx(summary["personalized_accuracy"])

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{(out / 'mlflow.db').resolve()}")
    (run,) = client.search_runs(client.search_experiments()[0].experiment_id)
    assert run.data.params["method"] == "fedslip" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx([r["train_loss"] for r in rows])


def test_a_missing_tracking_library_is_refused_before_anything_is_written(tiny_cfg, tmp_path, monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    with pytest.raises(fedslip.ConfigError, match=r"mlflow is not installed: pip install 'fedslip\[mlflow\]'"):
        fedslip.run(tiny_cfg(report_to=["mlflow"]), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(fedslip.ConfigError, match="report_to: 'neptune' not among"):
        tiny_cfg(report_to=["neptune"])


def test_resume_rewrites_the_csv_from_the_checkpoint_without_duplicates(tiny_cfg, tmp_path):
    """A callback that raises stops the run after round 2 was checkpointed; the resumed run's CSV has
    every round once, equal to metrics.jsonl."""
    out = tmp_path / "run"

    def stop_after_round_2(row):
        if row["round"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fedslip.run(tiny_cfg(rounds=3, report_to=["csv"]), out, progress=False, callbacks=[stop_after_round_2])
    seen = []
    fedslip.resume(out, progress=False, callbacks=[seen.append])
    assert [r["round"] for r in seen] == [3]
    with open(out / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(r["global_accuracy"]) for r in table] == [r["global_accuracy"] for r in jsonl(out)]
    assert [float(r["round"]) for r in table] == [1, 2, 3]


@pytest.mark.process
def test_a_plain_script_shows_timestamped_round_lines(data_dir, tmp_path):
    """No logging configured (a notebook or script): fedslip.run still shows the round lines."""
    def script(out, extra=""):
        return ("import fedslip; fedslip.run(fedslip.make_config(method='fedavg_lora', backbone='tiny', "
                f"data_dir={str(data_dir)!r}, rounds=2, num_clients=2, samples_per_client=32, "
                "test_samples_per_client=16, global_test_samples=32, batch_size=16, kstep=0, precision='fp32'), "
                f"{str(out)!r}, progress=False{extra})")

    res = subprocess.run([sys.executable, "-c", script(tmp_path / "run")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stderr.splitlines() if "round " in line and "| global" in line]
    assert len(lines) == 2
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d round \d/2 \| global", line) for line in lines), lines
    quiet = subprocess.run([sys.executable, "-c", script(tmp_path / "quiet", ", log=False")], capture_output=True,
                           text=True, timeout=600)
    assert quiet.returncode == 0 and "| global" not in quiet.stderr, quiet.stderr
