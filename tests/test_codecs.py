"""Compressed payloads (fedslip/codecs.py): each codec's error bound, error feedback, validation of what
arrives, bytes measured on the wire, and the private track staying home."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import REPO

import fedslip
from fedslip import codecs, comm
from fedslip.codecs import Codec
from fedslip.experiment import RunDir, build_clients, prepare
from fedslip.model import PRIVATE
from fedslip.server import Server

LOSSY = [c for c in codecs.CODECS if c != "fp32"]


def sample_update(seed: int = 0) -> dict[str, torch.Tensor]:
    """LoRA-shaped tensors with different magnitudes per tensor and per row."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.logspace(-3, 0, 40).unsqueeze(1)
    return {"layer.0.lora_A.global.weight": torch.randn(8, 40, generator=g) * 0.05,
            "layer.0.lora_B.global.weight": torch.randn(40, 8, generator=g) * rows,
            "classifier.weight": torch.randn(4, 40, generator=g),
            "classifier.bias": torch.randn(4, generator=g) * 1e-2}


def groups_of(name: str, x: torch.Tensor, codec: Codec) -> list[torch.Tensor]:
    """The coordinates sharing one affine scale (independently of the codec's own code)."""
    if codec.granularity == "row" and x.dim() > 1:
        return [x[i] for i in range(x.shape[0])]
    return [x.flatten()]


@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("name", LOSSY)
def test_every_codec_round_trips_within_its_stated_bound(name, granularity):
    codec = Codec(name, topk_fraction=0.1, granularity=granularity)
    update = sample_update()
    payload = codecs.pack(codec, update, base_round=3, round_idx=4)
    decoded, base, round_idx = codecs.unpack(payload, codec, codecs.layout_of(update))
    assert (base, round_idx) == (3, 4) and decoded.keys() == update.keys()
    for n, x in update.items():
        sent = x.clone()
        if codec.sparse:  # exactly the k largest magnitudes of each tensor are sent, the rest is 0
            k = math.ceil(0.1 * x.numel())
            kept = decoded[n] != 0
            threshold = x.abs().flatten().kthvalue(x.numel() - k + 1).values
            assert int((x.abs() >= threshold).sum()) == k
            assert torch.equal(kept | (x.abs() >= threshold), x.abs() >= threshold)  # nothing else sent
            assert torch.all(decoded[n][x.abs() < threshold] == 0)
            sent = torch.where(x.abs() >= threshold, x, torch.zeros_like(x))
        err = (decoded[n] - sent).abs()
        selected = sent != 0 if codec.sparse else torch.ones_like(sent, dtype=torch.bool)
        if codec.values == "fp16":
            assert torch.all(err <= 2 ** -11 * sent.abs() + 1e-7), n
        elif codec.values == "bf16":
            assert torch.all(err <= 2 ** -8 * sent.abs()), n
        elif codec.values in ("int8", "int4"):
            levels = 255 if codec.values == "int8" else 15
            if codec.sparse:  # the kept values of a tensor share one scale
                values = sent[selected]
                bound = (values.max() - values.min()) / levels / 2
                assert torch.all(err[selected] <= bound * (1 + 1e-5) + 1e-7), n
            else:
                for grp_x, grp_err in zip(groups_of(n, x, codec), groups_of(n, err, codec)):
                    bound = (grp_x.max() - grp_x.min()) / levels / 2
                    assert torch.all(grp_err <= bound * (1 + 1e-5) + 1e-7), n
        else:
            assert torch.equal(decoded[n], sent), n


def test_row_scales_are_tighter_than_tensor_scales_on_rows_of_different_magnitude():
    update = sample_update()
    errors = {}
    for granularity in ("tensor", "row"):
        codec = Codec("int4", granularity=granularity)
        decoded, *_ = codecs.unpack(codecs.pack(codec, update, 0, 1), codec, codecs.layout_of(update))
        errors[granularity] = (decoded["layer.0.lora_B.global.weight"] - update["layer.0.lora_B.global.weight"]
                               ).abs()[:10].max()
    assert errors["row"] < errors["tensor"] / 10


