"""FedSLIP's guarantees on the tiny backbone: privacy of the private track, the mask, the gradient
separation, FedProx, the private schedule, persistence, predict/export."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, BertConfig

import fedslip
from fedslip import comm, masking
from fedslip.client import Client, backward_step, evaluate, proximal_term, run_seed, step_schedule, train_local
from fedslip.data import eval_batches, train_batches
from fedslip.experiment import RunDir, build_clients, prepare
from fedslip.inference import RunModel
from fedslip.model import GLOBAL, PRIVATE, TINY_BERT
from fedslip.server import Server


@pytest.fixture(scope="module")
def fedslip_run(tmp_path_factory, data_dir, request):
    """3 rounds, 3 clients, a private head, every serialized message recorded, and each client's live
    evaluation of its inference model on its own test rows after the last round (``live_final``: cid -> result)."""
    out = tmp_path_factory.mktemp("runs") / "fedslip"
    cfg = fedslip.make_config(dict(method="fedslip", backbone="tiny", data_dir=str(data_dir), rounds=3,
                                   num_clients=3, samples_per_client=32, test_samples_per_client=16,
                                   global_test_samples=64, batch_size=16, kstep=0, precision="fp32",
                                   private_warmup_rounds=0, private_target_sparsity=0.5,
                                   private_prune_rate=0.3, private_head="classifier"))
    messages: list[bytes] = []
    live_final: dict[int, dict] = {}
    original, original_evaluate = comm.encode, Client.evaluate

    def evaluate(self, payload, views=(None,), after_round=float("inf")):
        results = original_evaluate(self, payload, views, after_round)
        if after_round == cfg.rounds and None in views:
            live_final[self.cid] = results[list(views).index(None)]
        return results

    mp = pytest.MonkeyPatch()
    mp.setattr(comm, "encode", lambda tensors: messages.append(original(tensors)) or messages[-1])
    mp.setattr(Client, "evaluate", evaluate)
    try:
        summary = fedslip.run(cfg, out, progress=False)
    finally:
        mp.undo()
    return out, cfg, summary, messages, live_final


def test_no_message_carries_a_private_tensor(fedslip_run):
    out, cfg, summary, messages, _ = fedslip_run
    assert len(messages) >= cfg.rounds * cfg.num_clients
    private_values = [t for c in range(cfg.num_clients)
                      for t in load_file(out / "clients" / str(c) / "private.safetensors").values()]
    for payload in messages:
        for name, tensor in comm.decode(payload).items():
            assert f".{PRIVATE}." not in name
            assert not any(t.shape == tensor.shape and torch.equal(t, tensor) for t in private_values)
    assert summary["private_bytes_transmitted"] == 0
    assert all(json.loads(line)["private_bytes_transmitted"] == 0
               for line in (out / "metrics.jsonl").read_text().splitlines())


def test_fedslip_sends_exactly_the_baseline_bytes(fedslip_run, tmp_path):
    out, cfg, summary, *_ = fedslip_run
    base = fedslip.run(fedslip.make_config({**cfg.to_dict(), "method": "fedavg_lora", "private_track": False,
                                            "objective": "global_only", "private_head": "none",
                                            "private_phase": "interleaved",
                                            "rounds": 1}), tmp_path / "b",
                       progress=False)
    assert base["comm_bytes_per_round"] == summary["comm_bytes_per_round"]


def test_private_state_stays_in_the_client_directories(fedslip_run):
    out, cfg, *_ = fedslip_run
    server_side = [p for p in out.rglob("*.safetensors") if "clients" not in p.parts]
    # the global track (checkpoint, final, as a peft adapter) and the tiny backbone the adapter names
    assert sorted(str(p.relative_to(out)) for p in server_side) == [
        "adapter/adapter_model.safetensors", "base/model.safetensors", "checkpoint/global-00003.safetensors",
        "global.safetensors"]
    for path in server_side:
        assert not any(f".{PRIVATE}." in k for k in load_file(path))
    # a private head cannot be a peft adapter: no client adapter here (tests/test_export.py has them)
    for c in range(cfg.num_clients):
        names = sorted(p.name for p in (out / "clients" / str(c)).iterdir())
        assert names == ["mask.prev.safetensors", "mask.safetensors", "private.prev.safetensors",
                         "private.safetensors", "rows.json"]


def test_mask_is_binary_reaches_target_on_schedule_and_zeros_stay_zero(fedslip_run):
    out, cfg, summary, *_ = fedslip_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # prune 30% of the survivors per round, capped at 50%: 0.3, 0.5 (capped), 0.5
    expected = [0.3, 0.5, 0.5]
    for row, want in zip(rows, expected):
        assert all(abs(s - want) < 0.01 for s in row["private_sparsity"].values()), row["private_sparsity"]
    for c in range(cfg.num_clients):
        mask = load_file(out / "clients" / str(c) / "mask.safetensors")
        weights = load_file(out / "clients" / str(c) / "private.safetensors")
        assert set(mask) == {n for n in weights if not n.startswith("head.")}, "the private head is never pruned"
        assert torch.count_nonzero(weights["head.private.weight"]) > 0, "the private head trained"
        for name, m in mask.items():
            assert set(m.unique().tolist()) <= {0, 1}
            assert torch.all(weights[name][m == 0] == 0)


def test_masked_entries_get_no_update_during_training(tiny_cfg, tmp_path):
    cfg = tiny_cfg(method="fedslip", private_warmup_rounds=0, private_target_sparsity=0.6, private_prune_rate=0.6,
                   num_clients=1, rounds=2)
    setup, client = single_client(cfg, tmp_path)
    payload = comm.encode(setup.model.global_state())
    client.fit(payload, 1)  # prunes at the end of round 1
    mask = client.store.load("mask")
    client.fit(payload, 2)  # trains with the mask; target reached, no more pruning
    assert all(torch.equal(mask[k], client.store.load("mask")[k]) for k in mask)
    assert abs(masking.sparsity(mask) - 0.6) < 0.01
    weights = client.store.load("private")
    assert all(torch.all(weights[n][~m] == 0) for n, m in mask.items())
    assert any(torch.any(weights[n][m] != 0) for n, m in mask.items())


def single_client(cfg, tmp_path):
    """The setup of ``cfg`` and its client 0, with its state in ``tmp_path/clients/0``."""
    setup = prepare(cfg)
    return setup, build_clients(setup, RunDir(tmp_path))[0]


def grads(params):
    return {n: None if p.grad is None else p.grad.clone() for n, p in params.items()}


def is_zero(g):
    return all(v is None or torch.count_nonzero(v) == 0 for v in g.values())


@pytest.fixture
def two_track(tiny_cfg):
    cfg = tiny_cfg(method="fedslip")
    setup = prepare(cfg)
    model = setup.model
    torch.manual_seed(1)
    model.load_private_state({n: torch.randn_like(t) * 0.1 for n, t in model.private_state().items()})
    model.load_global_state({n: t + torch.randn_like(t) * 0.1 for n, t in model.global_state().items()})
    batch = next(train_batches(setup.tokenizer, setup.clients[0].train, 8, torch.Generator().manual_seed(0), 1))
    return cfg, model, batch


def zero(model):
    for p in list(model.global_params.values()) + list(model.private_params.values()):
        p.grad = None


def ce_grads(model, batch, tracks, params):
    """Gradient of CE on ``tracks``' logits w.r.t. ``params``, computed here with torch.autograd.grad."""
    loss = torch.nn.functional.cross_entropy(model.logits(batch, tracks), batch["labels"])
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def test_detach_separates_the_gradients(two_track):
    cfg, model, batch = two_track
    g, p = model.global_params, model.private_params
    with model.eval_mode():  # no dropout: comparable gradients
        global_alone = ce_grads(model, batch, (GLOBAL,), g)  # L_g reaches g only
        private_alone = ce_grads(model, batch, (GLOBAL, PRIVATE), p)  # L_p w.r.t. p
        private_to_global = ce_grads(model, batch, (GLOBAL, PRIVATE), g)  # what detach=false adds to g
        # the full step: each track got exactly its own loss
        zero(model)
        backward_step(model, batch, cfg, True, None, 0.0)
        for n, grad in grads(g).items():
            assert torch.allclose(grad, global_alone[n], atol=1e-6)
        for n, grad in grads(p).items():
            assert torch.allclose(grad, private_alone[n], atol=1e-6)
        # only the global loss when the private track does not train
        zero(model)
        backward_step(model, batch, cfg, False, None, 0.0)
        assert is_zero(grads(p))
        # ablation detach=false: the private loss now also reaches the global track
        zero(model)
        cfg_nd = fedslip.make_config({**cfg.to_dict(), "detach": False})
        backward_step(model, batch, cfg_nd, True, None, 0.0)
        for n, grad in grads(g).items():
            assert torch.allclose(grad, global_alone[n] + private_to_global[n], atol=1e-6)


