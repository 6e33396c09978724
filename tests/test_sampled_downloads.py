"""Lossy downloads under client sampling: a client that missed a download gets the full state.

A compressed download is a change to the reference the clients hold. A client that was not sampled (or
not evaluated) in a round never receives that round's change, so the server must serve it the whole
state; these tests fail if it sends such a client a change it cannot apply (it would be locked out of
every later round: it never trains, is skipped at evaluation and K-step, and the run ends incomplete).
"""

from __future__ import annotations

import json

import pytest
import torch

import fedslip
from fedslip import codecs
from fedslip.server import Server, eval_clients, sample_clients
from tests.test_reliability import kill_in_round_3_resume_and_compare

ARGS = dict(method="fedslip", backbone="tiny", rounds=6, num_clients=4, fraction_fit=0.5, eval_fraction=0.5,
            samples_per_client=32, test_samples_per_client=16, global_test_samples=32, batch_size=16, kstep=2,
            precision="fp32", private_warmup_rounds=0)
LOSSY = ["fp16", "bf16", "int8", "int4", "topk+int8"]


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def expected_full_downloads(cfg) -> list[set[int]]:
    """Per round, the sampled clients that hold no reference to apply that round's change to, worked out
    from the sampling alone: a client holds round r's reference after receiving any message of round r
    as a change, and loses the chain for good once it received a full state."""
    held: dict[int, int] = {}
    full_per_round = []

    def send(cids, state_round, base_round):
        full = set()
        for c in cids:
            if base_round < 0 or held.get(c) in (base_round, state_round):
                held[c] = state_round
            else:
                held.pop(c, None)
                full.add(c)
        return full

    for r in range(1, cfg.rounds + 1):
        full_per_round.append(send(sample_clients(cfg, r), r - 1, r - 2 if r > 1 else -1))
        send(eval_clients(cfg, r), r, r - 1)
        if r == cfg.rounds and cfg.partition != "own":
            from fedslip.server import global_view_clients
            send(global_view_clients(cfg), r, r - 1)
    return full_per_round


@pytest.mark.parametrize("codec", LOSSY)
def test_every_sampled_client_trains_and_is_evaluated_with_a_lossy_download(codec, data_dir, tmp_path):
    cfg = fedslip.make_config({**ARGS, "download_codec": codec, "data_dir": str(data_dir)})
    summary = fedslip.run(cfg, tmp_path / "run", progress=False)
    assert summary["complete"] and summary["client_failures"] == []
    assert all(a is not None for a in summary["personalized_accuracy_per_client"])
    assert all(a is not None for a in summary["kstep_accuracy_per_client"])
    rows = metrics(tmp_path / "run")
    layout = codecs.layout_of(fedslip.experiment.prepare(cfg, "server").model.global_state())
    zeros = {n: torch.zeros(s) for n, s in layout.items()}
    download = codecs.of(cfg, "download")
    full_expected = expected_full_downloads(cfg)
    assert any(full_expected), "the sampling must leave some client behind for this test to mean anything"
    for row, full in zip(rows, full_expected, strict=True):
        r = row["round"]
        assert row["participants"] == sample_clients(cfg, r) and row["rejected"] == {}
        assert row["full_state_downloads"] == len(full), r
        # the bytes: a change to each client on the chain, the (dense) full state to the others
        change = len(codecs.pack(download, zeros, r - 2 if r > 1 else -1, r - 1))
        whole = len(codecs.pack_full(download, zeros, r - 1))
        assert row["download_bytes"] == len(full) * whole + (len(row["participants"]) - len(full)) * change, r


@pytest.mark.process
def test_sigkill_and_resume_with_sampling_and_a_lossy_download_equal_an_uninterrupted_run(data_dir, tmp_path):
    """Which client holds which reference is part of the checkpoint: a resumed run serves the same
    clients the full state as the uninterrupted one."""
    args = {**ARGS, "download_codec": "int8", "upload_codec": "int8", "rounds": 5}
    full = tmp_path / "full"
    summary = fedslip.run(fedslip.make_config({**args, "data_dir": str(data_dir)}), full, progress=False)
    assert summary["complete"]
    kill_in_round_3_resume_and_compare((full, summary), args, data_dir, tmp_path)


def test_a_client_that_missed_a_download_is_served_the_full_state(tiny_cfg):
    """Server level: the change goes to clients holding its base, the full state to the rest; a client
    sent the full state changes its own decoding of it, and its fp32 weights are placed on the shared
    reference by that change (what it trained), not by the quantization error of the full state."""
    cfg = tiny_cfg(download_codec="int8", num_clients=3)
    torch.manual_seed(0)
    state = {"a": torch.randn(4, 3), "b": torch.randn(5)}
    server = Server(cfg, state)
    first = server.downloads([0, 1])
    assert not any(codecs.is_full(p) for p in first.values())  # round 0: everyone starts from zeros
    server.delivered([0, 1])
    moved = {n: t + 0.1 for n, t in server.reference.items()}
    server.aggregate({0: (fedslip.comm.encode(moved), 10), 1: (fedslip.comm.encode(moved), 10)}, round_idx=1)
    sent = server.downloads([0, 1, 2])
    assert [codecs.is_full(sent[c]) for c in (0, 1, 2)] == [False, False, True]
    whole = codecs.unpack_full(sent[2], server.download, server.layout)
    assert not all(torch.equal(whole[n], server.reference[n]) for n in whole)  # quantized on its own
    server.delivered([0, 1, 2])
    reference = server.reference
    change = {n: torch.full_like(t, 0.01) for n, t in whole.items()}
    replies = {c: (fedslip.comm.encode({n: reference[n] + change[n] for n in change}), 1) for c in (0, 1)}
    replies[2] = (fedslip.comm.encode({n: whole[n] + change[n] for n in change}), 1)
    before = dict(server.state)
    server.aggregate(replies, round_idx=2)
    for n in change:  # every client moved by the same change: the exact state moves by it too
        torch.testing.assert_close(server.state[n], before[n] + change[n], rtol=0, atol=1e-6)
    assert 2 not in server.held and server.downloads([2])[2] is not server.broadcast()
