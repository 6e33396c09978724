"""The field's personalization baselines by partial sharing (fedper, fedrep, fedbabu, fedsa_lora): each
preset's defining rule, and the rule they share: a local part never travels, in any message."""

from __future__ import annotations

import json

import pytest
import torch

import fedslip
from fedslip import client as client_mod
from fedslip import comm
from fedslip.client import Client, evaluate, step_schedule, train_local
from fedslip.experiment import RunDir, build_clients, prepare
from fedslip.model import GLOBAL, PRIVATE
from fedslip.server import Server
from fedslip.storage import load_tensors

PARTIAL = ["fedper", "fedrep", "fedbabu", "fedsa_lora"]


def test_each_preset_keeps_its_part_local(tiny_cfg):
    for method in PARTIAL:
        model = prepare(tiny_cfg(method=method)).model
        local, shared = set(model.local_params), set(model.global_params)
        assert local and shared and not local & shared
        if method == "fedsa_lora":  # every B matrix local; every A matrix and the head shared
            assert all(".lora_B." in n for n in local) and not any(".lora_B." in n for n in shared)
            assert any(".lora_A." in n for n in shared) and any(".modules_to_save." in n for n in shared)
        else:  # the classifier head local; the whole LoRA body shared
            assert all(".modules_to_save." in n for n in local) and not any(".modules_to_save." in n for n in shared)
            assert {".lora_A." in n for n in shared} == {True, False}  # A and B matrices


def test_schedules_say_what_each_batch_trains(tiny_cfg):
    # (shared global track, private track, local parts)
    fedper = tiny_cfg(method="fedper")
    assert step_schedule(fedper, 3, False) == [(True, False, True)] * 3
    fedrep = tiny_cfg(method="fedrep")
    assert step_schedule(fedrep, 3, False) == [(False, False, True)] * 3 + [(True, False, False)] * 3
    assert step_schedule(tiny_cfg(method="fedrep", local_first_steps=5), 3, False) == \
        [(False, False, True)] * 5 + [(True, False, False)] * 3
    fedbabu = tiny_cfg(method="fedbabu")
    assert step_schedule(fedbabu, 3, False) == [(True, False, False)] * 3
    assert step_schedule(tiny_cfg(method="fedsa_lora"), 2, False) == [(True, False, True)] * 2


def _snapshots(monkeypatch, model):
    """The model's shared and local tensors before every local step (and after the last, appended later)."""
    taken = []
    real = client_mod.backward_step

    def recording(m, *args, **kwargs):
        taken.append((m.global_state(), {n: p.detach().clone() for n, p in m.local_params.items()}))
        return real(m, *args, **kwargs)

    monkeypatch.setattr(client_mod, "backward_step", recording)
    return taken


def _same(a, b):
    return all(torch.equal(a[n], b[n]) for n in a)


def _train(tiny_cfg, tmp_path, monkeypatch, steps, **overrides):
    cfg = tiny_cfg(**overrides)
    setup = prepare(cfg)
    client = build_clients(setup, RunDir(tmp_path))[0]
    model = setup.model
    taken = _snapshots(monkeypatch, model)
    train_local(model, setup.tokenizer, client.train, cfg, steps, False, None, None, seed=3)
    taken.append((model.global_state(), {n: p.detach().clone() for n, p in model.local_params.items()}))
    return taken


def test_fedrep_body_does_not_move_during_the_head_phase_nor_the_head_during_the_body_phase(
        tiny_cfg, tmp_path, monkeypatch):
    taken = _train(tiny_cfg, tmp_path, monkeypatch, 2, method="fedrep", local_first_steps=3)
    assert len(taken) == 6  # 3 head steps + 2 body steps, and the end
    for before, after in zip(taken[:3], taken[1:4]):  # head phase
        assert _same(before[0], after[0]) and not _same(before[1], after[1])
    for before, after in zip(taken[3:5], taken[4:6]):  # body phase
        assert not _same(before[0], after[0]) and _same(before[1], after[1])


def test_fedper_trains_head_and_body_on_every_batch(tiny_cfg, tmp_path, monkeypatch):
    taken = _train(tiny_cfg, tmp_path, monkeypatch, 3, method="fedper")
    for before, after in zip(taken, taken[1:]):
        assert not _same(before[0], after[0]) and not _same(before[1], after[1])