def test_fedprox_term_matches_hand_computation():
    params = {"a": torch.nn.Parameter(torch.tensor([1.0, 2.0])), "b": torch.nn.Parameter(torch.tensor([[3.0]]))}
    ref = {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([[1.0]])}
    # (0.1 / 2) * ((1 + 4) + 4) = 0.45
    assert proximal_term(params, ref, 0.1).item() == pytest.approx(0.45)
    proximal_term(params, ref, 0.1).backward()
    assert torch.allclose(params["a"].grad, torch.tensor([0.1, 0.2]))  # mu * (w - w_ref)


@pytest.mark.parametrize("method", ["fedavg_lora", "dual_naive", "fedslip"])
def test_fedprox_adds_exactly_mu_times_the_drift_on_every_step(tiny_cfg, method):
    """Several consecutive local steps, the first right after an evaluation: on each, the gradient with
    FedProx minus the gradient without it is mu * (w - w_round) on every global tensor and zero on
    every private tensor, whatever the previous call (evaluation, private pass) left behind."""
    mu = 0.5
    cfg = tiny_cfg(method=method, fedprox_mu=mu)
    setup = prepare(cfg)
    model = setup.model
    round_start = model.global_state()
    torch.manual_seed(1)  # start away from w_round, so that every step has a drift to pull back
    model.load_global_state({n: t + torch.randn_like(t) * 0.1 for n, t in round_start.items()})
    params = {**model.global_params, **model.private_params}
    batches = list(train_batches(setup.tokenizer, setup.clients[0].train, 8, torch.Generator().manual_seed(0), 4))
    sgd = torch.optim.SGD(params.values(), lr=0.5)
    with model.eval_mode():
        evaluate(model, setup.tokenizer, setup.clients[0].test, model.inference_tracks(), 8, cfg.num_labels)
        for step, batch in enumerate(batches):
            zero(model)
            backward_step(model, batch, cfg, True, round_start, mu)
            with_prox = grads(params)
            zero(model)
            backward_step(model, batch, cfg, True, None, 0.0)
            plain = grads(params)
            drift = {n: p.detach() - round_start[n] for n, p in model.global_params.items()}
            assert all(d.abs().max() > 1e-3 for d in drift.values())
            for n in model.global_params:
                assert torch.allclose(with_prox[n] - plain[n], mu * drift[n], rtol=1e-4, atol=1e-6), (step, n)
            for n in model.private_params:
                assert (with_prox[n] is None) == (plain[n] is None) and (
                    plain[n] is None or torch.equal(with_prox[n], plain[n])), (step, n)
            for n, p in params.items():  # take the FedProx step, so the next step starts elsewhere
                p.grad = with_prox[n]
            sgd.step()


