"""``fedslip tune``: Optuna on validation rows, pruning, resumable studies, a best.toml that runs as is."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import optuna
import pandas as pd
import pytest
import tomllib

from fedslip import ConfigError, load_config
from fedslip import tune as tune_mod
from fedslip.cli import main
from fedslip.config import METHODS
from fedslip.data import Encoded, encode, load_splits
from fedslip.experiment import prepare

TINY = dict(method="fedavg_lora", backbone="tiny", rounds=3, samples_per_client=32, test_samples_per_client=16,
            global_test_samples=64, batch_size=16, kstep=0, precision="fp32")


@pytest.fixture
def tiny_overrides(data_dir):
    return {**TINY, "data_dir": str(data_dir)}


def _study(out):
    return optuna.load_study(study_name="fedslip-tune", storage=f"sqlite:///{out / 'study.db'}")


def test_tune_searches_on_validation_rows_prunes_and_writes_a_runnable_best_toml(tiny_overrides, tmp_path):
    out = tmp_path / "study"
    # trial 0: the config's own lr (the tiny backbone's random features are learnable by one trainer on every
    # client's rows, `centralized`, at lr 0.03; FedAvg on skewed clients learns nothing in 3 rounds); trial 1:
    # an lr that learns nothing (25.0%, a constant prediction), pruned against trial 0 in round 2: warmup
    # round 1 is never pruned (trial 0 may still sit at 25% there), and in round 2 trial 0 is far above chance
    # (measured on the validation rows: 25.0%, 70.3%, 92.2% in rounds 1-3)
    overrides = {**tiny_overrides, "method": "centralized", "lr": 0.03, "samples_per_client": 64,
                 "test_samples_per_client": 32}
    result = tune_mod.tune(out, trials=3, overrides=overrides, maximize="global", pruner_startup_trials=1,
                           pruner_warmup_rounds=1, enqueue=[{"lr": 1e-9}])
    trials = _study(out).trials
    assert [t.state.name for t in trials[:2]] == ["COMPLETE", "PRUNED"] and trials[2].state.name in ("COMPLETE",
                                                                                                    "PRUNED")
    assert trials[0].params == {"lr": 0.03} and trials[1].params == {"lr": 1e-9}
    assert 1e-4 <= trials[2].params["lr"] <= 3e-2  # trial 2: sampled from the method's space
    assert sorted(trials[1].intermediate_values) == [1, 2]  # its warmup round, then the round it was pruned in
    assert trials[1].intermediate_values[2] + 0.2 < trials[0].intermediate_values[2]
    for t in trials:  # every trial an ordinary run directory, evaluated on validation rows
        cfg = load_config(out / t.user_attrs["run_dir"] / "config.toml")
        assert cfg.eval_split == "val" and cfg.val_samples_per_client == 32 and cfg.lr == t.params["lr"]
    assert_evaluated_on_validation_rows(cfg)
    assert not (out / "trials/0001/summary.json").exists()  # pruned: a run stopped after a checkpoint
    summary = json.loads((out / trials[result["best_trial"]].user_attrs["run_dir"] / "summary.json").read_text())
    assert result["best_value"] == pytest.approx(summary["global_accuracy"])
    assert result["best_value"] == max(t.value for t in trials if t.value is not None)
    best = load_config(out / "best.toml")  # runs as is, on the test split
    assert best.eval_split == "test" and best.lr == result["best_params"]["lr"] and best.method == "centralized"
    assert len(pd.read_csv(out / "study.csv")) == 3
    report = (out / "report.md").read_text()
    assert "| 1 | pruned | 1e-09 |" in report
    assert "global_at_chance" in report.split("| 1 | pruned | 1e-09 |")[1].split("\n")[0]  # its health
    assert {"optimization_history.png", "param_importances.png", "report.md"} <= {p.name for p in out.iterdir()}
    # the same call again: the study is complete, nothing runs, the outputs are rewritten identically
    again = tune_mod.tune(out, trials=3, overrides=overrides, maximize="global", pruner_startup_trials=1,
                          pruner_warmup_rounds=1)
    assert again == result and len(_study(out).trials) == 3


def assert_evaluated_on_validation_rows(cfg):
    """What a run of ``cfg`` (a trial's config) evaluates each client on, through ``experiment.prepare``: its
    partition's validation rows, carved from the train split (disjoint from every client's training rows) and
    not its test rows; the global evaluation set is their union."""
    setup = prepare(cfg)
    train_split, test_split = load_splits(cfg)
    partition = setup.partition
    training_rows = {r for rows in partition.clients for r in rows.train}
    for rows, data in zip(partition.clients, setup.clients, strict=True):
        assert len(rows.val) == cfg.val_samples_per_client and not training_rows & set(rows.val)
        validation = encode(setup.tokenizer, train_split, rows.val, cfg.max_seq_len)
        assert data.test.digest() == validation.digest()
        assert data.test.digest() != encode(setup.tokenizer, test_split, rows.test, cfg.max_seq_len).digest()
    assert setup.global_eval.digest() == Encoded.union([c.test for c in setup.clients]).digest()


KILLER = """
import os, sys
from fedslip import api, tune
real_run = api.run
def run(cfg, out, **kw):  # the process dies (no cleanup at all) in trial 1, after round 2's checkpoint
    def die(row):
        if str(out).endswith("0001") and row["round"] == 2:
            os._exit(9)
    return real_run(cfg, out, **{**kw, "callbacks": [*kw["callbacks"], die]})