def test_fedbabu_head_stays_at_its_initialization_during_federation(tiny_cfg, tmp_path, monkeypatch):
    taken = _train(tiny_cfg, tmp_path / "fed", monkeypatch, 3, method="fedbabu")
    for before, after in zip(taken, taken[1:]):
        assert not _same(before[0], after[0]) and _same(before[1], after[1])


def _capture_messages(monkeypatch) -> list[bytes]:
    """Every payload of a run as it is sent: each download (``Server.broadcast``) and each upload."""
    messages = []
    real_reply, real_broadcast = Client.reply_payload, Server.broadcast
    monkeypatch.setattr(Client, "reply_payload", lambda self, *a: messages.append(real_reply(self, *a)) or messages[-1])
    monkeypatch.setattr(Server, "broadcast", lambda self: messages.append(real_broadcast(self)) or messages[-1])
    return messages


@pytest.mark.parametrize("method", PARTIAL)
def test_local_parts_never_travel_and_stay_with_their_client(tiny_cfg, tmp_path, monkeypatch, method):
    """Every message of a run (each download, each upload), by name and by value: no local part; the
    server's global track holds the shared parts only; each client's local parts are in its state."""
    messages = _capture_messages(monkeypatch)
    cfg = tiny_cfg(method=method, rounds=2, kstep=2)
    summary = fedslip.run(cfg, tmp_path / "run", progress=False, log=False)
    model = prepare(cfg).model
    shared, local_names = set(model.global_params), set(model.local_params)
    assert summary["private_bytes_transmitted"] == 0 and summary["kstep_accuracy"] is not None
    assert set(load_tensors(tmp_path / "run" / "global.safetensors")) == shared
    kept = [load_tensors(tmp_path / "run" / "clients" / str(c) / "private.safetensors") for c in range(cfg.num_clients)]
    assert all(set(k) == local_names for k in kept)
    for payload in messages:
        tensors = comm.decode(payload)
        assert set(tensors) == shared and comm.private_bytes(payload, cfg.local_params) == 0
        for state in kept:  # by value: no local tensor of any client inside any message
            for name, value in state.items():
                assert not any(t.shape == value.shape and torch.equal(t, value) and value.abs().sum() > 0
                               for t in tensors.values()), (name, method)
    # the server's model (the global accuracy): the shared parts with the local parts' initial values
    setup = prepare(cfg)
    setup.model.load_global_state(load_tensors(tmp_path / "run" / "global.safetensors"))
    server_view = evaluate(setup.model, setup.tokenizer, setup.global_eval, (GLOBAL,), 8, cfg.num_labels)
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert server_view["loss"] == pytest.approx(last["global_loss"], rel=1e-5)
    trained = [k for k in kept if not _same(k, model.initial_local)]
    if method == "fedbabu":
        assert not trained  # the head never trains during federation
    else:
        assert len(trained) == cfg.num_clients and not _same(kept[0], kept[1])  # each client its own
    # the counter would see a local part by name
    leaked = comm.encode({**comm.decode(messages[0]), **kept[0]})
    assert comm.private_bytes(leaked, cfg.local_params) == sum(t.numel() * 4 for t in kept[0].values())


def test_fedsa_lora_sends_half_the_lora_bytes(tiny_cfg, tmp_path):
    sizes = {}
    for method in ("fedavg_lora", "fedsa_lora"):
        model = prepare(tiny_cfg(method=method)).model
        lora = lambda params: sum(p.numel() for n, p in params.items() if ".lora_" in n)  # noqa: E731
        sizes[method] = (lora(model.global_params), lora(model.local_params))
    # tiny: LoRA r=8 on query/value of a 32-wide BERT: A (8x32) and B (32x8) of equal size
    assert sizes["fedsa_lora"][0] * 2 == sizes["fedavg_lora"][0] == sizes["fedsa_lora"][1] * 2


def test_bad_partial_sharing_settings_are_refused(tiny_cfg):
    cases = [({"method": "fedper", "local_params": ["classifier"]}, "'classifier' not among head, lora_A, lora_B"),
             ({"method": "fedper", "local_params": ["head", "lora_A", "lora_B"]}, "nothing would be shared"),
             ({"method": "fedslip", "local_params": ["head"]}, "one track"),
             ({"method": "fedavg_lora", "local_phase": "first"}, "needs local_params"),
             ({"method": "fedper", "local_first_steps": 3}, "local_first_steps needs local_phase='first'"),
             ({"method": "fedrep", "local_first_steps": -1}, "local_first_steps must be >= 0")]
    for overrides, message in cases:
        with pytest.raises(fedslip.ConfigError, match=message):
            tiny_cfg(**overrides)


