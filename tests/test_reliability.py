"""Fault injection: each test fails if the protection it names is removed."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fedslip
from fedslip import comm
from fedslip.client import Client, PrivateStore
from fedslip.data import eval_batches
from fedslip.experiment import RunDirError, prepare
from fedslip.inference import RunModel
from fedslip.model import GLOBAL
from fedslip.server import RoundFailed, Server
from fedslip.storage import StateFileError


def rows(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def client_states(run_dir, n):
    return [load_file(run_dir / "clients" / str(c) / "private.safetensors") for c in range(n)]


RUN_ARGS = dict(method="fedslip", backbone="tiny", rounds=4, samples_per_client=64, test_samples_per_client=16,
                global_test_samples=64, batch_size=8, local_epochs=2, kstep=2, precision="fp32",
                private_warmup_rounds=1, private_target_sparsity=0.5)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("runs") / "full"
    summary = fedslip.run(fedslip.make_config({**RUN_ARGS, "data_dir": str(data_dir)}), out, progress=False)
    return out, summary


@pytest.mark.process
def test_sigkill_mid_round_then_resume_equals_an_uninterrupted_run(uninterrupted, data_dir, tmp_path):
    kill_in_round_3_resume_and_compare(uninterrupted, RUN_ARGS, data_dir, tmp_path)


@pytest.mark.process
def test_resume_with_error_feedback_residuals_in_play_equals_an_uninterrupted_run(tmp_path_factory, data_dir,
                                                                                  tmp_path):
    """Lossy codecs both ways: each client's reference and residual, and the server's reference and last
    download, must come back exactly after a SIGKILL."""
    args = {**RUN_ARGS, "upload_codec": "topk+int8", "download_codec": "int4"}
    full = tmp_path_factory.mktemp("runs") / "full-compressed"
    summary = fedslip.run(fedslip.make_config({**args, "data_dir": str(data_dir)}), full, progress=False)
    out = kill_in_round_3_resume_and_compare((full, summary), args, data_dir, tmp_path)
    for c in range(4):
        for kind in ("reference", "residual"):
            assert same_tensors(load_file(out / "clients" / str(c) / f"{kind}.safetensors"),
                                load_file(full / "clients" / str(c) / f"{kind}.safetensors")), (c, kind)


def kill_in_round_3_resume_and_compare(uninterrupted, args, data_dir, tmp_path):
    """Run ``args`` in a subprocess, SIGKILL it inside round 3, resume, and compare with the uninterrupted
    run: metrics, summary, global track and private tracks. Returns the resumed run's directory."""
    full, full_summary = uninterrupted
    out = tmp_path / "killed"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**args, "data_dir": str(data_dir)}.items()]
    proc = subprocess.Popen([sys.executable, "-m", "fedslip.cli", "run", "--out", str(out), "--quiet", *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            state = out / "checkpoint" / "state.json"
            if state.exists() and json.loads(state.read_text())["round"] >= 2:
                break
            time.sleep(0.05)
        time.sleep(0.3)  # inside round 3
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not (out / "summary.json").exists()
    summary = fedslip.resume(out, progress=False)
    assert rows(out) == rows(full)
    for key in ("global_accuracy", "personalized_accuracy_per_client", "kstep_accuracy_per_client",
                "comm_bytes_per_round", "private_sparsity"):
        assert summary[key] == full_summary[key], key
    a, b = load_file(out / "global.safetensors"), load_file(full / "global.safetensors")
    assert all(torch.allclose(a[k], b[k]) for k in a)
    for mine, theirs in zip(client_states(out, 4), client_states(full, 4)):
        assert same_tensors(mine, theirs)
    return out


def unfinished_copy(full, tmp_path):
    """A copy of the finished run without its summary: resume re-evaluates the last round (and K-step)."""
    out = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(full), str(out)], check=True)
    (out / "summary.json").unlink()
    return out


def test_resume_refuses_finished_and_foreign_directories(uninterrupted, tmp_path):
    full, _ = uninterrupted
    with pytest.raises(RunDirError, match="finished run"):
        fedslip.resume(full)
    with pytest.raises(RunDirError, match="not a run directory"):
        fedslip.resume(tmp_path)
    foreign = unfinished_copy(full, tmp_path)
    partition = json.loads((foreign / "partition.json").read_text())
    partition["global_test"] = partition["global_test"][1:]
    (foreign / "partition.json").write_text(json.dumps(partition))
    with pytest.raises(RunDirError, match="partition.json"):
        fedslip.resume(foreign, progress=False)