def test_client_fit_pulls_the_global_track_toward_the_received_one_by_fedprox_mu(tiny_cfg, tmp_path):
    """The real path (Client.fit): the same client and data, 8 local steps from a received global track away
    from the backbone's initial one. FedProx pulls the reply toward what was received: measured, the drift
    ||sent - received|| is ~2.2 at mu 0 and ~0.13 at mu 100 (Adam's steps oscillate around the received
    track). With mu not handed to the step the two are equal; with another reference (the initial track,
    zeros) the pull goes elsewhere and the drift grows."""
    torch.manual_seed(3)
    drift = {}
    for mu in (0.0, 100.0):
        cfg = tiny_cfg(method="fedslip", num_clients=1, local_steps=8, fedprox_mu=mu, private_warmup_rounds=0)
        setup, client = single_client(cfg, tmp_path / f"mu{mu}")
        if not drift:
            received = {n: t + 0.05 * torch.randn_like(t) for n, t in setup.model.global_state().items()}
        sent = comm.decode(client.fit(comm.encode(received), 1).payload)
        drift[mu] = float(torch.sqrt(sum(((sent[n] - received[n]) ** 2).sum() for n in received)))
    assert drift[100.0] < drift[0.0] / 5, drift


def test_private_every_k_takes_the_private_step_on_every_kth_batch_only(tiny_cfg, tmp_path):
    cfg = tiny_cfg(method="fedslip", private_warmup_rounds=0, private_target_sparsity=0.0, private_every=2,
                   private_phase="interleaved", num_clients=1)
    setup, client = single_client(cfg, tmp_path)
    model = setup.model
    start = {"private": model.private_state(), "global": model.global_state()}
    after = {}
    for steps in (1, 2, 3):  # same start and seed: the first steps of each run are the same steps
        model.load_private_state(start["private"])
        model.load_global_state(start["global"])
        train_local(model, setup.tokenizer, client.train, cfg, steps, True, None, None, seed=3)
        after[steps] = {"private": model.private_state(), "global": model.global_state()}
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert not same(after[1]["private"], start["private"]), "step 0 trains the private track"
    assert same(after[2]["private"], after[1]["private"]), "step 1 does not"
    assert not same(after[3]["private"], after[2]["private"]), "step 2 does again"
    assert not same(after[2]["global"], after[1]["global"]), "the global track trains on every step"


