"""compare: skips finished runs, resumes interrupted ones, refuses foreign ones; report from real runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import run_cli

from fedslip import api, load_config
from fedslip.cli import main
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
    assert "Per method" not in report  # one config for every method


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
    res = run_cli("report", out)
    assert res.returncode == 0, res.stderr
    assert "fedslip compare ..." in (out / "report.md").read_text()  # the recorded command is kept
    single = run_cli("report", run_dir_for(out, "fedslip", 0), run_dir_for(out, "fedavg_lora", 0), "--out",
                     tmp_path / "two")
    assert single.returncode == 0, single.stderr
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert sorted(r["method"] for r in results["runs"]) == ["fedavg_lora", "fedslip"]
    named = run_cli("report", run_dir_for(out, "fedslip", 0), run_dir_for(out, "fedavg_lora", 0), "--out",
                    tmp_path / "two", "--command", "scripts/x.sh")  # runs made by a script
    assert named.returncode == 0, named.stderr
    assert "Command: `scripts/x.sh`" in (tmp_path / "two" / "report.md").read_text()
    assert json.loads((tmp_path / "two" / "results.json").read_text())["command"] == "scripts/x.sh"
    empty = run_cli("report", tmp_path / "two")
    assert empty.returncode == 2 and "no finished run" in empty.stderr


def test_report_refuses_to_average_runs_of_one_method_with_different_settings(compared, tmp_path):
    out, *_ = compared
    other = tmp_path / "other-lr"
    subprocess.run(["cp", "-r", str(run_dir_for(out, "fedslip", 1)), str(other)], check=True)
    config = other / "config.toml"
    config.write_text(config.read_text().replace("\nlr = ", "\nlr = 0.125 # was "))
    res = run_cli("report", run_dir_for(out, "fedslip", 0), other, "--out", tmp_path / "mixed")
    assert res.returncode == 2 and "differ in lr" in res.stderr and not (tmp_path / "mixed").exists()


def test_report_keeps_hand_written_notes(compared):
    out, *_ = compared
    (out / "notes.md").write_text("Ablation X explains the gap.")
    from fedslip.report import build_report, find_runs

    build_report(find_runs([out]), out)
    report = (out / "report.md").read_text()
    assert "## Notes" in report and "Ablation X explains the gap." in report


# --- plots -----------------------------------------------------------------------------------------------
def fake_run(method, seed, zero_shot, kstep, floors=(0.8, 0.8, 0.8)):
    """A finished run as the report reads it, with the per-client accuracies given."""
    from pathlib import Path

    from fedslip import make_config
    from fedslip.report import RunRecord

    cfg = make_config(dict(method=method, seed=seed, backbone="tiny", num_clients=len(zero_shot)))
    summary = {"personalized_accuracy_per_client": list(zero_shot), "kstep_accuracy_per_client": kstep,
               "majority_floor_per_client": list(floors), "comm_mib_per_round": 2.325}
    rounds = [{"global_accuracy": 0.80, "personalized_accuracy": 0.85}, {"global_accuracy": 0.85,
                                                                          "personalized_accuracy": 0.90}]
    return RunRecord(Path(f"{method}-seed{seed}"), cfg, summary, rounds)


RUNS = [fake_run("fedslip", 0, [0.90, 0.94, 0.88], [0.91, 0.95, 0.86]),
        fake_run("fedslip", 1, [0.92, 0.96, None], [0.93, 0.97, 0.90]),  # client 2 failed its evaluation
        fake_run("fedavg_lora", 0, [0.84, 0.86, 0.83], [0.93, 0.95, 0.92]),
        fake_run("fedavg_lora", 1, [0.86, 0.90, 0.85], [0.92, 0.96, 0.94]),
        fake_run("dual_naive", 0, [0.88, 0.90, 0.86], None),  # no K-step
        fake_run("centralized", 0, [0.87, 0.91, 0.89], [0.90, 0.92, 0.91])]


def bar_containers(fig):
    from matplotlib.container import BarContainer

    return {c.get_label(): c for ax in fig.axes for c in ax.containers if isinstance(c, BarContainer)}


def colours_of(fig, method):
    """The colours of the lines and bars a figure labels as ``method`` (labels start with the method name)."""
    from matplotlib.colors import to_rgba

    found = {to_rgba(line.get_color()) for ax in fig.axes for line in ax.get_lines()
             if line.get_label().split(" ")[0] == method}
    return found | {to_rgba(p.get_facecolor()) for label, c in bar_containers(fig).items()
                    if label.split(" ")[0] == method for p in c.patches}


def test_each_method_has_one_colour_in_every_plot_of_every_report():
    import os

    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    from fedslip.report import FIGURES, method_color

    known = {m: method_color(m) for m in ("fedavg_lora", "dual_naive", "fedslip", "centralized")}
    assert len({to_rgba(c) for c in known.values()}) == 4
    # a method outside the map gets a colour of its own, the same in every process (not Python's salted hash)
    code = "from fedslip.report import method_color; print(method_color('fedbn'))"
    elsewhere = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    assert elsewhere == {method_color("fedbn")} and method_color("fedbn") not in known.values()
    for name, make in FIGURES.items():
        together, alone = make(RUNS), make([r for r in RUNS if r.method == "fedslip"])
        for m, colour in known.items():
            assert colours_of(together, m) == {to_rgba(colour)}, (name, m)
        assert colours_of(alone, "fedslip") == {to_rgba(known["fedslip"])}, name
        plt.close(together)
        plt.close(alone)


def test_per_client_plot_shows_kstep_next_to_zero_shot_with_std_error_bars_on_a_readable_axis():
    import matplotlib.pyplot as plt

    from fedslip.report import per_client_figure

    fig = per_client_figure(RUNS)
    bars = bar_containers(fig)
    assert set(bars) == {f"{m} {kind}" for m in ("fedavg_lora", "fedslip", "centralized")
                         for kind in ("zero-shot", "+ K-step")} | {"dual_naive zero-shot", "majority-class floor"}
    root2 = 2 ** 0.5  # sample std (ddof=1) of two values 2 points apart
    expected = {  # mean and std over the seeds, in %, per client, by hand from RUNS
        "fedslip zero-shot": ([91, 95, 88], [root2, root2, 0.0]),  # client 2: one seed left
        "fedslip + K-step": ([92, 96, 88], [root2, root2, 2 * root2]),
        "fedavg_lora zero-shot": ([85, 88, 84], [root2, 2 * root2, root2]),
        "fedavg_lora + K-step": ([92.5, 95.5, 93], [root2 / 2, root2 / 2, root2]),
    }
    for label, (mean, std) in expected.items():
        heights = [p.get_height() for p in bars[label].patches]
        assert heights == pytest.approx(mean), label
        assert bars[label].errorbar is not None, label
        segments = bars[label].errorbar.lines[2][0].get_segments()  # one [[x, low], [x, high]] per client
        assert [s[0][1] for s in segments] == pytest.approx([m - s for m, s in zip(mean, std)]), label
        assert [s[1][1] for s in segments] == pytest.approx([m + s for m, s in zip(mean, std)]), label
    assert bars["dual_naive zero-shot"].errorbar is None  # one seed: no spread to show
    for m in ("fedavg_lora", "fedslip", "centralized"):  # K-step bar right beside the zero-shot bar, hatched
        zero_shot, kstep = bars[f"{m} zero-shot"].patches, bars[f"{m} + K-step"].patches
        for z, k in zip(zero_shot, kstep):
            assert k.get_x() == pytest.approx(z.get_x() + z.get_width()) and k.get_hatch() and not z.get_hatch()
    bottom, top = fig.axes[0].get_ylim()
    lowest = 80.0  # the majority floor; the methods' lowest bar or error bar is 84 - 1.41
    assert lowest - 10 <= bottom < lowest and top >= 96 + root2
    plt.close(fig)


def test_compare_runs_a_method_with_its_own_config_file(tmp_path, data_dir):
    """--method-config METHOD=TOML: that method reads its own file (a tuned best.toml) in place of --config;
    the others keep --config; the CLI flags still apply to all."""
    base, tuned = tmp_path / "base.toml", tmp_path / "tuned.toml"
    keys = {**SMALL, "data_dir": str(data_dir), "rounds": 1, "kstep": 0}
    base.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in keys.items()) + "\n")
    tuned.write_text(base.read_text() + "lr = 0.0123\n")
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "fedavg_lora,fedper", "--seeds", "0", "--config", str(base),
                 "--method-config", f"fedper={tuned}", "--out", str(out), "--quiet", "--batch-size", "4"]) == 0
    lrs = {m: load_config(run_dir_for(out, m, 0) / "config.toml") for m in ("fedavg_lora", "fedper")}
    assert lrs["fedper"].lr == 0.0123 and lrs["fedavg_lora"].lr == load_config(base).lr
    assert {c.batch_size for c in lrs.values()} == {4}
    assert f"Per method (each its own config): lr fedavg_lora {load_config(base).lr}, fedper 0.0123." in \
        (out / "report.md").read_text()
    with pytest.raises(ValueError, match="which --methods does not list"):
        compare(["fedavg_lora"], [0], tmp_path / "other", method_configs={"fedper": tuned})


def test_report_gives_seconds_per_round_and_names_each_methods_device_when_they_differ(compared, tmp_path):
    import shutil

    import numpy as np

    out, *_ = compared
    for method in ("fedavg_lora", "fedslip"):
        for seed in (0, 1):
            shutil.copytree(run_dir_for(out, method, seed), tmp_path / "runs" / f"{method}-seed{seed}")
    rows = {m: [json.loads(line) for s in (0, 1) for line in
                (tmp_path / "runs" / f"{m}-seed{s}" / "metrics.jsonl").read_text().splitlines()]
            for m in ("fedavg_lora", "fedslip")}
    expected = {m: np.mean([np.mean([r["seconds"] for r in rows[m][:2]]), np.mean([r["seconds"] for r in rows[m][2:]])])
                for m in rows}  # per run, then over seeds

    def seconds_cell(method):
        assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")]) == 0
        report = (tmp_path / "rep" / "report.md").read_text()
        header = next(line for line in report.splitlines() if line.startswith("| method | global accuracy |"))
        column = header.split(" | ").index("s per round")
        return next(line for line in report.splitlines() if line.startswith(f"| {method} |")).split(" | ")[column]

    assert seconds_cell("fedslip") == f"{expected['fedslip']:.1f}"  # one device: named in Settings only
    for seed in (0, 1):  # the fedslip runs moved to another machine
        path = tmp_path / "runs" / f"fedslip-seed{seed}" / "summary.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "device": "cuda"}))
    assert seconds_cell("fedslip") == f"{expected['fedslip']:.1f} (cuda)"
    assert seconds_cell("fedavg_lora") == f"{expected['fedavg_lora']:.1f} (cpu)"


# --- verdicts, incomplete runs, compute, settings: from run directories written here -----------------------
T_975 = {2: 4.302652729911275, 3: 3.182446305284263}  # two-sided 95% t quantiles (a table), by degrees of freedom
CONSTRUCTED = dict(backbone="tiny", num_clients=3, rounds=2, kstep=5)


def write_run(root, method, seed, personal, glob, kstep=None, failures=(), complete=True, config=None, **summary):
    """A finished run directory as ``fedslip run`` leaves it, with the final accuracies given (fractions)."""
    from fedslip import make_config

    path = root / f"{method}-seed{seed}"
    path.mkdir(parents=True)
    cfg = make_config({**CONSTRUCTED, **(config or {}), "method": method, "seed": seed})
    cfg.save(path / "config.toml")
    (path / "partition.json").write_text(json.dumps({"global_test": list(range(32))}))
    per_client = [personal, personal, None if failures else personal]  # a client that failed has no accuracy
    summary = {"method": method, "seed": seed, "global_accuracy": glob, "personalized_accuracy": personal,
               "personalized_accuracy_per_client": per_client, "worst_client_personalized_accuracy": personal,
               "kstep_accuracy": kstep, "kstep_accuracy_per_client": None if kstep is None else [kstep] * 3,
               "majority_floor_per_client": [0.8, 0.8, None if failures else 0.8],
               "global_accuracy_per_class": [glob] * 4, "comm_mib_per_round": 2.0, "private_bytes_transmitted": 0,
               "wall_seconds": 60.0, "device": "cpu", "precision": "fp32", "eval_split": "test",
               "health": [], "complete": complete and not failures,
               "client_failures": [{"round": 1, "client": 2, "stage": "fit", "reason": "RuntimeError: disk"}
                                   for _ in failures], **summary}
    (path / "summary.json").write_text(json.dumps(summary))
    rows = [{"round": r, "global_accuracy": glob, "personalized_accuracy": personal, "seconds": 1.0}
            for r in (1, 2)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_report_names_the_unfinished_runs_it_leaves_out_and_refuses_one_named(tmp_path, capsys):
    """An interrupted run in a folder of runs is left out with a line on stderr and in report.md (it was left out
    silently, and the seed list shrank); an interrupted run named on the command line is refused."""
    for seed in (0, 1, 2):
        write_run(tmp_path / "runs", "fedavg_lora", seed, personal=0.85, glob=0.80)
    interrupted = tmp_path / "runs" / "fedavg_lora-seed2"
    (interrupted / "summary.json").unlink()
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    why = f"{interrupted}: run not finished (no summary.json; fedslip run --resume {interrupted} finishes it)"
    assert capsys.readouterr().err == f"fedslip report: skipped {why}\n"
    assert f"Left out of this report: {why}." in (tmp_path / "report" / "report.md").read_text()
    assert [r["seed"] for r in json.loads((tmp_path / "report" / "results.json").read_text())["runs"]] == [0, 1]
    named = ["report", str(tmp_path / "runs" / "fedavg_lora-seed0"), str(interrupted), "--out", str(tmp_path / "two")]
    assert main(named) == 2
    assert capsys.readouterr().err == (f"fedslip: error: run not finished in {interrupted} (no summary.json); continue "
                                       f"with fedslip run --resume {interrupted}\n")
    assert not (tmp_path / "two").exists()


def test_runs_of_one_method_with_other_settings_are_refused_in_words_not_under_the_methods_name(tmp_path, capsys):
    """The error began with the method's name: "fedslip: error: fedslip: a and b differ in lr" read as a doubled
    prefix."""
    a = write_run(tmp_path / "a", "fedslip", 0, personal=0.9, glob=0.8, config={"lr": 0.01})
    b = write_run(tmp_path / "b", "fedslip", 0, personal=0.9, glob=0.8, config={"lr": 0.02})
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "mixed")]) == 2
    assert capsys.readouterr().err.startswith(f"fedslip: error: runs {a} and {b} of method fedslip differ in lr; ")


def report_of(root, out=None, **kw):
    from fedslip.report import build_report, find_runs

    out = out or root / "report"
    results = build_report(find_runs([root]), out, **kw)
    return results, (out / "report.md").read_text()


def paired_entry(results, method, reference, metric):
    return next(p for p in results["verdict"]["paired"] if (p["method"], p["reference"], p["metric"]) ==
                (method, reference, metric))


def table_row(report, first_cell):
    return next(line for line in report.splitlines() if line.startswith(f"| {first_cell} |"))


def test_the_verdict_reads_ahead_behind_or_level_from_the_paired_95_percent_interval(tmp_path):
    """Seeds pair: the per-seed differences, their mean and a t interval over seeds decide the words."""
    fedslip = {"personal": (0.90, 0.92, 0.91), "glob": (0.80, 0.81, 0.82), "kstep": (0.91, 0.92, 0.93)}
    fedavg = {"personal": (0.88, 0.89, 0.90), "glob": (0.78, 0.785, 0.805), "kstep": (0.93, 0.945, 0.945)}
    for seed in range(3):
        write_run(tmp_path, "fedslip", seed, **{k: v[seed] for k, v in fedslip.items()})
        write_run(tmp_path, "fedavg_lora", seed, **{k: v[seed] for k, v in fedavg.items()})
    for seed in range(2):  # no seed 2
        write_run(tmp_path, "dual_naive", seed, personal=0.85, glob=0.70, kstep=0.90)
    results, report = report_of(tmp_path)

    def by_hand(differences):  # mean ± t * sd / sqrt(n), sd with n - 1
        n, mean = len(differences), sum(differences) / len(differences)
        sd = (sum((d - mean) ** 2 for d in differences) / (n - 1)) ** 0.5
        return mean, mean - T_975[n - 1] * sd / n ** 0.5, mean + T_975[n - 1] * sd / n ** 0.5

    cases = {"personalized_accuracy": ([2, 3, 1], "no measurable difference"),  # [-0.48, +4.48]: covers 0
             "global_accuracy": ([2, 2.5, 1.5], "ahead"),  # [+0.76, +3.24]
             "kstep_accuracy": ([-2, -2.5, -1.5], "behind")}
    for metric, (differences, reading) in cases.items():
        entry = paired_entry(results, "fedslip", "fedavg_lora", metric)
        mean, low, high = by_hand(differences)
        assert entry["seeds"] == [0, 1, 2] and entry["differences"] == pytest.approx(differences)
        assert entry["mean"] == pytest.approx(mean) and entry["interval"] == pytest.approx([low, high])
        assert entry["reading"] == reading, metric
        label = {"personalized_accuracy": "zero-shot personalized", "global_accuracy": "global",
                 "kstep_accuracy": "after K-step"}[metric]
        row = f"| fedslip | fedavg_lora, baseline and best other | {label} | " + ", ".join(
            f"{s}: {d:+.2f}" for s, d in enumerate(differences)) + f" | {mean:+.2f} | [{low:+.2f}, {high:+.2f}] | " \
            f"{reading} |"
        assert row in report
    # FedSLIP zero-shot against fedavg_lora + K-step: -3, -2.5, -3.5 points
    _, low, high = by_hand([-3, -2.5, -3.5])
    assert (f"FedSLIP's zero-shot personalized accuracy is -3.00 points from fedavg_lora + K-step (95% interval "
            f"[{low:+.2f}, {high:+.2f}] over 3 seeds: behind): the target (>= +0.5) is not met.") in report
    # each method also against the best other one; a seed one side lacks is left out, and said so
    best = paired_entry(results, "dual_naive", "fedslip", "global_accuracy")
    assert best["role"] == "best other" and best["seeds"] == [0, 1]
    assert best["left_out"] == ["seed 2: no dual_naive run"]
    assert paired_entry(results, "fedavg_lora", "fedslip", "global_accuracy")["role"] == "best other"
    assert "Not paired: seed 2: no dual_naive run." in report


def test_with_one_seed_the_interval_is_undefined_and_no_difference_is_claimed(tmp_path):
    write_run(tmp_path, "fedslip", 0, personal=0.95, glob=0.90)
    write_run(tmp_path, "fedavg_lora", 0, personal=0.80, glob=0.70)
    results, report = report_of(tmp_path)
    entry = paired_entry(results, "fedslip", "fedavg_lora", "global_accuracy")
    assert entry["differences"] == pytest.approx([20.0]) and entry["interval"] is None
    assert entry["reading"] == "no measurable difference"
    assert ("| fedslip | fedavg_lora, baseline and best other | global | 0: +20.00 | +20.00 | undefined (1 seed) | "
            "no measurable difference |") in report


def test_the_verdict_states_the_gap_at_the_precision_that_decides_the_target(tmp_path):
    """0.47 points is below the +0.5 target: the verdict must not print it as "+0.5 ... not met"."""
    write_run(tmp_path, "fedslip", 0, personal=0.9297, glob=0.877)
    write_run(tmp_path, "fedavg_lora", 0, personal=0.90, glob=0.8745, kstep=0.925)
    _, report = report_of(tmp_path)
    personalized, global_ = [line for line in report.splitlines() if line.startswith("- FedSLIP's")][:2]
    assert "+0.47 points" in personalized and "not met" in personalized
    assert "+0.25 points" in global_ and "is met" in global_


def test_a_run_that_lost_clients_is_marked_everywhere_and_left_out_of_the_verdict(tmp_path):
    """A failed client leaves None in the per-client accuracies and floors: the report must still be written,
    with the run marked in every table and plot and kept out of the comparisons unless asked."""
    import matplotlib.pyplot as plt

    from fedslip.report import FIGURES, find_runs

    for seed in range(3):
        write_run(tmp_path, "fedavg_lora", seed, personal=0.85, glob=0.80)
        write_run(tmp_path, "fedslip", seed, personal=0.90 + seed / 100, glob=0.81, failures=[1] if seed == 1 else ())
    results, report = report_of(tmp_path)
    # the results, per-client and per-class tables, the verdict's (as method and as reference) and the legends
    assert report.count("| fedslip (incomplete) |") == 5 and "| fedslip (incomplete), best other |" in report
    assert table_row(report, "fedavg_lora")  # a method whose runs are complete is not marked
    assert table_row(report, "majority floor").endswith("| 80.0 | 80.0 | 80.0 |")  # seed 1's missing floor skipped
    assert "| `fedslip-seed1` | fedslip | 1 | no: 1 client failure, final accuracies without every client |" in report
    assert "| `fedslip-seed0` | fedslip | 0 | yes |" in report
    assert "the verdict leaves it out (`--allow-incomplete` counts it)" in report
    entry = paired_entry(results, "fedslip", "fedavg_lora", "personalized_accuracy")
    assert entry["seeds"] == [0, 2] and entry["left_out"] == [
        "seed 1: `fedslip-seed1` lost clients (1 client failure, final accuracies without every client)"]
    assert "Not paired: seed 1: `fedslip-seed1` lost clients" in report
    runs = find_runs([tmp_path])
    for name, make in FIGURES.items():
        fig = make(runs)
        labels = [*bar_containers(fig), *(line.get_label() for ax in fig.axes for line in ax.get_lines())]
        assert any(label.startswith("fedslip") and "(incomplete)" in label for label in labels), (name, labels)
        assert not any(label.startswith("fedavg_lora") and "(incomplete)" in label for label in labels), name
        plt.close(fig)
    allowed, report = report_of(tmp_path, tmp_path / "allowed", allow_incomplete=True)
    assert paired_entry(allowed, "fedslip", "fedavg_lora", "personalized_accuracy")["seeds"] == [0, 1, 2]
    assert "Included at `--allow-incomplete` although they lost clients" in report and "`fedslip-seed1`" in report
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "cli"), "--allow-incomplete"]) == 0
    assert json.loads((tmp_path / "cli" / "results.json").read_text())["verdict"]["allow_incomplete"] is True


def test_compare_passes_allow_incomplete_to_its_report(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path, "fedavg_lora", seed, personal=0.85, glob=0.80)
        write_run(tmp_path, "fedslip", seed, personal=0.90, glob=0.81, failures=[1] if seed else ())
    flags = ["compare", "--methods", "fedavg_lora,fedslip", "--seeds", "0,1", "--out", str(tmp_path), "--quiet",
             *(f"--{k.replace('_', '-')}={v}" for k, v in CONSTRUCTED.items())]
    assert main(flags) == 0  # every run is finished: compare only reports
    assert json.loads((tmp_path / "results.json").read_text())["verdict"]["allow_incomplete"] is False
    assert main([*flags, "--allow-incomplete"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["verdict"]["allow_incomplete"] is True
    assert paired_entry(results, "fedslip", "fedavg_lora", "global_accuracy")["seeds"] == [0, 1]


def test_a_report_that_fails_while_being_built_writes_nothing(tmp_path, monkeypatch):
    from fedslip import report as report_module

    write_run(tmp_path / "runs", "fedslip", 0, personal=0.9, glob=0.8)

    def broken(runs):
        raise RuntimeError("a table could not be built")

    monkeypatch.setattr(report_module, "health_section", broken)
    with pytest.raises(RuntimeError, match="could not be built"):
        report_of(tmp_path / "runs", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_results_table_gives_the_training_compute_against_fedavg_lora(tmp_path):
    write_run(tmp_path, "fedslip", 0, personal=0.9, glob=0.8, kstep=0.92, train_sample_passes=2000,
              kstep_sample_passes=100, training_passes_vs_fedavg_lora=2.0, kstep_passes_vs_fedavg_lora=2.1)
    write_run(tmp_path, "fedavg_lora", 0, personal=0.9, glob=0.8, training_passes_vs_fedavg_lora=1.0)
    write_run(tmp_path, "dual_naive", 0, personal=0.9, glob=0.8)  # written before the runs counted passes
    results, report = report_of(tmp_path)
    assert "| training passes vs fedavg_lora |" in report.splitlines()[6]
    assert table_row(report, "fedslip").endswith("| 2.00x; + K-step: 2.10x |")
    assert table_row(report, "fedavg_lora").endswith("| 1.00x |")
    assert table_row(report, "dual_naive").endswith("| – |")
    assert results["by_method"]["fedslip"]["train_sample_passes"]["mean"] == 2000


def test_settings_that_differ_between_methods_are_shown_per_method_only(tmp_path):
    tuned = {"lr": 0.0123, "kstep_lr": 0.0}  # K-step at its own lr
    write_run(tmp_path / "differ", "fedslip", 0, personal=0.9, glob=0.8, config=tuned)
    write_run(tmp_path / "differ", "fedavg_lora", 0, personal=0.9, glob=0.8, config={"kstep_lr": 0.002})
    _, report = report_of(tmp_path / "differ")
    settings = next(line for line in report.splitlines() if line.startswith("Settings:"))
    assert ", lr per method," in settings and ", K-step per method," in settings
    assert "lr 0.008" not in settings.split("Per method")[0] and "at lr" not in settings
    assert settings.endswith("Per method (each its own config): kstep_lr fedavg_lora 0.002, fedslip 0.0123; lr "
                             "fedavg_lora 0.008, fedslip 0.0123.")
    write_run(tmp_path / "same", "fedslip", 0, personal=0.9, glob=0.8)
    write_run(tmp_path / "same", "fedavg_lora", 0, personal=0.9, glob=0.8)
    _, report = report_of(tmp_path / "same")
    settings = next(line for line in report.splitlines() if line.startswith("Settings:"))
    assert ", lr 0.008," in settings and ", K-step 5 steps at lr 0.001," in settings and "Per method" not in settings
    # kstep_lr 0 means lr: written differently, the same K-step learning rate
    write_run(tmp_path / "written", "fedslip", 0, personal=0.9, glob=0.8, config={"kstep_lr": 0.0})
    write_run(tmp_path / "written", "fedavg_lora", 0, personal=0.9, glob=0.8, config={"kstep_lr": 0.008})
    _, report = report_of(tmp_path / "written")
    settings = next(line for line in report.splitlines() if line.startswith("Settings:"))
    assert ", K-step 5 steps at lr 0.008," in settings and "Per method" not in settings


# --- many clients: distributions over clients instead of a column per client --------------------------------
def test_a_report_on_many_clients_gives_the_distribution_over_clients_and_a_cdf_plot(tmp_path):
    """Above 12 clients the per-client table and bar plot are unreadable: the report gives, per method and row
    kind, the mean, median, worst client, worst 10% and share below the floor over the clients (each client's
    accuracy the mean over seeds first), and a CDF plot; failed (None) and unsampled (NaN) evaluations count
    for no client."""
    import math
    import random
    import statistics

    import matplotlib.pyplot as plt

    from fedslip.report import find_runs, per_client_cdf_figure

    n = 100
    draw = random.Random(0)
    floors = [round(draw.uniform(0.3, 0.55), 3) for _ in range(n)]
    zero_shot = {s: [round(draw.uniform(0.6, 1.0), 3) for _ in range(n)] for s in (0, 1)}
    kstep = {s: [round(draw.uniform(0.7, 1.0), 3) for _ in range(n)] for s in (0, 1)}
    for c in range(5):  # five clients below their floor in both seeds
        zero_shot[0][c], zero_shot[1][c] = floors[c] - 0.2, floors[c] - 0.1
    zero_shot[0][7] = kstep[0][7] = None  # client 7 failed its evaluation in seed 0: seed 1's value alone counts
    zero_shot[0][9], zero_shot[1][9] = float("nan"), None  # client 9: no seed scored it (sampled, then failed)
    for seed in (0, 1):
        write_run(tmp_path, "fedslip", seed, personal=0.9, glob=0.8, kstep=0.92, config={"num_clients": n},
                  personalized_accuracy_per_client=zero_shot[seed], kstep_accuracy_per_client=kstep[seed],
                  majority_floor_per_client=[None if (seed, c) == (0, 7) else f for c, f in enumerate(floors)])
    write_run(tmp_path, "fedavg_lora", 0, personal=0.85, glob=0.8, config={"num_clients": n},  # no K-step
              personalized_accuracy_per_client=kstep[1], majority_floor_per_client=floors)
    results, report = report_of(tmp_path)
    per_client = report.split("## Per client")[1].split("## Per class")[0]

    def by_hand(per_seed):  # client -> mean over the seeds that scored it; then the distribution over clients
        means = {c: statistics.mean(v) for c in range(n)
                 if (v := [s[c] for s in per_seed if s[c] is not None and not math.isnan(s[c])])}
        ranked = sorted(means.values())
        worst = min(means, key=means.get)
        return {"clients": len(means), "mean": statistics.mean(ranked), "median": statistics.median(ranked),
                "worst_client": means[worst], "worst_client_name": f"client {worst}",
                "worst_10_percent": statistics.mean(ranked[:math.ceil(len(ranked) / 10)]),
                "below_floor": sum(means[c] < floors[c] for c in means), "below_floor_of": len(means)}

    expected = {("fedslip", "zero_shot"): by_hand([zero_shot[0], zero_shot[1]]),
                ("fedslip", "kstep"): by_hand([kstep[0], kstep[1]]),
                ("fedavg_lora", "zero_shot"): by_hand([kstep[1]])}
    assert expected["fedslip", "zero_shot"]["clients"] == 99 and expected["fedslip", "zero_shot"]["below_floor"] == 5
    for (method, kind), want in expected.items():
        got = results["per_client_distribution"][method][kind]
        assert got == pytest.approx({**want, "share_below_floor": want["below_floor"] / want["below_floor_of"]})
        label = method if kind == "zero_shot" else f"{method} + K-step"
        assert table_row(per_client, label) == (
            f"| {label} | {want['clients']} | {100 * want['mean']:.1f} | {100 * want['median']:.1f} | "
            f"{100 * want['worst_client']:.1f} ({want['worst_client_name']}) | {100 * want['worst_10_percent']:.1f} | "
            f"{100 * want['below_floor'] / want['below_floor_of']:.0f}% ({want['below_floor']} of "
            f"{want['below_floor_of']}) |")
    assert set(results["per_client_distribution"]["fedavg_lora"]) == {"zero_shot"}
    assert "| fedavg_lora + K-step |" not in report
    assert "| method | clients | mean | median | worst client | worst 10% | below their floor |" in report
    assert table_row(per_client, "majority floor").startswith(f"| majority floor | {n} | "
                                                              f"{100 * statistics.mean(floors):.1f} |")
    assert "| client 0 |" not in report  # no column per client
    out = tmp_path / "report"
    assert (out / "per_client_cdf.png").stat().st_size > 0 and not (out / "per_client_accuracy.png").exists()
    assert "![per_client_cdf.png](per_client_cdf.png)" in report
    # the CDF: each client's mean over seeds, sorted, against the fraction of clients at or below it
    fig = per_client_cdf_figure(find_runs([tmp_path]))
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(lines) == {"fedslip zero-shot", "fedslip + K-step", "fedavg_lora zero-shot", "majority-class floor"}
    means = sorted(100 * statistics.mean([s[c] for s in (zero_shot[0], zero_shot[1]) if s[c] is not None])
                   for c in range(n) if c != 9)
    assert lines["fedslip zero-shot"].get_xdata()[1:] == pytest.approx(means)
    assert lines["fedslip zero-shot"].get_ydata() == pytest.approx([k / 99 for k in range(100)])
    assert lines["fedslip zero-shot"].get_linestyle() == "-" and lines["fedslip + K-step"].get_linestyle() == "--"
    assert lines["majority-class floor"].get_xdata()[1:] == pytest.approx(sorted(100 * f for f in floors))
    plt.close(fig)


def test_a_report_on_few_clients_keeps_a_column_per_client_and_the_bar_plot(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path, "fedslip", seed, personal=0.9, glob=0.8)
    results, report = report_of(tmp_path)
    per_client = report.split("## Per client")[1].split("## Per class")[0]
    assert "| method | client 0 | client 1 | client 2 |" in per_client
    assert table_row(per_client, "fedslip") == "| fedslip | 90.0 | 90.0 | 90.0 |"
    assert "| method | clients | mean |" not in report
    assert (tmp_path / "report" / "per_client_accuracy.png").is_file()
    assert not (tmp_path / "report" / "per_client_cdf.png").exists()
    assert results["per_client_distribution"]["fedslip"]["zero_shot"]["median"] == pytest.approx(0.9)