@pytest.mark.parametrize("name", ["topk", "topk+int8", "int4"])
def test_error_feedback_makes_the_sum_of_sent_updates_track_the_sum_of_true_updates(name):
    """With the residual fed back, sum(sent) = sum(true) - residual: the gap stays bounded; without it
    the gap grows with every round (top-k loses 90% of each update, int4 adds a rounding error per round)."""
    codec = Codec(name, topk_fraction=0.1)
    layout = codecs.layout_of(sample_update())
    true_sum = {n: torch.zeros(s) for n, s in layout.items()}
    sent_ef, sent_plain = dict(true_sum), dict(true_sum)
    residual = dict(true_sum)
    gaps_ef, gaps_plain = [], []  # ||sum(true) - sum(sent)||, with and without error feedback

    def gap(sent_sum):
        return math.sqrt(sum(float(((true_sum[n] - sent_sum[n]) ** 2).sum()) for n in layout))

    for t in range(60):
        update = {n: u + 0.2 for n, u in sample_update(t).items()}  # a drift every round, as in training
        true_sum = codecs.apply(true_sum, update)
        with_residual = codecs.apply(update, residual)
        sent, *_ = codecs.unpack(codecs.pack(codec, with_residual, t, t + 1), codec, layout)
        residual = codecs.residual(with_residual, sent)
        sent_ef = codecs.apply(sent_ef, sent)
        plain, *_ = codecs.unpack(codecs.pack(codec, update, t, t + 1), codec, layout)
        sent_plain = codecs.apply(sent_plain, plain)
        for n in layout:  # the identity error feedback rests on, every round
            assert torch.allclose(sent_ef[n] + residual[n], true_sum[n], atol=1e-4)
        gaps_ef.append(gap(sent_ef))
        gaps_plain.append(gap(sent_plain))
    norm = math.sqrt(sum(float((v ** 2).sum()) for v in true_sum.values()))
    assert gaps_ef[-1] / norm < 0.1  # what error feedback has not sent yet is a small part of the sum
    # measured (topk, int4): the gap with feedback ~31, ~1.9 from round 10 on; without it 57 -> 288, 5.4 -> 12.4
    assert gaps_ef[-1] <= 1.5 * gaps_ef[9], gaps_ef  # bounded
    assert gaps_plain[-1] >= 1.5 * gaps_plain[9] and gaps_plain[-1] >= 4 * gaps_ef[-1], gaps_plain  # grows
    if codec.sparse:
        assert gaps_plain[-1] / norm > 0.5  # without feedback 90% of every update is lost for good


def test_a_client_keeps_what_it_did_not_send_and_adds_it_to_its_next_update(tiny_cfg, tmp_path):
    cfg = tiny_cfg(method="fedavg_lora", num_clients=1, upload_codec="topk+int8")
    setup = prepare(cfg)
    client = build_clients(setup, RunDir(tmp_path))[0]
    layout = setup.model.global_shapes()
    received = setup.model.global_state()
    carried = {n: torch.zeros(s) for n, s in layout.items()}
    for round_idx in (1, 2, 3):
        reply = client.fit(comm.encode(received), round_idx)
        trained = setup.model.global_state()
        sent, base, _ = codecs.unpack(reply.payload, client.upload, layout)
        assert base == round_idx - 1
        residual = client.store.load("residual", expected=layout)
        for n in layout:  # sent + new residual == this round's change + the residual carried in
            assert torch.allclose(sent[n] + residual[n], trained[n] - received[n] + carried[n], atol=1e-6)
        assert sum(int((sent[n] != 0).sum()) for n in layout) < 0.2 * sum(math.prod(s) for s in layout.values())
        carried, received = residual, {n: t + 0.01 for n, t in trained.items()}


def test_without_error_feedback_nothing_is_kept(tiny_cfg, tmp_path):
    cfg = tiny_cfg(method="fedavg_lora", num_clients=1, upload_codec="topk", error_feedback=False)
    setup = prepare(cfg)
    client = build_clients(setup, RunDir(tmp_path))[0]
    client.fit(comm.encode(setup.model.global_state()), 1)
    assert not client.store.exists("residual")


# --- what arrives is validated -----------------------------------------------------------------------
def corrupt(payload: bytes, codec: Codec, change) -> bytes:
    wire, meta = comm.read(payload)
    change(wire, meta)
    return comm.encode(wire, meta)


def nan_scale(w, m):
    w["scale"][0] = float("nan")


def negative_scale(w, m):
    w["scale"][0] = -1.0