api.run = run
tune.tune(sys.argv[1], trials=2, overrides={overrides}, search=["lr"], pruner_startup_trials=5)
"""


@pytest.mark.process
def test_an_interrupted_study_continues_and_resumes_the_interrupted_run(tiny_overrides, tmp_path):
    out = tmp_path / "study"
    script = textwrap.dedent(KILLER).replace("{overrides}", repr(tiny_overrides))
    proc = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert [t.state.name for t in _study(out).trials] == ["COMPLETE", "RUNNING"]
    killed = [json.loads(line) for line in (out / "trials/0001/metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in killed] == [1, 2]
    result = tune_mod.tune(out, trials=3, overrides=tiny_overrides, search=["lr"], pruner_startup_trials=5)
    trials = _study(out).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    # the continued study draws a new point, not the one its first process drew before the crash
    assert trials[3].params != trials[1].params
    assert trials[2].params == trials[1].params and trials[2].user_attrs["run_dir"] == "trials/0001"
    assert sorted(trials[2].intermediate_values) == [1, 2, 3]  # the finished rounds reported again
    rows = [json.loads(line) for line in (out / "trials/0001/metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3] and rows[:2] == killed  # continued, not restarted
    assert result["states"] == {"complete": 3, "pruned": 0, "fail": 1}


def test_bad_tune_settings_are_refused_before_anything_is_written(tiny_overrides, tmp_path):
    out = tmp_path / "study"
    cases = [
        (dict(overrides={**tiny_overrides, "eval_split": "test"}), "validation rows only"),
        (dict(overrides=tiny_overrides, maximize="accuracy"), "accuracy not among"),
        (dict(overrides=tiny_overrides, maximize="global=-1"), "weights must be > 0"),
        (dict(overrides=tiny_overrides, maximize="kstep"), "needs kstep > 0"),
        (dict(overrides=tiny_overrides, search=["dominant_fraction"]), "no default range for dominant_fraction"),
        (dict(overrides=tiny_overrides, space={"lr": [0.1, 0.01]}), "need low < high"),
        (dict(overrides=tiny_overrides, space={"lr": [0.0, 0.01]}), "low > 0 for log"),
        (dict(overrides=tiny_overrides, space={"nonsense": [1, 2]}), "'nonsense' is not a config key"),
        (dict(overrides=tiny_overrides, space={"head": [1, 2]}), "head is a str key"),
        (dict(overrides=tiny_overrides, space={"lora_rank": {"choices": [4, -1]}}), "lora_rank"),
        (dict(overrides=tiny_overrides, space={"seed": [0, 5]}), "seed cannot be searched"),
        (dict(overrides=tiny_overrides, trials=0), "trials must be an integer >= 1, got 0"),
        (dict(overrides=tiny_overrides, search=["nosuch"]), "'nosuch' is not a config key; searchable keys: lr,"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            tune_mod.tune(out, **kwargs)
    assert not out.exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="holds no study"):
        tune_mod.tune(tmp_path / "busy", trials=1, overrides=tiny_overrides)
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep"


def test_a_study_directory_refuses_other_settings(tiny_overrides, tmp_path):
    out = tmp_path / "study"
    tune_mod.tune(out, trials=1, overrides={**tiny_overrides, "rounds": 1})
    with pytest.raises(ConfigError, match="other settings"):
        tune_mod.tune(out, trials=1, overrides={**tiny_overrides, "rounds": 1, "lr": 0.01})
    assert len(_study(out).trials) == 1


def test_cli_tune_reads_the_tune_table_of_the_config(data_dir, tmp_path, capsys):
    config = tmp_path / "study.toml"
    config.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in {**TINY, "data_dir": str(data_dir),
                                                                       "rounds": 1}.items())
                      + '\n[tune]\nmaximize = "personalized=1,global=1"\ntrials = 2\n'
                      + "[tune.space]\nlora_rank = {choices = [2, 4]}\n")
    assert load_config(config).lora_rank == 8  # `fedslip run --config` ignores the [tune] table
    out = tmp_path / "study"
    assert main(["tune", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    trials = _study(out).trials
    assert len(trials) == 2 and set(trials[0].params) == {"lr", "lora_rank"}
    for t in trials:  # the objective: the mean of the two accuracies, as asked
        s = json.loads((out / t.user_attrs["run_dir"] / "summary.json").read_text())
        assert t.value == pytest.approx((s["personalized_accuracy"] + s["global_accuracy"]) / 2)
    assert "report.md" in capsys.readouterr().out
    assert main(["tune", "--config", str(config), "--out", str(out), "--quiet", "--maximize", "global"]) == 2


def test_no_trial_is_pruned_in_its_warmup_rounds(tiny_overrides):
    """pruner_warmup_rounds = 1: a trial far below the others in round 1 goes on; in round 2 it stops."""
    study = tune_mod.make_study(overrides=tiny_overrides, pruner_startup_trials=1, pruner_warmup_rounds=1)
    optuna_study = optuna.create_study(direction="maximize", pruner=tune_mod.make_pruner(study))
    good = optuna_study.ask()
    for round_idx in (1, 2, 3):
        good.report(0.9, round_idx)
    optuna_study.tell(good, 0.9)
    bad = optuna_study.ask()
    bad.report(0.1, 1)
    assert not bad.should_prune()
    bad.report(0.1, 2)
    assert bad.should_prune()


def test_every_preset_has_a_default_space_of_its_rates_and_its_own_knob(tiny_overrides):
    spaces = {m: [p.name for p in tune_mod.make_study(overrides={**tiny_overrides, "kstep": 5}, method=m).space]
              for m in METHODS}
    assert spaces == {"fedavg_lora": ["kstep_lr", "lr"], "dual_naive": ["lr", "private_lr"],
                      "fedslip": ["lr", "private_lr"], "centralized": ["lr"], "fedper": ["lr"],
                      "fedrep": ["local_first_steps", "lr"], "fedbabu": ["kstep_lr", "lr"], "fedsa_lora": ["lr"],
                      "ditto": ["ditto_lambda", "lr", "private_lr"],
                      "feddpa_fixed": ["lr", "private_lr", "private_weight"],
                      "feddpa": ["lr", "private_lr", "private_weight"], "local": ["lr"]}
    rep = tune_mod.make_study(overrides=tiny_overrides, method="fedrep").space[0]
    assert (rep.name, rep.low, rep.high, rep.log) == ("local_first_steps", 4, 64, True)


def test_timeout_stops_starting_trials_writes_outputs_and_the_study_continues(tiny_overrides, tmp_path, capsys):
    """--timeout is a time budget per call: no new trial after it (the running one finishes), outputs from the
    finished trials, and the same command later continues toward --trials."""
    config = tmp_path / "study.toml"
    config.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in {**tiny_overrides, "rounds": 1}.items()))
    out = tmp_path / "study"
    args = ["tune", "--config", str(config), "--out", str(out), "--quiet", "--trials", "3"]
    assert main([*args, "--timeout", "0.001"]) == 0
    assert [t.state.name for t in _study(out).trials] == ["COMPLETE"]
    assert len(pd.read_csv(out / "study.csv")) == 1
    assert load_config(out / "best.toml").lr == _study(out).trials[0].params["lr"]
    assert main(args) == 0
    assert [t.state.name for t in _study(out).trials] == ["COMPLETE"] * 3


def test_seeds_average_each_trial_over_validation_seeds(tiny_overrides, tmp_path):
    """--seeds 0,1: every trial runs once per seed (the first seed's run is the trial's run directory) and
    its value is the mean of the seeds' objectives, computed here from their summaries."""
    config = tmp_path / "study.toml"
    config.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in {
        **tiny_overrides, "rounds": 1, "method": "fedper", "partition": "dirichlet", "dirichlet_alpha": 0.5}.items()))
    out = tmp_path / "study"
    assert main(["tune", "--config", str(config), "--out", str(out), "--quiet", "--trials", "2", "--seeds", "3,4",
                 "--maximize", "personalized"]) == 0
    trials = _study(out).trials
    assert len(trials) == 2
    for t in trials:
        runs = [out / t.user_attrs["run_dir"], out / f"{t.user_attrs['run_dir']}-seed4"]
        assert [load_config(r / "config.toml").seed for r in runs] == [3, 4]
        values = [json.loads((r / "summary.json").read_text())["personalized_accuracy"] for r in runs]
        assert values[0] != values[1]  # two seeds, two results: the mean is not either one
        assert t.value == pytest.approx(sum(values) / 2)
        assert t.user_attrs["personalized_accuracy"] == pytest.approx(sum(values) / 2)
    assert "validation seeds [3, 4]" in (out / "report.md").read_text()
    with pytest.raises(ConfigError, match="other settings"):  # the seeds are part of the study
        tune_mod.tune(out, trials=2, toml_path=config, maximize="personalized", seeds=[3, 5])
    with pytest.raises(ConfigError, match="two or more different validation seeds"):
        tune_mod.tune(tmp_path / "other", trials=1, toml_path=config, seeds=[3])