def test_step_schedule_of_each_private_phase(tiny_cfg):
    cfg = tiny_cfg(method="fedslip", private_every=2, private_phase="interleaved")
    # (shared global track, private track, local parts of the global adapter)
    assert step_schedule(cfg, 4, True) == [(True, True, False), (True, False, False)] * 2
    assert step_schedule(cfg, 4, False) == [(True, False, False)] * 4
    first = tiny_cfg(method="fedslip", private_every=2, private_phase="first")
    assert step_schedule(first, 3, True) == [(False, True, False)] * 2 + [(True, False, False)] * 3
    assert step_schedule(first, 3, False) == [(True, False, False)] * 3
    longer = tiny_cfg(method="fedslip", private_every=2, private_phase="first", private_local_steps=5)
    assert step_schedule(longer, 3, True) == [(False, True, False)] * 5 + [(True, False, False)] * 3
    assert step_schedule(longer, 3, False) == [(True, False, False)] * 3
    with pytest.raises(fedslip.ConfigError, match="private_phase"):
        tiny_cfg(method="dual_naive", private_phase="first")
    with pytest.raises(fedslip.ConfigError, match="private_local_steps needs private_phase='first'"):
        tiny_cfg(method="fedslip", private_phase="interleaved", private_local_steps=3)


@pytest.mark.parametrize("phase", ["first", "interleaved"])
def test_private_phase_first_trains_against_the_global_track_as_received(tiny_cfg, tmp_path, phase):
    """With ``first`` the private track ends the same whatever the global track does afterwards (its
    learning rate here); interleaved, it trains against the moving local global track."""
    cfg = tiny_cfg(method="fedslip", private_warmup_rounds=0, private_target_sparsity=0.0, private_phase=phase,
                   num_clients=1)
    setup, client = single_client(cfg, tmp_path)
    model = setup.model
    start = {"private": model.private_state(), "global": model.global_state()}
    private_after = []
    for lr in (1e-3, 1e-1):
        model.load_private_state(start["private"])
        model.load_global_state(start["global"])
        train_local(model, setup.tokenizer, client.train, cfg, 3, True, None, None, seed=3, lr=lr)
        private_after.append(model.private_state())
    same = all(torch.equal(private_after[0][k], private_after[1][k]) for k in private_after[0])
    assert same == (phase == "first")


def test_warmup_and_freeze_keep_the_private_track_unchanged(tiny_cfg, tmp_path):
    cfg = tiny_cfg(method="fedslip", private_warmup_rounds=1, private_freeze_round=2, num_clients=1,
                   rounds=3, private_target_sparsity=0.0)
    setup, client = single_client(cfg, tmp_path)
    server = Server(cfg, setup.model.global_state())
    snapshots = []
    for r in (1, 2, 3):
        reply = client.fit(server.broadcast(), r)
        server.aggregate({0: (reply.payload, reply.num_examples)})
        snapshots.append(client.store.load("private"))
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert not same(snapshots[0], snapshots[1]), "round 2 trains the private track"
    assert same(snapshots[1], snapshots[2]), "after the freeze round the private track is unchanged"