# --- ditto: a personal model per client, pulled toward the global track received -----------------------
def _ditto(tiny_cfg, tmp_path, **overrides):
    cfg = tiny_cfg(method="ditto", num_clients=1, **overrides)
    setup = prepare(cfg)
    client = build_clients(setup, RunDir(tmp_path))[0]
    return cfg, setup, client


def test_ditto_gradient_is_ce_of_the_personal_model_plus_lambda_times_the_pull(tiny_cfg, tmp_path):
    """Several consecutive steps: the personal model's gradient is CE's on its own logits plus
    lambda * (p - g_round) on every tensor; the global track's gradient does not depend on lambda."""
    lam = 0.7
    cfg, setup, client = _ditto(tiny_cfg, tmp_path, ditto_lambda=lam)
    model = setup.model
    received = model.global_state()
    model.load_private_state(model.fresh_private_state(0))
    torch.manual_seed(1)  # start away from g_round
    model.load_private_state({n: t + torch.randn_like(t) * 0.1 for n, t in model.private_state().items()})
    params = {**model.global_params, **model.private_params}
    batches = list(client_mod.train_batches(setup.tokenizer, client.train, 8, torch.Generator().manual_seed(0), 3))
    sgd = torch.optim.SGD(params.values(), lr=0.5)
    with model.eval_mode():
        for step, batch in enumerate(batches):
            for p in params.values():
                p.grad = None
            client_mod.backward_step(model, batch, cfg, True, received, 0.0)
            got = {n: p.grad.clone() for n, p in params.items()}
            ce_p = torch.nn.functional.cross_entropy(model.logits(batch, (PRIVATE,)), batch["labels"])
            ce_grads = dict(zip(model.private_params, torch.autograd.grad(ce_p, list(model.private_params.values()))))
            ce_g = torch.nn.functional.cross_entropy(model.logits(batch, (GLOBAL,)), batch["labels"])
            g_grads = dict(zip(model.global_params, torch.autograd.grad(ce_g, list(model.global_params.values()))))
            for n, p in model.private_params.items():
                pull = lam * (p.detach() - received[n.replace(".private.", ".global.")])
                assert pull.abs().max() > 1e-4
                assert torch.allclose(got[n], ce_grads[n] + pull, rtol=1e-4, atol=1e-6), (step, n)
            for n in model.global_params:
                assert torch.allclose(got[n], g_grads[n], rtol=1e-4, atol=1e-6), (step, n)
            sgd.step()


def test_ditto_lambda_zero_trains_the_personal_model_purely_locally(tiny_cfg, tmp_path):
    """With lambda = 0 the personal model ends the same whatever global track the client received; with
    lambda > 0 the global track pulls it."""
    ends = {}
    for lam in (0.0, 1.0):
        cfg, setup, client = _ditto(tiny_cfg, tmp_path / str(lam), ditto_lambda=lam)
        model = setup.model
        start_private, start_global = model.fresh_private_state(0), model.global_state()
        for shift in (0.0, 0.5):
            received = {n: t + shift for n, t in start_global.items()}
            model.load_global_state(received)
            model.load_private_state(start_private)
            train_local(model, setup.tokenizer, client.train, cfg, 3, True, None, received, seed=3)
            ends[lam, shift] = model.private_state()
    assert _same(ends[0.0, 0.0], ends[0.0, 0.5])
    assert not _same(ends[1.0, 0.0], ends[1.0, 0.5])


def test_ditto_starts_from_the_global_track_and_predicts_with_the_personal_model_alone(tiny_cfg, tmp_path):
    cfg, setup, client = _ditto(tiny_cfg, tmp_path)
    model = setup.model
    assert model.inference_tracks() == (PRIVATE,)
    assert set(map(model.global_name, model.private_params)) == set(model.global_params)  # same shape
    model.load_global_state({n: t + 0.25 for n, t in model.global_state().items()})
    fresh = model.fresh_private_state(0)
    assert all(torch.equal(fresh[n], model.global_params[model.global_name(n)].detach()) for n in fresh)