def huge_scale(w, m):
    w["scale"][0] = 3e38  # finite, but 255 codes of it are not


def truncated_codes(w, m):
    w["codes"] = w["codes"][:-1]


def extra_mask_bit(w, m):
    w["mask"][0] = 255


def stale_base(w, m):
    m["base"] = "7"


def other_codec(w, m):
    m["codec"] = "int4"


def other_layout(w, m):
    m["layout"] = "0" * 16


def wrong_dtype(w, m):
    w["codes"] = w["codes"].to(torch.int16)


def extra_tensor(w, m):
    w["smuggled.private.weight"] = torch.zeros(3)


@pytest.mark.parametrize("change, needle", [
    (nan_scale, "scales must be finite"), (negative_scale, "scales must be finite and >= 0"),
    (huge_scale, "decodes to NaN or Inf"), (truncated_codes, "'codes'"), (extra_mask_bit, "mask selects"),
    (stale_base, "round 7"), (other_codec, "codec 'int4'"), (other_layout, "layout"),
    (wrong_dtype, "'codes' is torch.int16"), (extra_tensor, "holds ['codes', 'lo', 'mask', 'scale', 'smuggled"),
    (None, "not valid safetensors")])
def test_a_corrupted_compressed_update_is_rejected_with_its_reason(tiny_cfg, change, needle):
    cfg = tiny_cfg(method="fedavg_lora", upload_codec="topk+int8", num_clients=2)
    setup = prepare(cfg)
    server = Server(cfg, setup.model.global_state())
    codec = server.upload
    good = codecs.pack(codec, {n: torch.randn(s) * 0.01 for n, s in server.layout.items()}, 0, 1)
    bad = good[:len(good) // 2] if change is None else corrupt(good, codec, change)
    outcome = server.aggregate({0: (good, 10), 1: (bad, 10)}, round_idx=1)
    assert outcome.accepted == [0] and needle in outcome.rejected[1], outcome.rejected


def test_a_corrupted_download_fails_the_client_with_its_reason(tiny_cfg, tmp_path):
    cfg = tiny_cfg(method="fedslip", download_codec="int8", num_clients=1)
    setup = prepare(cfg)
    server = Server(cfg, setup.model.global_state())
    client = build_clients(setup, RunDir(tmp_path))[0]
    with pytest.raises(comm.PayloadError, match="scales must be finite"):
        client.fit(corrupt(server.broadcast(), server.download, nan_scale), 1)
    later = codecs.pack(server.download, server.reference, base_round=4, round_idx=5)
    with pytest.raises(comm.PayloadError, match="holds no global track of round 4"):
        client.fit(later, 6)


def test_server_and_clients_hold_the_same_global_track_and_the_server_keeps_what_it_did_not_send(tiny_cfg):
    cfg = tiny_cfg(method="fedavg_lora", download_codec="topk", upload_codec="fp32")
    setup = prepare(cfg)
    exact = setup.model.global_state()
    server = Server(cfg, exact)
    held = {n: torch.zeros(s) for n, s in server.layout.items()}  # what a client holds before round 1
    for round_idx in (1, 2, 3):
        change, base, made = codecs.unpack(server.broadcast(), server.download, server.layout)
        assert (base, made) == (round_idx - 2, round_idx - 1)
        held = codecs.apply(held, change)
        assert all(torch.equal(held[n], server.reference[n]) for n in held)
        trained = {n: t + 0.05 * round_idx for n, t in held.items()}  # every client trains the same change
        server.aggregate({0: (comm.encode(trained), 5), 1: (comm.encode(trained), 5)}, round_idx=round_idx)
        exact = {n: exact[n] + (trained[n] - held[n]) for n in exact}  # the exact FedAvg global track
        assert all(torch.allclose(server.state[n], exact[n], atol=1e-6) for n in exact)


# --- whole runs ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def codec_runs(tmp_path_factory, data_dir):
    base = dict(method="fedslip", backbone="tiny", data_dir=str(data_dir), rounds=3, num_clients=3,
                samples_per_client=32, test_samples_per_client=16, global_test_samples=64, batch_size=16,
                kstep=2, precision="fp32", private_warmup_rounds=0, private_target_sparsity=0.5)
    out = tmp_path_factory.mktemp("codec_runs")
    messages: list[bytes] = []
    original = comm.encode
    mp = pytest.MonkeyPatch()
    mp.setattr(comm, "encode", lambda t, metadata=None: messages.append(original(t, metadata)) or messages[-1])
    try:
        runs = {name: fedslip.run(fedslip.make_config({**base, "upload_codec": name, "download_codec": name}),
                                  out / name, progress=False) for name in ("fp32", "topk+int8")}
    finally:
        mp.undo()
    return out, runs, messages


def test_compressed_runs_measure_fewer_bytes_on_the_wire(codec_runs):
    out, runs, _ = codec_runs
    fp32, small = runs["fp32"], runs["topk+int8"]
    assert small["comm_bytes_per_round"] < fp32["comm_bytes_per_round"] / 8
    for row in map(json.loads, (out / "topk+int8" / "metrics.jsonl").read_text().splitlines()):
        assert row["upload_bytes"] > 0 and row["download_bytes"] > 0
    assert small["global_accuracy"] is not None and small["kstep_accuracy"] is not None


def test_no_compressed_message_carries_a_private_tensor(codec_runs):
    out, runs, messages = codec_runs
    packed = [p for p in messages if comm.read(p)[1].get("codec") == "topk+int8"]
    assert len(packed) >= 3 * 3
    # a packed payload has no tensor names: what it carries is named by its layout digest, which must be the
    # global track's (names and shapes), and its buffers must decode against that layout and no other
    global_layout = codecs.layout_of(comm.decode((out / "topk+int8" / "global.safetensors").read_bytes()))
    assert global_layout and not any(f".{PRIVATE}." in n for n in global_layout)
    codec = codecs.of(fedslip.load_config(out / "topk+int8" / "config.toml"), "upload")
    for payload in packed:
        wire, meta = comm.read(payload)
        assert set(wire) == {"codes", "lo", "scale", "mask"}  # flat buffers of the global track's layout only
        assert meta["layout"] == codecs.layout_digest(global_layout)
        update, _, _ = codecs.unpack(payload, codec, global_layout)
        assert update.keys() == global_layout.keys()
    assert runs["topk+int8"]["private_bytes_transmitted"] == 0


def test_client_state_directories_hold_reference_and_residual(codec_runs):
    out, *_ = codec_runs
    names = sorted(p.name for p in (out / "topk+int8" / "clients" / "0").iterdir())
    assert "reference.safetensors" in names and "residual.safetensors" in names
    assert sorted(p.name for p in (out / "topk+int8" / "checkpoint").iterdir()) == [
        "download-00003.safetensors", "global-00003.safetensors", "reference-00003.safetensors", "state.json"]


def test_codec_names_are_documented_and_validated():
    docs = (REPO / "docs" / "configuration.md").read_text() + (REPO / "docs" / "communication.md").read_text()
    for name in ("upload_codec", "download_codec", "topk_fraction", "quant_granularity", "error_feedback"):
        assert f"`{name}`" in docs
    with pytest.raises(fedslip.ConfigError, match="upload_codec='int2' is not one of"):
        fedslip.make_config(upload_codec="int2")
    with pytest.raises(fedslip.ConfigError, match="topk_fraction must be in"):
        fedslip.make_config(topk_fraction=0.0)


def test_a_resent_download_gives_the_global_track_the_client_already_applied(tiny_cfg, tmp_path):
    """After a resume the server resends the download of its checkpoint's round, which a client may
    already have applied (and moved past): it gets the same global track, not an error."""
    cfg = tiny_cfg(method="fedavg_lora", download_codec="int8", num_clients=1)
    setup = prepare(cfg)
    server = Server(cfg, setup.model.global_state())
    client = build_clients(setup, RunDir(tmp_path))[0]
    downloads, references = [], []
    for round_idx in (1, 2, 3):
        downloads.append(server.broadcast())
        references.append(server.reference)
        assert all(torch.equal(client.receive(downloads[-1])[0][n], server.reference[n]) for n in server.layout)
        trained = {n: t + 0.01 * round_idx for n, t in server.reference.items()}
        server.aggregate({0: (comm.encode(trained), 5)}, round_idx=round_idx)
    client.receive(server.broadcast())  # the client moves on to round 3's global track
    again, made = client.receive(downloads[2])  # round 2's download, resent
    assert made == 2 and all(torch.equal(again[n], references[2][n]) for n in again)
