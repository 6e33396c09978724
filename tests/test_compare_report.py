"""compare: skips finished runs, resumes interrupted ones, refuses foreign ones; report from real runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedslip import api
from fedslip.compare import compare, run_dir_for
from fedslip.experiment import RunDirError

SMALL = dict(backbone="tiny", rounds=2, samples_per_client=16, test_samples_per_client=8, global_test_samples=32,
             batch_size=8, kstep=1, precision="fp32")


@pytest.fixture(scope="module")
def compared(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("cmp")
    overrides = {**SMALL, "data_dir": str(data_dir)}
    results = compare(["fedavg_lora", "fedslip"], [0, 1], out, overrides, command="fedslip compare ...",
                      progress=False)
    return out, overrides, results


def test_compare_writes_results_report_and_plots(compared):
    out, _, results = compared
    assert {(r["method"], r["seed"]) for r in results["runs"]} == {(m, s) for m in ("fedavg_lora", "fedslip")
                                                                 for s in (0, 1)}
    for name in ("results.json", "report.md", "accuracy_per_round.png", "per_client_accuracy.png",
                 "bytes_per_round.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    report = (out / "report.md").read_text()
    fedavg = results["by_method"]["fedavg_lora"]
    assert f"{100 * fedavg['global_accuracy']['mean']:.1f} ± {100 * fedavg['global_accuracy']['std']:.1f}" in report
    assert "majority floor" in report and "Bytes per round equal" in report


def test_same_partitions_for_every_method_of_a_seed(compared):
    out, *_ = compared
    for seed in (0, 1):
        a = (run_dir_for(out, "fedavg_lora", seed) / "partition.json").read_text()
        assert a == (run_dir_for(out, "fedslip", seed) / "partition.json").read_text()
    assert a != (run_dir_for(out, "fedslip", 0) / "partition.json").read_text()


def test_compare_skips_finished_runs_and_resumes_interrupted_ones(compared, monkeypatch):
    out, overrides, results = compared
    interrupted = run_dir_for(out, "fedslip", 1)
    (interrupted / "summary.json").unlink()
    calls = {"run": 0, "resume": []}
    real_resume = api.resume

    def no_run(*a, **k):
        calls["run"] += 1
        raise AssertionError("a finished run was run again")

    def resume(path, **k):
        calls["resume"].append(path)
        return real_resume(path, **k)

    monkeypatch.setattr(api, "run", no_run)
    monkeypatch.setattr(api, "resume", resume)
    again = compare(["fedavg_lora", "fedslip"], [0, 1], out, overrides, progress=False)
    assert calls == {"run": 0, "resume": [interrupted]}
    assert again["by_method"]["fedslip"]["global_accuracy"] == results["by_method"]["fedslip"]["global_accuracy"]


def test_compare_refuses_a_directory_with_other_settings(compared):
    out, overrides, _ = compared
    with pytest.raises(RunDirError, match="different config"):
        compare(["fedavg_lora"], [0], out, {**overrides, "rounds": 3}, progress=False)


def test_report_cli_rebuilds_from_run_directories(compared, tmp_path):
    out, *_ = compared
    (out / "report.md").unlink()
    res = subprocess.run([sys.executable, "-m", "fedslip.cli", "report", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "fedslip compare ..." in (out / "report.md").read_text()  # the recorded command is kept
    single = subprocess.run([sys.executable, "-m", "fedslip.cli", "report", str(run_dir_for(out, "fedslip", 0)),
                             str(run_dir_for(out, "fedavg_lora", 0)), "--out", str(tmp_path / "two")],
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert sorted(r["method"] for r in results["runs"]) == ["fedavg_lora", "fedslip"]
    empty = subprocess.run([sys.executable, "-m", "fedslip.cli", "report", str(tmp_path / "two")],
                           capture_output=True, text=True)
    assert empty.returncode == 2 and "no finished run" in empty.stderr


def test_report_refuses_to_average_runs_of_one_method_with_different_settings(compared, tmp_path):
    out, *_ = compared
    other = tmp_path / "other-lr"
    subprocess.run(["cp", "-r", str(run_dir_for(out, "fedslip", 1)), str(other)], check=True)
    config = other / "config.toml"
    config.write_text(config.read_text().replace("\nlr = ", "\nlr = 0.125 # was "))
    res = subprocess.run([sys.executable, "-m", "fedslip.cli", "report", str(run_dir_for(out, "fedslip", 0)),
                          str(other), "--out", str(tmp_path / "mixed")], capture_output=True, text=True)
    assert res.returncode == 2 and "differ in lr" in res.stderr and not (tmp_path / "mixed").exists()


def test_report_keeps_hand_written_notes(compared):
    out, *_ = compared
    (out / "notes.md").write_text("Ablation X explains the gap.")
    from fedslip.report import build_report, find_runs

    build_report(find_runs([out]), out)
    report = (out / "report.md").read_text()
    assert "## Notes" in report and "Ablation X explains the gap." in report