def test_ditto_sends_only_the_global_track(tiny_cfg, tmp_path, monkeypatch):
    messages = _capture_messages(monkeypatch)
    cfg = tiny_cfg(method="ditto", rounds=2, kstep=2)
    summary = fedslip.run(cfg, tmp_path / "run", progress=False, log=False)
    assert summary["private_bytes_transmitted"] == 0 and summary["kstep_accuracy"] is not None
    shared = set(prepare(cfg).model.global_params)
    personal = [load_tensors(tmp_path / "run" / "clients" / str(c) / "private.safetensors")
                for c in range(cfg.num_clients)]
    for payload in messages:
        tensors = comm.decode(payload)
        assert set(tensors) == shared
        assert not any(torch.equal(t, v) for state in personal for v in state.values() for t in tensors.values()
                       if t.shape == v.shape)


# --- feddpa_fixed: (1 - a) * g + a * p --------------------------------------------------------------------
def test_feddpa_fixed_mixes_the_tracks_with_its_weight_and_runs_each_alone_at_full_weight(tiny_cfg, tmp_path):
    a = 0.3
    cfg = tiny_cfg(method="feddpa_fixed", private_weight=a)
    setup = prepare(cfg)
    model = setup.model
    torch.manual_seed(0)  # B matrices away from zero, so both tracks change the output
    with torch.no_grad():
        for p in [*model.global_params.values(), *model.private_params.values()]:
            p.add_(torch.randn_like(p) * 0.2)
    layer = next(m for m in model.model.modules() if hasattr(m, "lora_A") and PRIVATE in m.lora_A)
    x = torch.randn(3, layer.in_features)

    def delta(track):
        return layer.lora_B[track](layer.lora_A[track](x)) * layer.lora_alpha[track] / layer.r[track]

    with model.eval_mode(), torch.no_grad():
        base = layer.base_layer(x)
        model.run_through((GLOBAL, PRIVATE))
        assert torch.allclose(layer(x), base + (1 - a) * delta(GLOBAL) + a * delta(PRIVATE), atol=1e-5)
        model.run_through((GLOBAL,))
        assert torch.allclose(layer(x), base + delta(GLOBAL), atol=1e-5)
        model.run_through((GLOBAL, PRIVATE))
        mixed = layer(x)
    fedslip_model = prepare(tiny_cfg(method="fedslip")).model  # private_weight 0: the tracks add
    assert fedslip_model.private_weight == 0 and not torch.allclose(mixed, base + delta(GLOBAL) + delta(PRIVATE))
    with pytest.raises(fedslip.ConfigError, match="private_weight must be in"):
        tiny_cfg(method="feddpa_fixed", private_weight=1.0)
    with pytest.raises(fedslip.ConfigError, match="additive dual-track"):
        tiny_cfg(method="fedavg_lora", private_weight=0.5)


def test_feddpa_fixed_runs_and_sends_only_the_global_track(tiny_cfg, tmp_path):
    summary = fedslip.run(tiny_cfg(method="feddpa_fixed", rounds=2, kstep=2), tmp_path / "run", progress=False,
                          log=False)
    assert summary["private_bytes_transmitted"] == 0 and summary["kstep_accuracy"] is not None
    assert not (tmp_path / "run" / "clients" / "0" / "adapter").exists()  # no peft adapter expresses the mix


def test_the_global_track_alone_of_partial_sharing_is_the_server_model_on_each_clients_rows(tiny_cfg, tmp_path):
    """``global_track_local_accuracy`` of a partial-sharing method: the shared parts with the local parts
    at their initial values (what the server holds), computed here independently on each client's rows;
    not the client's own model (its personalized accuracy)."""
    cfg = tiny_cfg(method="fedper", rounds=2, lr=0.02)
    out = tmp_path / "run"
    summary = fedslip.run(cfg, out, progress=False)
    setup = prepare(cfg)
    model = setup.model
    model.load_global_state(load_tensors(out / "global.safetensors"))
    model.reset_local()
    expected = [evaluate(model, setup.tokenizer, c.test, (GLOBAL,), cfg.eval_batch_size, cfg.num_labels)["accuracy"]
                for c in build_clients(setup, RunDir(tmp_path / "fresh"))]
    assert summary["global_track_local_accuracy_per_client"] == expected
    assert expected != summary["personalized_accuracy_per_client"]
