"""partition = "own": each client brings its own data file and splits it itself; the server reads only its
own test split (the global test set). What each process opens is recorded with a Python audit hook."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import fedslip
from fedslip.cli import main
from fedslip.config import ConfigError
from fedslip.data import DataError, read_own_file
from fedslip.experiment import prepare
from fedslip.flower_app import client_rows
from fedslip.partition import own_rows

_OPENED: list[str] | None = None


def _record_open(event: str, args: tuple) -> None:
    if event == "open" and _OPENED is not None and isinstance(args[0], (str, bytes)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_record_open)  # hooks cannot be removed: it records only inside `opened()`


@contextmanager
def opened():
    """The data files (``*.csv*``) this process opens inside the block."""
    global _OPENED
    _OPENED = []
    found: list[str] = []
    try:
        yield found
    finally:
        found += sorted({str(Path(p).resolve()) for p in _OPENED if ".csv" in Path(p).name})
        _OPENED = None


def write_org_files(root: Path, data_dir: Path, num: int = 2, own: int = 60, other: int = 20) -> list[Path]:
    """One file per organisation, skewed to class i (``own`` rows of it, ``other`` of the rest)."""
    train = pd.read_csv(data_dir / "train.csv", keep_default_na=False)
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(num):
        rows = pd.concat([train[train.label == i][i * own:(i + 1) * own],
                          train[train.label != i][i * other:(i + 1) * other]])
        files.append(root / f"org{i}.csv")
        rows.to_csv(files[-1], index=False)
    return files


@pytest.fixture
def operator_dir(tmp_path, data_dir) -> Path:
    """The server's data: a test split only (its global test set), no training rows of anybody."""
    folder = tmp_path / "operator"
    folder.mkdir()
    (folder / "test.csv").write_bytes((data_dir / "test.csv").read_bytes())
    return folder


def own_cfg(operator_dir, files, **overrides):
    base = dict(method="fedslip", backbone="tiny", data_dir=str(operator_dir), partition="own",
                client_data=[str(f) for f in files], num_clients=len(files), rounds=2, samples_per_client=32,
                test_samples_per_client=16, global_test_samples=64, batch_size=16, kstep=0, precision="fp32")
    return fedslip.make_config({**base, **overrides})


def test_own_rows_split_a_clients_file_by_itself(tiny_cfg):
    cfg = tiny_cfg(samples_per_client=30, test_samples_per_client=10, val_samples_per_client=5)
    rows = own_rows(cfg, 1, 80, "org1.csv")
    assert (len(rows.test), len(rows.val), len(rows.train)) == (10, 5, 30)
    parts = [set(rows.test), set(rows.val), set(rows.train)]
    assert set().union(*parts) <= set(range(80)) and sum(map(len, parts)) == len(set().union(*parts))
    assert own_rows(cfg, 1, 80, "org1.csv") == rows  # deterministic
    assert own_rows(cfg, 0, 80, "org0.csv").train != rows.train  # each client its own shuffle
    assert own_rows(tiny_cfg(samples_per_client=30, test_samples_per_client=10, val_samples_per_client=5, seed=1),
                    1, 80, "x").train != rows.train
    # the shuffle is numpy's permutation seeded with (seed, client id): test rows first, then validation
    order = np.random.default_rng([cfg.seed, 1]).permutation(80)
    assert rows.test == sorted(order[:10].tolist()) and rows.val == sorted(order[10:15].tolist())
    assert rows.train == sorted(order[15:45].tolist())
    small = own_rows(cfg, 1, 20, "org1.csv")  # fewer rows than samples_per_client: all of its own rows
    assert len(small.train) == 5
    with pytest.raises(DataError, match=r"org1.csv has 15 rows; client 1 needs more than"):
        own_rows(cfg, 1, 15, "org1.csv")