def _stand_in_runs(monkeypatch, outcome):
    """``api.run`` replaced by a run without training: ``outcome(lr)`` gives the accuracy it reports every round and
    as its final accuracies, and other summary values (what the study does with the values is under test)."""
    from fedslip import api

    def run(cfg, out, callbacks=(), **kwargs):
        value, summary = outcome(cfg.lr)
        for round_idx in range(1, cfg.rounds + 1):
            for callback in callbacks:
                callback({"round": round_idx, "global_accuracy": value, "personalized_accuracy": value,
                          "personalized_accuracy_per_client": [value] * cfg.num_clients})
        out.mkdir(parents=True, exist_ok=True)
        return {"personalized_accuracy": value, "global_accuracy": value, "wall_seconds": 1.0, **summary}

    monkeypatch.setattr(api, "run", run)


def test_a_kstep_objective_prunes_nothing_on_the_zero_shot_signal(tiny_overrides, tmp_path, monkeypatch):
    """FedBABU's head stays at its initialization during federation, so its per-round (zero-shot) personalized
    accuracy is a random head's, whatever the body learned; K-step, which the objective measures, fine-tunes
    the head. Pruning on the zero-shot value stopped such trials (8 of 12 at ~25%). Here trials 1 and 2 are
    poor zero-shot and best after K-step (runs stand-ins feeding the round callbacks): none is pruned."""
    def outcome(lr):
        zero_shot, after_kstep = (0.9, 0.5) if lr == 0.01 else (0.25, 0.8 if lr == 0.002 else 0.7)
        return zero_shot, {"kstep_accuracy": after_kstep}

    _stand_in_runs(monkeypatch, outcome)
    out = tmp_path / "study"
    result = tune_mod.tune(out, trials=3, overrides={**tiny_overrides, "method": "fedbabu", "kstep": 5, "lr": 0.01},
                           maximize="kstep", search=["lr"], pruner_startup_trials=1, pruner_warmup_rounds=0,
                           enqueue=[{"lr": 0.002}, {"lr": 0.003}])
    trials = _study(out).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert [t.params["lr"] for t in trials] == [0.01, 0.002, 0.003]
    assert result["best_params"] == {"lr": 0.002} and result["best_value"] == 0.8
    assert "no pruning" in (out / "report.md").read_text()