def test_warmup_round_leaves_the_fresh_private_track_untouched(tiny_cfg, tmp_path):
    cfg = tiny_cfg(method="fedslip", private_warmup_rounds=1, num_clients=1, private_target_sparsity=0.0)
    setup, client = single_client(cfg, tmp_path)
    before = setup.model.global_state()
    client.fit(comm.encode(before), 1)
    fresh = setup.model.fresh_private_state(run_seed(cfg.seed, 0, 0, 7))
    after = client.store.load("private")
    assert all(torch.equal(after[k], fresh[k]) for k in fresh)


def test_each_clients_personalized_model_is_also_measured_on_the_global_test_set(fedslip_run):
    out, cfg, summary, *_ = fedslip_run
    setup = prepare(cfg)
    for c in range(cfg.num_clients):
        model = RunModel(out, client=c)
        with torch.inference_mode(), model.model.eval_mode():
            hits = torch.cat([model.model.logits(b, model.tracks).argmax(-1) == b["labels"]
                              for _, b in eval_batches(setup.tokenizer, setup.global_eval, 64)])
        expected = float(hits.float().mean())
        assert summary["personalized_global_test_accuracy_per_client"][c] == pytest.approx(expected)
    assert summary["worst_client_personalized_accuracy"] == min(summary["personalized_accuracy_per_client"])


def test_restored_private_state_gives_the_live_runs_loss(fedslip_run):
    """A client's model read back from the run directory (global.safetensors + its private state) scores its
    test rows with the loss the live run measured after the last round, to rel 1e-6: the files hold the
    state the run ended with, not merely a state that loads."""
    out, cfg, *_, live = fedslip_run
    assert sorted(live) == list(range(cfg.num_clients))
    setup = prepare(cfg)
    for cid in range(cfg.num_clients):
        restored = RunModel(out, client=cid)  # a fresh backbone, state read back from files
        result = evaluate(restored.model, setup.tokenizer, setup.clients[cid].test, restored.tracks,
                          cfg.eval_batch_size, cfg.num_labels)
        assert result["loss"] == pytest.approx(live[cid]["loss"], rel=1e-6), cid
        assert result["accuracy"] == live[cid]["accuracy"]
    texts = ["stocks profit market news", "team coach match"]
    a = RunModel(out, client=1).logits(texts)
    g = RunModel(out, client=1, use_private=False).logits(texts)
    assert not torch.allclose(a, g), "the private track must matter for the personalized prediction"


def test_export_reproduces_predict(fedslip_run, tmp_path):
    out, cfg, *_ = fedslip_run
    texts = ["stocks profit market news", "team coach match", "war minister election today"]
    run_model = RunModel(out, client=2)
    expected = run_model.logits(texts)
    predictions = [p.label for p in run_model.predict(texts)]
    export_dir = RunModel(out, client=2).export(tmp_path / "export")
    plain = AutoModelForSequenceClassification.from_pretrained(export_dir).eval()
    tok = run_model.tokenizer
    with torch.inference_mode():
        logits = plain(**tok(texts, return_tensors="pt", padding=True, truncation=True,
                             max_length=cfg.max_seq_len)).logits
    assert torch.allclose(logits, expected, atol=1e-4)
    assert logits.argmax(-1).tolist() == predictions
    assert plain.config.id2label[0] == "World"


def test_predict_cli(fedslip_run):
    out, *_ = fedslip_run
    res = run_cli("predict", "--run", out, "--client", "0", "--json", "team coach match")
    assert res.returncode == 0, res.stderr
    row = json.loads(res.stdout.splitlines()[0])
    assert row["class_name"] in fedslip.make_config().class_names
    bad = run_cli("predict", "--run", out, "--client", "9", "x")
    assert bad.returncode == 2 and "client 9 does not exist" in bad.stderr