def test_own_config_refusals(tiny_cfg, tmp_path, operator_dir):
    with pytest.raises(ConfigError, match="client_data names the clients' own files: it needs partition='own'"):
        tiny_cfg(client_data=["a.csv", "b.csv"], num_clients=2)
    with pytest.raises(ConfigError, match="client_data names 1 files for num_clients=2"):
        tiny_cfg(partition="own", client_data=["a.csv"], num_clients=2)
    with pytest.raises(ConfigError, match="needs client_data: one file per client"):
        fedslip.run(tiny_cfg(partition="own", data_dir=str(operator_dir)), tmp_path / "run", progress=False)
    with pytest.raises(DataError, match="client data file .*missing.csv does not exist"):
        fedslip.run(own_cfg(operator_dir, [tmp_path / "missing.csv"], num_clients=1), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_embedded_run_on_own_files(tmp_path, data_dir, operator_dir):
    files = write_org_files(tmp_path / "orgs", data_dir)
    cfg = own_cfg(operator_dir, files)
    with opened() as files_opened:
        summary = fedslip.run(cfg, tmp_path / "run", progress=False)
    assert files_opened == sorted([str(operator_dir / "test.csv"), *map(str, files)])
    assert json.loads((tmp_path / "run" / "partition.json").read_text())["clients"] == []
    saved = fedslip.load_config(tmp_path / "run" / "config.toml")
    assert saved.client_data == [str(f.resolve()) for f in files]
    # each client's floor is that of the test rows it split off its own file
    for cid, path in enumerate(files):
        labels = read_own_file(cfg, path).labels[own_rows(cfg, cid, 80, str(path)).test]
        assert summary["majority_floor_per_client"][cid] == pytest.approx(np.bincount(labels).max() / len(labels))
    # clients hold no global test set here: their own models are not scored on it
    assert summary["personalized_global_test_accuracy"] is None
    assert summary["global_accuracy"] is not None
    assert all(a is not None for a in summary["personalized_accuracy_per_client"])


def test_tune_on_own_data_validates_on_rows_each_client_carves_from_its_own_file(tmp_path, data_dir, operator_dir,
                                                                                  capsys):
    """`fedslip tune` on own data (it was refused: eval_split='val' was taken for a union of the clients' rows):
    each client measures its model on validation rows split off its own file; the global objective needs the
    server's own val.csv, and a validation run never opens the server's test split."""
    files = write_org_files(tmp_path / "orgs", data_dir)
    tune = ["tune", "--method", "fedavg_lora", "--backbone", "tiny", "--partition", "own", "--data-dir",
            str(operator_dir), "--client-data", ",".join(map(str, files)), "--num-clients", "2", "--rounds", "1",
            "--samples-per-client", "32", "--test-samples-per-client", "16", "--global-test-samples", "64",
            "--batch-size", "16", "--kstep", "0", "--precision", "fp32", "--trials", "1", "--quiet"]
    test_split = str((operator_dir / "test.csv").resolve())
    with opened() as files_opened:
        assert main([*tune, "--out", str(tmp_path / "study")]) == 0  # maximize personalized
    assert test_split not in files_opened
    run = tmp_path / "study" / "trials" / "0000"
    cfg = fedslip.load_config(run / "config.toml")
    assert cfg.eval_split == "val" and cfg.val_samples_per_client == 16
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_accuracy"] is None and summary["personalized_accuracy"] is not None
    for cid, path in enumerate(files):  # each client's floor is that of the validation rows of its own file
        labels = read_own_file(cfg, path).labels[own_rows(cfg, cid, 80, str(path)).val]
        assert summary["majority_floor_per_client"][cid] == pytest.approx(np.bincount(labels).max() / len(labels))
    assert main([*tune, "--out", str(tmp_path / "global"), "--maximize", "global"]) == 2
    assert "needs the server's own validation rows, val.csv" in capsys.readouterr().err
    assert not (tmp_path / "global").exists()
    (operator_dir / "val.csv").write_bytes((data_dir / "test.csv").read_bytes())  # the server's validation rows
    with opened() as files_opened:
        assert main([*tune, "--out", str(tmp_path / "global"), "--maximize", "global"]) == 0
    assert str((operator_dir / "val.csv").resolve()) in files_opened and test_split not in files_opened
    trial = tmp_path / "global" / "trials" / "0000"
    assert json.loads((trial / "summary.json").read_text())["global_accuracy"] is not None
    assert len(json.loads((trial / "partition.json").read_text())["global_test"]) == 64  # rows of val.csv


def test_server_and_client_sides_open_only_their_own_files(tmp_path, data_dir, operator_dir):
    files = write_org_files(tmp_path / "orgs", data_dir)
    deployed = own_cfg(operator_dir, [], num_clients=2)  # a deployment's run config names no client file
    with opened() as server_opened:
        server = prepare(deployed, side="server")
    assert server_opened == [str(operator_dir / "test.csv")] and server.clients == []
    assert server.partition.clients == [] and len(server.global_eval) == 64
    with opened() as client_opened:
        setup, data = client_rows(deployed, 1, {"data-path": str(files[1])})
    assert client_opened == [str(files[1])] and setup.global_eval is None
    assert len(data.train) == 32 and len(data.test) == 16
    with pytest.raises(ConfigError, match="the SuperNode of client 0 has no data-path"):
        client_rows(deployed, 0, {})
    shared = fedslip.make_config(dict(backbone="tiny", data_dir=str(data_dir), num_clients=2, samples_per_client=32,
                                      test_samples_per_client=16, global_test_samples=64))
    with pytest.raises(ConfigError, match="this SuperNode has a data-path but the run's partition is 'dominant'"):
        client_rows(shared, 0, {"data-path": str(files[0])})


@pytest.mark.parametrize("engine", ["embedded", pytest.param("flower-sim", marks=pytest.mark.flower)])
def test_clients_of_different_sizes_are_weighted_by_their_training_rows(tmp_path, data_dir, operator_dir, engine,
                                                                       monkeypatch):
    """FedAvg weights each client by its training rows end to end (the client's count, carried by the engine,
    used by the server): client 0's file of 24 rows leaves it 24 - 16 test rows = 8 training rows, client 1's
    80 rows give it samples_per_client = 32. After one round the global track is the start plus
    (8 * change_0 + 32 * change_1) / 40, the changes as the server received them (recorded where the server
    reads each reply; the ServerApp of the Flower simulation runs in this process too)."""
    from fedslip.model import TrackedModel, load_tokenizer
    from fedslip.server import Server
    from fedslip.storage import load_tensors

    received = {}
    read_reply = Server.received_weights

    def recorded(server, cid, payload):
        weights = read_reply(server, cid, payload)
        received.update({f"{cid}/{n}": w - server.reference[n] for n, w in weights.items()})
        return weights

    monkeypatch.setattr(Server, "received_weights", recorded)
    files = write_org_files(tmp_path / "orgs", data_dir)  # 80 rows each
    pd.read_csv(files[0], keep_default_na=False).iloc[:24].to_csv(files[0], index=False)
    cfg = own_cfg(operator_dir, files, method="fedavg_lora", rounds=1, engine=engine)
    out = tmp_path / "run"
    fedslip.run(cfg, out, progress=False)
    start = TrackedModel(cfg, load_tokenizer(cfg.backbone)).global_state()  # the seeded initial global track
    final = load_tensors(out / "global.safetensors")
    weighted = {n: t + (8 * received[f"0/{n}"] + 32 * received[f"1/{n}"]) / 40 for n, t in start.items()}
    equal = {n: t + (received[f"0/{n}"] + received[f"1/{n}"]) / 2 for n, t in start.items()}
    assert final.keys() == weighted.keys()
    for n in final:
        torch.testing.assert_close(final[n], weighted[n], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(final[n], equal[n], rtol=1e-3, atol=1e-4) for n in final)  # the weights matter


OPEN_LOG_HOOK = '''
import json, os, sys
_log = os.path.join(os.environ["FEDSLIP_TEST_OPEN_LOG"], f"{os.getpid()}.jsonl")
def _hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes)) and ".csv" in os.path.basename(os.fsdecode(args[0])):
        with open(_log, "a") as f:
            f.write(json.dumps({"argv": sys.argv, "path": os.path.realpath(os.fsdecode(args[0]))}) + "\\n")
sys.addaudithook(_hook)
'''


@pytest.mark.flower
def test_deployment_where_each_supernode_holds_only_its_own_file(tmp_path, data_dir, operator_dir, monkeypatch):
    """Two SuperNodes, two CSV files, one `flwr run`: the same results as the embedded run on the same rows;
    every Flower process's file opens are recorded (a sitecustomize audit hook): each ClientApp process opens
    one client file at most, the server's processes none (only the operator's test split)."""
    from test_flower import assert_same_run

    from fedslip.launch.deployment import run_local

    files = write_org_files(tmp_path / "orgs", data_dir)
    cfg = own_cfg(operator_dir, files)
    reference = tmp_path / "embedded"
    fedslip.run(cfg, reference, progress=False)
    hook, log_dir = tmp_path / "hook", tmp_path / "opens"
    hook.mkdir()
    log_dir.mkdir()
    (hook / "sitecustomize.py").write_text(OPEN_LOG_HOOK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("FEDSLIP_TEST_OPEN_LOG", str(log_dir))
    run_local(cfg, tmp_path / "deploy", timeout=900)
    out = tmp_path / "deploy" / "run"
    assert_same_run(reference, out)
    # the server's run directory: nothing derived from client rows (no client rows in partition.json, no client files
    # named in its config, no client state), only what came back in messages
    assert json.loads((out / "partition.json").read_text())["clients"] == []
    assert fedslip.load_config(out / "config.toml").client_data == []
    assert not (out / "clients").exists()
    records = [json.loads(line) for f in log_dir.glob("*.jsonl") for line in f.read_text().splitlines()]
    by_process: dict[str, set[str]] = {}
    for r in records:
        by_process.setdefault(" ".join(r["argv"]), set()).add(r["path"])
    client_files = {str(f.resolve()) for f in files}
    server = [p for argv, p in by_process.items() if "serverapp" in argv]
    clients = [p & client_files for argv, p in by_process.items() if "clientapp" in argv]
    assert server and all(p == {str((operator_dir / "test.csv").resolve())} for p in server)
    assert clients and all(len(p) <= 1 for p in clients) and set().union(*clients) == client_files


@pytest.mark.slow  # a benchmark: it measures several runs
def test_bench_scale_writes_its_table_plot_and_json_and_a_rerun_keeps_finished_points(tmp_path, data_dir,
                                                                                   monkeypatch):
    from fedslip import bench_scale

    results = bench_scale.bench_scale(tmp_path, ("tiny",), ("embedded",), rows_per_client=4,
                                      points=((4, 2), (8, 2)), data_dir=str(data_dir))
    saved = json.loads((tmp_path / "bench_scale.json").read_text())
    assert saved == json.loads(json.dumps(results)) and list(saved["points"]) == ["tiny/embedded/4/2",
                                                                                  "tiny/embedded/8/2"]
    for p in saved["points"].values():
        assert p["peak_memory_mib"] > 100 and p["seconds_per_round"] > 0 and p["setup_seconds"] > 0
        assert p["first_round_seconds"] > 0
        assert p["sampled"] == 2
    point = fedslip.load_config(tmp_path / "logs" / "tiny-embedded-8-2.toml")
    assert (point.num_clients, point.fraction_fit, point.eval_fraction) == (8, 0.25, 0.25)
    assert (tmp_path / "bench_scale.png").stat().st_size > 0
    assert (tmp_path / "bench_scale.md").read_text().count("| tiny | embedded |") == 2

    def refuse(*args, **kwargs):
        raise AssertionError("a finished point was measured again")

    monkeypatch.setattr(bench_scale, "measure", refuse)
    assert bench_scale.bench_scale(tmp_path, ("tiny",), ("embedded",), rows_per_client=4, points=((4, 2), (8, 2)),
                                   data_dir=str(data_dir)) == saved


def test_a_client_whose_file_changed_is_refused_on_resume_and_kstep(tmp_path, data_dir, operator_dir):
    """Only the client sees its file: it records its rows' fingerprint (rows.json) and refuses other rows."""
    from fedslip.client import ClientRowsChanged
    from fedslip.server import RoundFailed

    files = write_org_files(tmp_path / "orgs", data_dir)
    out = tmp_path / "run"
    fedslip.run(own_cfg(operator_dir, files), out, progress=False)
    assert all((out / "clients" / str(c) / "rows.json").is_file() for c in range(2))
    assert fedslip.kstep(out, steps=1, allow_test=True)["kstep_accuracy"] is not None  # same rows: fine
    unfinished = tmp_path / "unfinished"  # resume re-evaluates the last round
    shutil.copytree(out, unfinished)
    (unfinished / "summary.json").unlink()
    original = files[1].read_bytes()
    frame = pd.read_csv(files[1], keep_default_na=False)
    frame.iloc[::-1].assign(title=frame.title.iloc[::-1].str.upper()).to_csv(files[1], index=False)  # same count
    with pytest.raises(ClientRowsChanged, match=r"client 1: its rows are not the ones it started this run with"):
        fedslip.resume(unfinished, progress=False)
    assert not (unfinished / "summary.json").exists()
    with pytest.raises(RoundFailed, match="client 1: its rows are not the ones"):
        fedslip.kstep(out, steps=1, allow_test=True)
    (out / "clients" / "0" / "rows.json").write_text("[]")  # a record that is not one: the same clear error
    with pytest.raises(RoundFailed, match="client 0: its rows are not the ones"):
        fedslip.kstep(out, steps=1, allow_test=True)
    files[1].write_bytes(original)
    assert fedslip.resume(unfinished, progress=False)["global_accuracy"] is not None


def test_a_clients_test_rows_that_repeat_its_training_rows_are_warned_about(tmp_path, caplog):
    """A file of identical rows (or with duplicates) gives test rows that are training rows: the client's
    accuracy on them measures memorization. The warning counts them; a file without duplicates gets none."""
    from fedslip.data import TextSplit
    from fedslip.experiment import own_client_data
    from fedslip.model import load_tokenizer

    cfg = fedslip.make_config(dict(backbone="tiny", partition="own", client_data=["a.csv", "b.csv"], num_clients=2,
                                   samples_per_client=20, test_samples_per_client=8, val_samples_per_client=4))
    tokenizer = load_tokenizer(cfg.backbone)
    distinct = TextSplit(texts=[f"text number {i}" for i in range(40)], labels=np.arange(40) % 4, source="org.csv")
    with caplog.at_level(logging.WARNING, logger="fedslip"):
        own_client_data(cfg, tokenizer, 0, distinct)
    assert not caplog.records
    rows = own_rows(cfg, 0, 40, "org.csv")
    texts = list(distinct.texts)
    for r in rows.test[:3]:  # three test rows copy a training row
        texts[r] = texts[rows.train[0]]
    with caplog.at_level(logging.WARNING, logger="fedslip"):
        own_client_data(cfg, tokenizer, 0, TextSplit(texts=texts, labels=distinct.labels, source="org.csv"))
    assert [r.getMessage() for r in caplog.records] == [
        "org.csv: 3 of client 0's 8 test rows repeat one of its training rows verbatim (duplicated rows in the "
        "file?); its accuracy on them measures memorization"]
