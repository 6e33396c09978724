"""K-step, one protocol for every method: ``kstep`` AdamW steps at ``kstep_lr`` on the client's own rows,
on the loss of the method's inference model, training the tensors that model uses (or its head alone)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fedslip import masking
from fedslip.client import kstep_train
from fedslip.data import train_batches
from fedslip.experiment import RunDir, build_clients, prepare
from fedslip.model import GLOBAL, PRIVATE

STEPS = 3


def _setup(tiny_cfg, tmp_path, **overrides):
    cfg = tiny_cfg(num_clients=1, kstep_lr=0.05, lr=1e-4, private_lr=1e-4, fedprox_mu=0.0 if "fedprox_mu" not in
                   overrides else overrides.pop("fedprox_mu"), **overrides)
    setup = prepare(cfg)
    client = build_clients(setup, RunDir(tmp_path))[0]
    model = setup.model
    torch.manual_seed(1)  # a private track away from zero, so that both tracks shape the logits
    model.load_private_state({n: torch.randn_like(t) * 0.05 for n, t in model.private_state().items()})
    model.load_global_state({n: t + torch.randn_like(t) * 0.05 for n, t in model.global_state().items()})
    return cfg, setup, client, model


def _state(model):
    return {**model.global_state(), **{n: p.detach().clone() for n, p in model.local_params.items()},
            **model.private_state()}


def _changed(before, after):
    return {n for n in before if not torch.equal(before[n], after[n])}


@pytest.mark.parametrize("method", ["fedslip", "fedavg_lora", "ditto", "fedper", "feddpa_fixed", "fedbabu"])
def test_kstep_is_adamw_at_kstep_lr_on_the_inference_models_loss(method, tiny_cfg, tmp_path):
    """The expected parameters are computed independently: the same batches, CE of the inference
    tracks' logits, one torch AdamW at kstep_lr over the tensors the inference model uses, step by step.
    Fails if K-step trains another set of tensors, at another rate, adds FedProx, or takes other steps."""
    cfg, setup, client, model = _setup(tiny_cfg, tmp_path, method=method, fedprox_mu=0.5)
    start = _state(model)
    kstep_train(model, setup.tokenizer, client.train, cfg, STEPS, None, seed=7)
    got = _state(model)

    model.load_global_state({n: start[n] for n in model.global_params})
    model.load_private_state({n: start[n] for n in model.private_state()})
    for n, p in model.local_params.items():
        p.data.copy_(start[n])
    tracks = model.inference_tracks()
    used = {**(model.global_params if GLOBAL in tracks else {}), **(model.local_params if GLOBAL in tracks else {}),
            **(model.private_params if PRIVATE in tracks else {})}
    optimizer = torch.optim.AdamW(list(used.values()), lr=0.05, weight_decay=cfg.weight_decay)
    torch.manual_seed(7)
    model.model.train()
    for batch in train_batches(setup.tokenizer, client.train, cfg.batch_size, torch.Generator().manual_seed(7),
                               STEPS, cfg.group_by_length):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model.logits(batch, tracks), batch["labels"]).backward(inputs=list(used.values()))
        optimizer.step()
    expected = _state(model)
    assert _changed(start, got) == _changed(start, expected) == set(used)
    for n in got:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-7)


def test_the_head_only_variant_trains_the_classifier_head_alone(tiny_cfg, tmp_path):
    cfg, setup, client, model = _setup(tiny_cfg, tmp_path, method="fedbabu", kstep_params="head")
    start = _state(model)
    kstep_train(model, setup.tokenizer, client.train, cfg, STEPS, None, seed=7)
    changed = _changed(start, _state(model))
    assert changed == set(model.local_params) and all(".modules_to_save." in n for n in changed)


def test_fedslip_kstep_trains_both_tracks_and_keeps_the_mask(tiny_cfg, tmp_path):
    cfg, setup, client, model = _setup(tiny_cfg, tmp_path, method="fedslip")
    weights = model.private_state()
    mask = masking.prune(weights, masking.full_mask(weights, model.private_lora), 0.5, "matrix")
    model.load_private_state({n: w * mask[n] if n in mask else w for n, w in weights.items()})
    start = _state(model)
    kstep_train(model, setup.tokenizer, client.train, cfg, STEPS, mask, seed=7)
    after = model.private_state()
    assert _changed(start, _state(model)) >= set(model.global_params) | set(model.private_lora)
    for n, m in mask.items():
        assert torch.count_nonzero(after[n][~m]) == 0, n  # pruned weights stay pruned
        assert not torch.equal(after[n][m], start[n][m]), n  # kept ones trained


def test_the_equal_compute_kstep_spends_the_passes_the_other_method_spent(tiny_cfg, tmp_path):
    """fedslip's federation costs more passes than fedavg_lora's (its private phase); the matched
    K-step gives fedavg_lora those passes, and the record says so. 1.0x for fedavg_lora itself."""
    import fedslip
    base = fedslip.run(tiny_cfg(method="fedavg_lora", kstep=1), tmp_path / "fedavg", progress=False)
    other = fedslip.run(tiny_cfg(method="fedslip", private_warmup_rounds=0, kstep=0), tmp_path / "fedslip",
                        progress=False)
    assert base["training_passes_vs_fedavg_lora"] == 1.0
    assert other["training_passes_vs_fedavg_lora"] == 2.0  # private phase as long as the global one, every round
    assert base["kstep_sample_passes"] == 4 * 16  # 4 clients x 1 step of 16 rows
    steps = fedslip.equal_compute_steps(tmp_path / "fedavg", tmp_path / "fedslip")
    extra = other["train_sample_passes"] - base["train_sample_passes"]
    assert steps == -(-extra // (4 * 16))
    result = fedslip.equal_compute_kstep(tmp_path / "fedavg", tmp_path / "fedslip")  # on test rows: chooses nothing
    assert result["kstep"] == steps and result["kstep_sample_passes"] == steps * 4 * 16
    assert result["kstep_passes_vs_fedavg_lora"] == pytest.approx(
        (base["train_sample_passes"] + result["kstep_sample_passes"]) / base["reference_passes"])
    assert result["kstep_passes_vs_fedavg_lora"] >= other["training_passes_vs_fedavg_lora"]  # matched, rounded up
    summary = json.loads((tmp_path / "fedavg" / "summary.json").read_text())
    assert {k: summary[k] for k in ("equal_compute_kstep_accuracy", "equal_compute_kstep", "equal_compute_matched_to",
                                    "equal_compute_passes_vs_fedavg_lora")} == {
        "equal_compute_kstep_accuracy": result["kstep_accuracy"], "equal_compute_kstep": steps,
        "equal_compute_matched_to": str(tmp_path / "fedslip"),
        "equal_compute_passes_vs_fedavg_lora": result["kstep_passes_vs_fedavg_lora"]}
    assert summary["kstep_accuracy"] == base["kstep_accuracy"]  # the run's own K-step result stays
    with pytest.raises(fedslip.ConfigError, match="no more training passes"):
        fedslip.equal_compute_steps(tmp_path / "fedslip", tmp_path / "fedavg")

    from fedslip.report import build_report, find_runs

    results = build_report(find_runs([tmp_path / "fedavg", tmp_path / "fedslip"]), tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    row = f"| fedavg_lora + equal-compute K-step ({steps} steps) | – | – | – | {100 * result['kstep_accuracy']:.1f} |"
    assert row in report
    target = next(t for t in results["verdict"]["targets"] if t["reference_metric"] == "equal_compute_kstep_accuracy")
    assert target["mean"] == pytest.approx(100 * (other["personalized_accuracy"] - result["kstep_accuracy"]))