def test_dual_naive_transmits_lora_plus_whole_head_and_trains_jointly(tiny_cfg, tmp_path):
    """dual_naive's upload is its global LoRA plus the whole classifier head (head="shared_full": every
    parameter of the classification model outside the encoder; for BERT the one ``classifier`` layer),
    as trained this round, and nothing private; both tracks learn from one loss on the combined logits,
    L = CE(f(x; g + p), y): the private track's gradient and the global track's come from that one loss."""
    cfg = tiny_cfg(method="dual_naive", num_clients=1)
    assert cfg.head == "shared_full"
    setup, client = single_client(cfg, tmp_path)
    model = setup.model
    sent = model.global_state()
    upload = comm.decode(client.fit(comm.encode(sent), 1).payload)

    plain = AutoModelForSequenceClassification.from_config(
        BertConfig(vocab_size=len(setup.tokenizer), num_labels=cfg.num_labels, **TINY_BERT))
    whole_head = {n: p.shape for n, p in plain.named_parameters() if not n.startswith("bert.")}
    assert set(whole_head) == {"classifier.weight", "classifier.bias"}
    head_in_upload = {n.replace("base_model.model.", "").replace(".modules_to_save.global", ""): t
                      for n, t in upload.items() if "lora_" not in n}
    assert {n: t.shape for n, t in head_in_upload.items()} == whole_head
    lora = [n for n in upload if "lora_" in n]
    assert len(lora) == 2 * 2 * 2 and all(".global." in n for n in lora)  # layers x (query, value) x (A, B)
    assert not any(f".{PRIVATE}." in n for n in upload)
    trained = model.global_state()
    for n, t in upload.items():  # sent as trained: the client's tensors, moved away from the broadcast
        assert torch.equal(t, trained[n]) and not torch.equal(t, sent[n]), n

    torch.manual_seed(1)  # a private track that changes the logits, so that joint and separate losses differ
    model.load_private_state({n: torch.randn_like(t) * 0.1 for n, t in model.private_state().items()})
    batch = next(train_batches(setup.tokenizer, setup.clients[0].train, 8, torch.Generator().manual_seed(0), 1))
    g, p = model.global_params, model.private_params
    with model.eval_mode():
        joint_to_global = ce_grads(model, batch, (GLOBAL, PRIVATE), g)
        joint_to_private = ce_grads(model, batch, (GLOBAL, PRIVATE), p)
        global_alone = ce_grads(model, batch, (GLOBAL,), g)
        zero(model)
        backward_step(model, batch, cfg, True, None, 0.0)
    for n, grad in grads(g).items():
        assert torch.allclose(grad, joint_to_global[n], atol=1e-6), n
    assert any(not torch.allclose(grads(g)[n], global_alone[n], atol=1e-6) for n in g)
    for n, grad in grads(p).items():
        assert grad is not None and torch.allclose(grad, joint_to_private[n], atol=1e-6), n
    assert not is_zero(grads(p))


def test_prune_per_matrix_and_global_remove_the_smallest_magnitudes():
    """Matrix "a" holds only small weights: per matrix, half of each matrix goes (a keeps its larger half);
    globally, one threshold over both removes all of "a" and none of "b"."""
    w = {"a": torch.tensor([[0.1, -0.4], [0.3, 0.2]]), "b": torch.tensor([5.0, -7.0, 9.0, 6.0])}
    m = masking.prune(w, masking.full_mask(w), 0.5, "matrix")
    assert m["a"].tolist() == [[False, True], [True, False]]
    assert m["b"].tolist() == [False, True, True, False]
    g = masking.prune(w, masking.full_mask(w), 0.5, "global")
    assert g["a"].tolist() == [[False, False], [False, False]] and g["b"].tolist() == [True, True, True, True]
    g2 = masking.prune(w, g, 0.5, "global")  # survivors 5, -7, 9, 6 -> drop 5 and 6
    assert masking.sparsity(g2) == 0.75 and g2["b"].tolist() == [False, True, True, False]
    assert masking.step_rate(0.0, 0.5, 0.2) == 0.2
    assert masking.step_rate(0.45, 0.5, 0.2) == pytest.approx(1 - 0.5 / 0.55)
    assert masking.step_rate(0.5, 0.5, 0.2) == 0.0


def test_rewind_resets_survivors_to_the_rewind_point(tiny_cfg, tmp_path):
    cfg = tiny_cfg(method="fedslip", private_warmup_rounds=0, private_target_sparsity=0.5,
                   private_prune_rate=0.5, private_rewind_round=0, num_clients=1)
    setup, client = single_client(cfg, tmp_path)
    client.fit(comm.encode(setup.model.global_state()), 1)
    init, mask, after = client.store.load("rewind"), client.store.load("mask"), client.store.load("private")
    assert all(torch.equal(after[n], init[n] * mask[n]) for n in init)
    assert abs(masking.sparsity(mask) - 0.5) < 0.01