def test_resume_refuses_an_edited_experiment_and_accepts_engine_keys(uninterrupted, tmp_path):
    full, reference = uninterrupted
    out = unfinished_copy(full, tmp_path)
    original = (out / "config.toml").read_text()
    assert "\nlr = " in original and "\nrounds = 4\n" in original
    edited = original.replace("\nrounds = 4\n", "\nrounds = 3\n").replace("\nlr = ", "\nlr = 0.5 # was ")
    (out / "config.toml").write_text(edited)
    with pytest.raises(fedslip.ConfigError, match=r"changed since round 4 was checkpointed: lr \(.* -> 0.5\), "
                                                  r"rounds \(4 -> 3\)"):
        fedslip.resume(out, progress=False)
    assert (out / "config.toml").read_text() == edited and not (out / "summary.json").exists()
    (out / "config.toml").write_text(original.replace("\neval_batch_size = ", "\neval_batch_size = 7 # was "))
    summary = fedslip.resume(out, progress=False)
    assert summary["personalized_accuracy"] == reference["personalized_accuracy"]


@pytest.mark.parametrize("edit, needle", [
    ({"history": 42}, "'history' is 42"),
    ({"round": "abc"}, "'round' is 'abc'"),
    ({"elapsed": None}, "'elapsed' is None"),
    ({"global": "../../global.safetensors"}, "'global' must name a file there"),
    ({"history": [1, 2]}, "'history' must list round rows"),
])
def test_a_tampered_checkpoint_state_is_one_error_naming_the_field(uninterrupted, tmp_path, edit, needle):
    full, _ = uninterrupted
    out = unfinished_copy(full, tmp_path)
    state = out / "checkpoint" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), **edit}))
    with pytest.raises(StateFileError, match=re.escape(needle)):
        fedslip.resume(out, progress=False)