def test_rescore_reruns_the_finalists_on_more_seeds_and_recommends_the_best_mean(tiny_overrides, tmp_path,
                                                                                  monkeypatch):
    """A finished one-seed study, then --rescore 2 --rescore-seeds 5: its two best complete trials run on seed 5
    (run stand-ins with a known value per lr and seed), the third is not rerun, and best.toml follows the best
    mean: lr 0.01 was one lucky draw (0.9 then 0.5), lr 0.002 holds (0.8, 0.8). A second call runs nothing."""
    from fedslip import api

    values = {(0.01, 0): 0.9, (0.01, 5): 0.5, (0.002, 0): 0.8, (0.002, 5): 0.8, (0.003, 0): 0.7}
    ran = []

    def run(cfg, out, callbacks=(), **kwargs):
        ran.append((cfg.lr, cfg.seed, cfg.eval_split))
        out.mkdir(parents=True, exist_ok=True)
        summary = {"personalized_accuracy": values[(cfg.lr, cfg.seed)], "wall_seconds": 1.0}
        (out / "summary.json").write_text(json.dumps(summary))
        (out / "config.toml").write_text("")
        return summary

    monkeypatch.setattr(api, "run", run)
    out = tmp_path / "study"
    keys = dict(trials=3, overrides={**tiny_overrides, "method": "fedper", "lr": 0.01, "seed": 0},
                maximize="personalized", search=["lr"], pruner_startup_trials=5, enqueue=[{"lr": 0.002}, {"lr": 0.003}])
    assert tune_mod.tune(out, **keys)["best_params"] == {"lr": 0.01}
    assert len(ran) == 3
    result = tune_mod.tune(out, **keys, rescore=2, rescore_seeds=[5])
    assert ran[3:] == [(0.01, 5, "val"), (0.002, 5, "val")]  # the finalists only, on validation rows
    assert result["best_params"] == {"lr": 0.002} and result["best_value"] == pytest.approx(0.8)
    assert result["rescored"] == {"top": 2, "seeds": [0, 5], "changed": True}
    rescored = json.loads((out / "rescore.json").read_text())
    assert [(f["trial"], f["values"], f["mean"]) for f in rescored["finalists"]] == [
        (0, {"0": 0.9, "5": 0.5}, pytest.approx(0.7)), (1, {"0": 0.8, "5": 0.8}, pytest.approx(0.8))]
    assert tomllib.loads((out / "best.toml").read_text())["lr"] == 0.002
    assert "| 1 | 80.0 | 80.0 | 80.0 |" in (out / "report.md").read_text()
    assert tune_mod.tune(out, **keys, rescore=2, rescore_seeds=[5])["best_params"] == {"lr": 0.002}
    assert len(ran) == 5  # finished rescore runs are kept
    with pytest.raises(ConfigError, match="rescore"):
        tune_mod.tune(out, **keys, rescore=2)


def test_each_finished_trial_is_one_log_line_and_optunas_warnings_are_log_lines(tiny_overrides, tmp_path, caplog,
                                                                                 recwarn, monkeypatch):
    """The log says per trial its number, state, parameters and objective (INFO: --quiet hides it). Optuna's
    warnings (here the parameter importances' on two complete trials of equal value) are INFO lines of the log
    too, not Python warnings that --quiet would still print."""
    import logging

    def outcome(lr):
        if lr > 0.05:
            raise ValueError("the stand-in run failed")
        return 0.5 if lr >= 0.005 else 0.25, {}

    _stand_in_runs(monkeypatch, outcome)
    with caplog.at_level(logging.INFO, logger="fedslip"):
        tune_mod.tune(tmp_path / "study", trials=3, overrides={**tiny_overrides, "lr": 0.01}, search=["lr"],
                      pruner_startup_trials=1, pruner_warmup_rounds=0, enqueue=[{"lr": 0.001}, {"lr": 0.02}])
        with pytest.raises(ValueError, match="the stand-in run failed"):
            tune_mod.tune(tmp_path / "failing", trials=1, overrides={**tiny_overrides, "lr": 0.08},
                          space={"lr": [0.06, 0.09]})
    assert not [w for w in recwarn if "optuna" in w.filename or "quantiles" in str(w.message)]
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("Target and region quantiles select the same set of trials" in m for m in messages)
    assert [m for m in messages if m.startswith("tune: trial")] == [
        "tune: trial 0 complete: lr=0.01; objective 0.5000",
        "tune: trial 1 pruned: lr=0.001; objective 0.2500 at round 1",
        "tune: trial 2 complete: lr=0.02; objective 0.5000",
        "tune: trial 0 failed: lr=0.08; the stand-in run failed"]


def test_ctrl_c_in_a_trial_is_one_line_and_no_optuna_traceback(tiny_overrides, tmp_path, capsys, monkeypatch):
    """Ctrl-C inside a trial: exit code 130 and one line on stderr, as for fedslip run. Optuna recorded the
    interrupted trial as a warning carrying the KeyboardInterrupt's traceback (some 160 lines before ours); no
    record of Optuna's reaches a handler now, and the trial is kept for the next call to continue."""
    import logging

    def interrupted(lr):
        raise KeyboardInterrupt

    _stand_in_runs(monkeypatch, interrupted)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("optuna").addHandler(handler)
    config = tmp_path / "study.toml"
    config.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in {**tiny_overrides, "rounds": 1}.items()))
    try:
        rc = main(["tune", "--config", str(config), "--out", str(tmp_path / "study"), "--quiet", "--trials", "2"])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped fedslip.cli.main")
    finally:
        logging.getLogger("optuna").removeHandler(handler)
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []
    assert rc == 130 and capsys.readouterr().err == "fedslip: interrupted; the same command continues the study\n"
    trial, = _study(tmp_path / "study").trials
    assert trial.state.name == "FAIL" and trial.user_attrs["interrupted"]