def test_truncated_checkpoint_is_one_clear_error_naming_the_file(uninterrupted, tmp_path):
    full, _ = uninterrupted
    out = unfinished_copy(full, tmp_path)
    ckpt = next((out / "checkpoint").glob("global-*.safetensors"))
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(StateFileError, match=ckpt.name):
        fedslip.resume(out, progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before, "nothing may be overwritten"


def rewrite_state(path, change):
    tensors = load_file(path)
    name = sorted(tensors)[0]
    save_file({**tensors, name: change(tensors[name])}, path, metadata=safe_open(path, "pt").metadata())


def truncate(path):
    path.write_bytes(path.read_bytes()[:50])


@pytest.mark.parametrize("what, damage, needle", [
    ("private", truncate, "is not a readable safetensors file"),
    ("private", lambda p: rewrite_state(p, lambda t: torch.full_like(t, float("nan"))), "holds NaN or Inf"),
    ("private", lambda p: rewrite_state(p, lambda t: torch.zeros(3, 3)), "has shape (3, 3)"),
    ("mask", lambda p: rewrite_state(p, lambda t: torch.full_like(t, 7)), "values other than 0 and 1"),
], ids=["truncated", "nan", "shape", "mask"])
def test_damaged_private_state_stops_the_resume_and_predict_naming_the_file(uninterrupted, tmp_path, what, damage,
                                                                            needle):
    """Client 1's own state file truncated or tampered with: the resume stops with one error naming the client,
    the file and the fault, and writes no summary (the client is not silently dropped or reset); predict refuses
    the damaged private track the same way."""
    full, _ = uninterrupted
    out = unfinished_copy(full, tmp_path)
    path = out / "clients" / "1" / f"{what}.safetensors"
    damage(path)
    names_it = re.escape(f"{path}") + ".*" + re.escape(needle)
    with pytest.raises(StateFileError, match="client 1 cannot read its own state.*" + names_it):
        fedslip.resume(out, progress=False)
    assert not (out / "summary.json").exists()
    if what == "private":
        with pytest.raises(StateFileError, match=names_it):
            RunModel(out, client=1)


def test_a_corrupt_previous_generation_does_not_block_predict(uninterrupted, tmp_path):
    full, _ = uninterrupted
    out = unfinished_copy(full, tmp_path)
    prev = out / "clients" / "1" / "private.prev.safetensors"
    prev.write_bytes(prev.read_bytes()[:40])
    expected = RunModel(full, client=1).predict(["stocks profit market today"])
    assert RunModel(out, client=1).predict(["stocks profit market today"]) == expected


def test_a_retried_round_keeps_the_last_committed_private_state(tmp_path):
    """Round 2 is written, not committed, retried and written again: round 1's state must survive both
    attempts (the rotation once dropped it and the client silently started its private track over)."""
    store = PrivateStore(tmp_path)
    state = {r: {"w": torch.full((2, 2), float(r))} for r in (1, 2)}
    store.save("private", state[1], 1)
    for _ in range(3):  # round 2 attempted three times
        assert torch.equal(store.load("private", before_round=2)["w"], state[1]["w"])
        store.save("private", state[2], 2)
    assert torch.equal(store.load("private", before_round=2)["w"], state[1]["w"])
    assert torch.equal(store.load("private")["w"], state[2]["w"])
    (tmp_path / "private.prev.safetensors").unlink()  # only a later generation left: an error, no reset
    with pytest.raises(StateFileError, match="no private state written before round 2"):
        store.load("private", before_round=2)


# --- bad client updates --------------------------------------------------------------------------------
def corrupt(kind, state):
    state = {k: v.clone() for k, v in state.items()}
    name = next(iter(state))
    if kind == "nan":
        state[name].view(-1)[0] = float("nan")
    elif kind == "inf":
        state[name].view(-1)[0] = float("inf")
    elif kind == "shape":
        state[name] = torch.zeros(3, 3)
    elif kind == "missing":
        del state[name]
    elif kind == "dtype":
        state[name] = state[name].double()
    elif kind == "oversized":
        state["padding"] = torch.zeros(len(comm.encode(state)))  # x4 bytes: far over 2x the broadcast
    elif kind == "padded":  # the right tensors, valid in every way, in a payload 3x the broadcast's size
        return comm.encode(state, metadata={"padding": " " * 2 * len(comm.encode(state))})
    elif kind == "garbage":
        return b"not a safetensors payload"
    return comm.encode(state)


@pytest.mark.parametrize("kind, reason", [
    ("nan", "a contains NaN or Inf"), ("inf", "a contains NaN or Inf"),
    ("shape", "a has shape (3, 3), expected (4, 3)"), ("missing", "missing ['a']"),
    ("dtype", "a has dtype torch.float64, expected torch.float32"), ("oversized", "exceeds the limit of"),
    ("padded", "exceeds the limit of"), ("garbage", "is not valid safetensors")])
def test_invalid_update_is_rejected_and_only_valid_ones_are_aggregated(tiny_cfg, kind, reason):
    cfg = tiny_cfg()
    torch.manual_seed(0)
    reference = {"a": torch.randn(4, 3), "b": torch.randn(5)}
    updates = [{k: v + torch.randn_like(v) for k, v in reference.items()} for _ in range(3)]
    server = Server(cfg, reference)
    replies = {c: (comm.encode(u), 10 * (c + 1)) for c, u in enumerate(updates)}
    replies[3] = (corrupt(kind, updates[0]), 10)
    outcome = server.aggregate(replies)
    assert list(outcome.rejected) == [3] and outcome.accepted == [0, 1, 2]
    assert reason in outcome.rejected[3], outcome.rejected[3]  # rejected by the check that names this fault
    without = Server(cfg, reference)
    without.aggregate({c: (comm.encode(u), 10 * (c + 1)) for c, u in enumerate(updates)})
    assert same_tensors(server.state, without.state)
    assert all(torch.isfinite(t).all() for t in server.state.values())


def test_max_payload_bytes_bounds_a_valid_update_to_the_byte(tiny_cfg):
    """Two payloads of the same valid weights (padded with header metadata): the one of exactly
    max_payload_bytes is aggregated, the one a header-alignment step longer is rejected for its size (both are
    far below the default limit, 2x the broadcast's size)."""
    reference = {"a": torch.zeros(64)}
    update = {"a": torch.full((64,), 0.5)}
    fits, too_long = (comm.encode(update, metadata={"padding": " " * n}) for n in (50, 60))
    assert len(fits) < len(too_long) < 1.5 * len(comm.encode(reference))
    server = Server(tiny_cfg(max_payload_bytes=len(fits)), reference)
    outcome = server.aggregate({0: (fits, 1), 1: (too_long, 1)})
    assert outcome.accepted == [0] and outcome.rejected == {
        1: f"payload of {len(too_long)} bytes exceeds the limit of {len(fits)}"}
    assert torch.equal(server.state["a"], update["a"])


def test_update_norm_bound(tiny_cfg):
    reference = {"a": torch.zeros(4)}
    server = Server(tiny_cfg(max_update_norm=1.0), reference)
    outcome = server.aggregate({0: (comm.encode({"a": torch.full((4,), 0.1)}), 1),
                                1: (comm.encode({"a": torch.full((4,), 5.0)}), 1)})
    assert outcome.rejected.keys() == {1} and "max_update_norm" in outcome.rejected[1]
    assert torch.allclose(server.state["a"], torch.full((4,), 0.1))


def sample_weighted_mean(updates: list[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """FedAvg computed here, in float64: sum_i n_i w_i / sum_i n_i, cast back to each tensor's dtype."""
    total = sum(n for _, n in updates)
    return {k: (sum(n * u[k].double() for u, n in updates) / total).to(t.dtype) for k, t in updates[0][0].items()}


def test_a_client_sending_nan_is_excluded_end_to_end(tiny_cfg, tmp_path, monkeypatch):
    """Every round's global track is the mean of the three valid uploads only (not NaN, not the NaN client's
    weights in any form), and the reported global accuracy and loss are that global track's on the global
    test set (the loss, a continuous number, tells global tracks apart where accuracies tie at chance)."""
    original = Client.fit
    received, uploads = {}, {}  # round -> the global track the clients were sent; round -> {client: (its weights, n)}

    def fit(self, payload, round_idx):
        received.setdefault(round_idx, comm.decode(payload))
        reply = original(self, payload, round_idx)
        uploads.setdefault(round_idx, {})[self.cid] = (comm.decode(reply.payload), reply.num_examples)
        if self.cid == 2:
            return dataclasses.replace(reply, payload=corrupt("nan", comm.decode(reply.payload)))
        return reply

    monkeypatch.setattr(Client, "fit", fit)
    cfg = tiny_cfg(rounds=2)
    summary = fedslip.run(cfg, tmp_path / "r", progress=False)
    # rejected for its NaN by the server's validation (a client that raised would be rejected too, for another reason)
    assert all(r["rejected_updates"] == 1 and r["rejected"].keys() == {"2"} and "NaN" in r["rejected"]["2"]
               for r in rows(tmp_path / "r"))
    final = load_file(tmp_path / "r" / "global.safetensors")
    for round_idx, global_after in ((1, received[2]), (2, final)):
        expected = sample_weighted_mean([uploads[round_idx][c] for c in (0, 1, 3)])
        assert expected.keys() == global_after.keys()
        for k, t in expected.items():
            assert torch.isfinite(t).all() and torch.allclose(global_after[k], t, rtol=1e-6, atol=1e-7), (round_idx, k)
    setup = prepare(cfg)
    setup.model.load_global_state(final)
    with torch.inference_mode(), setup.model.eval_mode():
        batches = [b for _, b in eval_batches(setup.tokenizer, setup.global_eval, 64)]
        logits = torch.cat([setup.model.logits(b, (GLOBAL,)) for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    assert summary["global_accuracy"] == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))
    assert rows(tmp_path / "r")[-1]["global_loss"] == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-6)


# --- clients that raise -----------------------------------------------------------------------------------
def raising_fit(bad_cids):
    original = Client.fit

    def fit(self, payload, round_idx):
        if self.cid in bad_cids:
            raise RuntimeError(f"client {self.cid} lost its disk")
        return original(self, payload, round_idx)
    return fit


def test_a_failing_client_does_not_stop_the_round(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(Client, "fit", raising_fit({1}))
    fedslip.run(tiny_cfg(rounds=2, method="fedslip"), tmp_path / "r", progress=False)
    for r in rows(tmp_path / "r"):
        assert r["rejected_updates"] == 1 and "lost its disk" in r["rejected"]["1"]
        assert r["upload_bytes"] == r["download_bytes"] * 3 // 4


def test_too_few_valid_clients_stops_cleanly_and_the_run_resumes(tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_cfg(rounds=3, min_fit_clients=4)
    original = Client.fit
    calls = {"n": 0}

    def fit(self, payload, round_idx):
        if round_idx == 2 and self.cid == 0:
            raise RuntimeError("transient failure")
        calls["n"] += 1
        return original(self, payload, round_idx)

    monkeypatch.setattr(Client, "fit", fit)
    with pytest.raises(RoundFailed, match="round 2 not applied.*--resume"):
        fedslip.run(cfg, tmp_path / "r", progress=False)
    assert [r["round"] for r in rows(tmp_path / "r")] == [1]
    monkeypatch.setattr(Client, "fit", original)
    summary = fedslip.resume(tmp_path / "r", progress=False)
    reference = fedslip.run(cfg, tmp_path / "ref", progress=False)
    assert rows(tmp_path / "r") == rows(tmp_path / "ref")
    assert summary["global_accuracy"] == reference["global_accuracy"]


def test_a_client_failing_evaluation_is_recorded_not_fatal(tiny_cfg, tmp_path, monkeypatch):
    """The run goes on without the client's accuracy; its report is written whole (the client has no
    majority floor), names the run incomplete and lists the failure in its Health section."""
    from fedslip.report import build_report, figures_for, load_run
    from tests.test_compare_report import table_row

    original = Client.evaluate

    def evaluate(self, *args, **kwargs):
        if self.cid == 1:
            raise OSError("test rows unreadable")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Client, "evaluate", evaluate)
    summary = fedslip.run(tiny_cfg(rounds=2), tmp_path / "r", progress=False)
    for r in rows(tmp_path / "r"):
        assert "test rows unreadable" in r["failed_evaluations"]["1"]
        assert r["personalized_accuracy_per_client"][1] is None
        assert r["personalized_accuracy"] == pytest.approx(
            sum(v for v in r["personalized_accuracy_per_client"] if v is not None) / 3)
    assert summary["personalized_accuracy_per_client"][1] is None
    assert summary["complete"] is False
    assert [(f["round"], f["client"], f["stage"]) for f in summary["client_failures"]] == [(1, 1, "evaluate"),
                                                                                         (2, 1, "evaluate")]
    assert summary["majority_floor_per_client"][1] is None
    runs = [load_run(tmp_path / "r")]
    build_report(runs, tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert table_row(report, "fedavg_lora (incomplete)") and "| `r` | 1 | client_failed | client 1 (evaluate): " \
        "OSError: test rows unreadable |" in report
    assert all((tmp_path / "report" / name).is_file() for name in (*figures_for(runs), "results.json"))


def test_a_complete_run_says_so(uninterrupted):
    _, summary = uninterrupted
    assert summary["complete"] is True and summary["client_failures"] == []


def test_aggregation_is_flower_strategies(tiny_cfg):
    """fedavg / median / trimmed_mean aggregate with Flower's FedAvg / FedMedian / FedTrimmedAvg; fedavg's mean
    is sum(n_i w_i) / sum(n_i) and agrees with Flower FedAvg's own arithmetic up to float rounding. Client 3 is an
    outlier (+-1000): the robust rules stay within the honest clients' range, the mean does not."""
    from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg

    from fedslip.server import train_reply

    torch.manual_seed(0)
    reference = {"a": torch.randn(8, 3), "b": torch.randn(5)}
    updates = [{k: v + torch.randn_like(v) for k, v in reference.items()} for _ in range(3)]
    updates.append({k: v + 1000 * torch.randn_like(v).sign() for k, v in reference.items()})
    honest = {k: torch.stack([u[k] for u in updates[:3]]) for k in reference}
    weights = [3, 40, 7, 50]
    replies = {c: (comm.encode(u), n) for c, (u, n) in enumerate(zip(updates, weights))}
    stacked = {k: torch.stack([u[k] for u in updates]) for k in reference}
    expected = {
        "fedavg": {k: sum(n * u[k] for u, n in zip(updates, weights)) / sum(weights) for k in reference},
        "median": {k: torch.from_numpy(np.median(stacked[k].numpy(), axis=0)) for k in reference},
        "trimmed_mean": {k: stacked[k].sort(dim=0).values[1:3].mean(dim=0) for k in reference},  # cut 1 of 4 per end
    }
    for aggregation, kind in (("fedavg", FedAvg), ("median", FedMedian), ("trimmed_mean", FedTrimmedAvg)):
        server = Server(tiny_cfg(aggregation=aggregation, trim_fraction=0.25), reference)
        assert isinstance(server.strategy, kind)
        server.aggregate(replies)
        for k in reference:
            assert torch.allclose(server.state[k], expected[aggregation][k], atol=1e-6), (aggregation, k)
            within = (server.state[k] >= honest[k].min(0).values) & (server.state[k] <= honest[k].max(0).values)
            assert bool(within.all()) == (aggregation != "fedavg"), (aggregation, k)
    flower, _ = FedAvg().aggregate_train(1, [train_reply(c, u, n) for c, (u, n) in enumerate(zip(updates, weights))])
    flower = flower.to_torch_state_dict()
    for k in reference:
        assert torch.allclose(flower[k], expected["fedavg"][k], atol=1e-6)


def test_fedavg_is_the_sample_weighted_mean_bit_for_bit_round_after_round(tiny_cfg):
    """Over consecutive rounds (each client's upload starts from the last aggregate, the weights change
    every round), the server's global track is sum_i n_i w_i / sum_i n_i computed here: within float32
    rounding of the float64 mean, and bit for bit the float32 arithmetic of the published runs (the
    products n_i w_i summed in client order, then one division by sum_i n_i)."""
    generator = torch.Generator().manual_seed(0)
    state = {"a": torch.randn(64, 16, generator=generator), "b": torch.randn(33, generator=generator)}
    server = Server(tiny_cfg(aggregation="fedavg"), state)
    for round_idx, weights in enumerate(([3, 40, 7, 50], [11, 1, 29, 6], [5, 5, 17, 2]), start=1):
        updates = [{k: server.state[k] + torch.randn(t.shape, generator=generator) for k, t in state.items()}
                   for _ in weights]
        server.aggregate({c: (comm.encode(u), n) for c, (u, n) in enumerate(zip(updates, weights))},
                         round_idx=round_idx)
        in_float64 = sample_weighted_mean(list(zip(updates, weights)))
        for k in state:
            products = [n * u[k] for u, n in zip(updates, weights)]  # float32, as the published runs
            published = (((products[0] + products[1]) + products[2]) + products[3]) / sum(weights)
            assert server.state[k].dtype == torch.float32
            assert torch.allclose(server.state[k], in_float64[k], rtol=1e-6, atol=1e-7), (round_idx, k)
            assert torch.equal(server.state[k], published), (round_idx, k)


def _poison(monkeypatch, when):
    """Local training that ends with NaN in the client's own tensors (its local head) whenever ``when(cfg,
    desc)`` holds: what a learning rate far too high does, deterministically."""
    import fedslip.client as client_mod

    real = client_mod.train_local

    def train_local(model, tokenizer, data, cfg, *args, desc="", **kwargs):
        result = real(model, tokenizer, data, cfg, *args, desc=desc, **kwargs)
        if when(cfg, desc):
            with torch.no_grad():
                next(iter({**model.local_params, **model.private_params}.values())).fill_(float("nan"))
        return result

    monkeypatch.setattr(client_mod, "train_local", train_local)


def test_a_diverged_client_saves_and_sends_nothing_and_the_run_goes_on(tiny_cfg, tmp_path, monkeypatch):
    """Found on the GPU leaderboard runs: a fedper client whose training diverged saved NaN in its local head,
    then could not read its own state at the evaluation and the whole run stopped ("restore the file")."""
    _poison(monkeypatch, lambda cfg, desc: desc == "round 2 client 1")
    out = tmp_path / "run"
    summary = fedslip.run(tiny_cfg(method="fedper", rounds=3), out)
    failures = [f for f in summary["client_failures"] if f["stage"] == "fit"]
    assert [(f["round"], f["client"]) for f in failures] == [(2, 1)]
    assert "TrainingDiverged" in failures[0]["reason"] and "nothing of this round is saved" in failures[0]["reason"]
    store = PrivateStore(out / "clients" / "1")
    with safe_open(store.path("private"), "pt") as f:  # its state: round 3's training from round 1's state
        assert f.metadata()["round"] == "3"
    assert all(torch.isfinite(t).all() for t in load_file(store.path("private")).values())
    assert len(rows(out)) == 3 and summary["personalized_accuracy"] is not None


def test_a_tune_trial_whose_run_fails_every_client_is_pruned_and_the_study_goes_on(tiny_cfg, data_dir, tmp_path,
                                                                                  monkeypatch):
    from fedslip import tune as tune_mod

    _poison(monkeypatch, lambda cfg, desc: cfg.lr == 0.0123)  # every client diverges at this point of the space
    overrides = {"method": "fedper", "backbone": "tiny", "data_dir": str(data_dir), "rounds": 1,
                 "samples_per_client": 32, "test_samples_per_client": 16, "global_test_samples": 64,
                 "batch_size": 16, "kstep": 0, "precision": "fp32"}
    tune_mod.tune(tmp_path / "study", trials=2, overrides=overrides, enqueue=[{"lr": 0.0123}])
    import optuna

    trials = optuna.load_study(study_name="fedslip-tune", storage=f"sqlite:///{tmp_path / 'study' / 'study.db'}").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED"] and trials[1].params == {"lr": 0.0123}
    assert "only 0 valid client update(s)" in trials[1].user_attrs["failed_round"]
