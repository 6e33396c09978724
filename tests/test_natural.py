"""Natural federations and their references: ``partition = "natural"`` (one client per value of a column),
the ``local`` lower bound (each client alone, nothing travels) and FedDPA's instance-wise weight (``feddpa``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import fedslip
from fedslip.client import Client, kstep_train
from fedslip.data import DataError, Encoded, batch_rows, collate, load_splits
from fedslip.experiment import prepare
from fedslip.inference import ExportError, RunModel
from fedslip.model import GLOBAL, PRIVATE
from fedslip.partition import Partition, partition_splits
from fedslip.storage import load_tensors

FDU_MTL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fdu_mtl"
# rows per domain of the FDU-MTL copy (its SOURCES.md: train kept, test): the counts the partition must give
FDU_MTL_TRAIN = {"apparel": 1565, "baby": 1459, "books": 1582, "camera_photo": 1359, "dvd": 1567,
                 "electronics": 1562, "health_personal_care": 1516, "imdb": 1600, "kitchen_housewares": 1577,
                 "magazines": 1019, "MR": 1600, "music": 1577, "software": 1302, "sports_outdoors": 1525,
                 "toys_games": 1585, "video": 1255}
DOMAINS = {"books": 30, "dvd": 22, "apparel": 40}  # train rows per domain; the test split has 10 per domain


def write_domains(root: Path) -> Path:
    """A two-class CSV pair with a ``domain`` column, rows of the domains interleaved in file order."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    for split, sizes in (("train", DOMAINS), ("test", dict.fromkeys(DOMAINS, 10))):
        rows = [(int(rng.integers(2)), "", f"{domain} review {i} {'good' if i % 2 else 'bad'}", domain)
                for domain, n in sizes.items() for i in range(n)]
        frame = pd.DataFrame(rows, columns=["label", "title", "description", "domain"]).sample(frac=1, random_state=5)
        frame.to_csv(root / f"{split}.csv", index=False)
    return root


@pytest.fixture(scope="module")
def domain_dir(tmp_path_factory) -> Path:
    return write_domains(tmp_path_factory.mktemp("domains"))


def natural_cfg(domain_dir: Path, **overrides):
    base = dict(method="fedavg_lora", backbone="tiny", data_dir=str(domain_dir), partition="natural",
                partition_by="domain", num_clients=3, class_names=["neg", "pos"], samples_per_client=1000,
                test_samples_per_client=1000, val_samples_per_client=0, global_test_samples=12, batch_size=8,
                rounds=1, kstep=0, precision="fp32")
    return fedslip.make_config({**base, **overrides})


def partition_of(cfg) -> Partition:
    train, test = load_splits(cfg)
    return partition_splits(cfg, train, test)


# --- partition = "natural" ------------------------------------------------------------------------------
def test_each_client_holds_exactly_its_groups_rows(domain_dir):
    """Computed independently from the CSV with pandas: client i = the i-th domain in sorted order; its test
    rows = its domain's rows of the test split; its train and validation rows = its domain's train rows,
    disjoint, with the validation count carved out."""
    train = pd.read_csv(domain_dir / "train.csv", keep_default_na=False)
    test = pd.read_csv(domain_dir / "test.csv", keep_default_na=False)
    p = partition_of(natural_cfg(domain_dir, val_samples_per_client=4))
    assert list(dict.fromkeys(train["domain"])) == ["dvd", "apparel", "books"]  # the file's order is not the clients'
    assert p.client_names == sorted(DOMAINS) == ["apparel", "books", "dvd"]
    for name, rows in zip(p.client_names, p.clients):
        group = set(np.flatnonzero(train["domain"] == name))
        assert set(rows.test) == set(np.flatnonzero(test["domain"] == name))
        assert set(rows.train) | set(rows.val) == group and not set(rows.train) & set(rows.val)
        assert len(rows.val) == 4 and len(rows.train) == DOMAINS[name] - 4
        positive = train["label"].to_numpy()[rows.train].mean()
        assert rows.proportions == pytest.approx([1 - positive, positive])
    assert len(p.global_test) == 12 and np.bincount(test["label"].to_numpy()[p.global_test]).min() >= 5


def test_sizes_cap_the_groups_and_a_client_does_not_depend_on_the_other_groups(domain_dir):
    capped = partition_of(natural_cfg(domain_dir, samples_per_client=25, test_samples_per_client=6,
                                      val_samples_per_client=3))
    assert [len(c.train) for c in capped.clients] == [25, 25, 19]  # dvd has 22 - 3 rows: all it has
    assert [len(c.test) for c in capped.clients] == [6, 6, 6] and [len(c.val) for c in capped.clients] == [3, 3, 3]
    alone = partition_of(natural_cfg(domain_dir, samples_per_client=25, test_samples_per_client=6,
                                     val_samples_per_client=3, natural_groups=["dvd"], num_clients=1))
    assert alone.client_names == ["dvd"] and alone.clients[0] == capped.clients[2]


def test_natural_settings_that_cannot_work_are_refused(domain_dir):
    with pytest.raises(DataError, match="gives 3 clients .* set num_clients = 3"):
        partition_of(natural_cfg(domain_dir, num_clients=4))
    with pytest.raises(DataError, match=r"natural_groups \['toys'\] are not values of column 'domain'"):
        partition_of(natural_cfg(domain_dir, natural_groups=["books", "toys"], num_clients=2))
    with pytest.raises(DataError, match="missing \\['region'\\]"):
        partition_of(natural_cfg(domain_dir, partition_by="region"))
    with pytest.raises(fedslip.ConfigError, match="needs partition_by"):
        natural_cfg(domain_dir, partition_by="")
    with pytest.raises(fedslip.ConfigError, match="natural_groups names 2 groups for num_clients=3"):
        natural_cfg(domain_dir, natural_groups=["books", "dvd"])
    with pytest.raises(fedslip.ConfigError, match="partition_by / natural_groups name the groups"):
        natural_cfg(domain_dir, partition="iid")


@pytest.mark.skipif(not (FDU_MTL / "train.csv.gz").is_file(), reason="no FDU-MTL copy")
def test_fdu_mtl_gives_sixteen_clients_with_their_domains_rows():
    cfg = fedslip.make_config(toml_path=Path(__file__).resolve().parents[1] / "configs" / "fdu_mtl.toml",
                              samples_per_client=5000, val_samples_per_client=0, data_dir=str(FDU_MTL))
    p = partition_of(cfg)
    counts = pd.read_csv(FDU_MTL / "train.csv.gz", keep_default_na=False)["domain"].value_counts()
    assert p.client_names == sorted(FDU_MTL_TRAIN) and cfg.num_clients == 16
    assert {n: len(c.train) for n, c in zip(p.client_names, p.clients)} == FDU_MTL_TRAIN == counts.to_dict()
    assert all(len(c.test) == 400 for c in p.clients)


def test_a_natural_run_names_its_clients_by_group(domain_dir, tmp_path):
    """Here with local training, whose clients send nothing on any partition."""
    summary = fedslip.run(natural_cfg(domain_dir, method="local", kstep=2), tmp_path / "run", progress=False,
                          log=False)
    assert summary["client_names"] == ["apparel", "books", "dvd"] and summary["comm_bytes_per_round"] == 0
    assert Partition.load(tmp_path / "run" / "partition.json").client_names == ["apparel", "books", "dvd"]
    assert len(summary["personalized_accuracy_per_client"]) == 3
    from fedslip.report import build_report, find_runs
    build_report(find_runs([tmp_path / "run"]), tmp_path / "report")
    assert "| method | apparel | books | dvd |" in (tmp_path / "report" / "report.md").read_text()


# --- local: each client alone -----------------------------------------------------------------------------
def test_local_sends_nothing_and_each_client_ends_as_it_would_alone(tiny_cfg, tmp_path):
    """Client 0 of a 2-client run ends with the same adapter as client 0 trained alone (its rows and seeds are
    the same): nothing of client 1 reaches it. No byte is counted in any round."""
    cfg = dict(method="local", rounds=2, kstep=2)
    both = fedslip.run(tiny_cfg(**cfg, num_clients=2), tmp_path / "both", progress=False, log=False)
    fedslip.run(tiny_cfg(**cfg, num_clients=1, min_fit_clients=1), tmp_path / "alone", progress=False, log=False)
    together = load_tensors(tmp_path / "both" / "clients" / "0" / "private.safetensors")
    alone = load_tensors(tmp_path / "alone" / "clients" / "0" / "private.safetensors")
    assert together.keys() == alone.keys() and all(torch.equal(together[n], alone[n]) for n in together)
    assert both["complete"] and both["upload_bytes"] == both["download_bytes"] == both["comm_bytes_per_round"] == 0
    assert both["global_track_params"] == 0 and both["kstep_accuracy"] is not None
    setup = prepare(tiny_cfg(**cfg, num_clients=1))
    trained = [n for n, t in setup.model.private_state().items() if not torch.equal(t, together[n])]
    assert any(".lora_A." in n for n in trained) and any(".lora_B." in n for n in trained)
    assert any(".modules_to_save." in n for n in trained)


def test_local_is_refused_where_something_would_travel(tiny_cfg):
    with pytest.raises(fedslip.ConfigError, match="method='local'"):
        tiny_cfg(method="local", local_params=["head", "lora_B"])
    with pytest.raises(fedslip.ConfigError, match="nothing would be shared"):
        tiny_cfg(method="fedper", local_params=["head", "lora_A", "lora_B"])


# --- feddpa: the instance-wise weight ------------------------------------------------------------------
def hand_representation(model, ids: list[int]) -> torch.Tensor:
    """e(x) for one unpadded row: the mean last hidden state of the backbone with the private LoRA alone
    (scale alpha/r), set up here through peft directly."""
    model.model.base_model.set_adapter(PRIVATE)
    for m in model.model.modules():
        if hasattr(m, "set_scale") and PRIVATE in getattr(m, "scaling", {}):
            m.set_scale(PRIVATE, 1.0)
    out = model.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    model._active = ()  # the tracks were switched behind the model's back
    return out.hidden_states[-1][0].mean(0)


def hand_logits(model, ids: list[int], alpha: float) -> torch.Tensor:
    """One unpadded row through alpha * g + (1 - alpha) * p, scalar LoRA scales set here."""
    model.model.base_model.set_adapter([GLOBAL, PRIVATE])
    for m in model.model.modules():
        if hasattr(m, "set_scale") and PRIVATE in getattr(m, "scaling", {}):
            m.set_scale(GLOBAL, alpha)
            m.set_scale(PRIVATE, 1 - alpha)
    logits = model.model(input_ids=torch.tensor([ids])).logits[0]
    model._active = ()
    return logits


def test_feddpa_weights_each_input_by_its_similarity_to_the_clients_rows(tiny_cfg, tmp_path):
    """alpha(x) = w * mean_j cos(e(x), e(x_j)) and the logits of alpha(x) * g + (1 - alpha(x)) * p, computed
    by hand row by row (unpadded) on a batch of rows of different lengths, for three consecutive K-step
    steps (the weights move, so alpha does); each K-step loss is the CE of those hand-computed logits."""
    w = 0.7
    cfg = tiny_cfg(method="feddpa", instance_weight=w, instance_reference_rows=4, batch_size=6, kstep_lr=0.05)
    setup = prepare(cfg)
    model, tok = setup.model, setup.tokenizer
    for m in model.model.modules():  # no dropout: K-step's loss is then a function of the weights alone
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    torch.manual_seed(0)  # B matrices away from zero, so both tracks change the output
    with torch.no_grad():
        for p in [*model.global_params.values(), *model.private_params.values()]:
            p.add_(torch.randn_like(p) * 0.3)
    words = ["match", "team", "stocks", "profit", "war", "chip", "the", "today"]
    texts = [" ".join(words[(i + k) % 8] for k in range(3 + 2 * i)) for i in range(12)]  # 3 to 25 words
    data = Encoded(tok(texts)["input_ids"], torch.tensor([i % 4 for i in range(12)]))
    client = Client(0, cfg, model, tok, data, data, tmp_path / "c0")
    reference = client.reference
    assert reference["input_ids"].shape[0] == 4
    ref_ids = [row[mask.bool()].tolist() for row, mask in zip(reference["input_ids"], reference["attention_mask"])]
    for step in range(3):
        seed = 100 + step
        rows = next(batch_rows(data, cfg.batch_size, torch.Generator().manual_seed(seed), 1))
        assert len({len(data.row(i)) for i in rows}) > 1  # padding in the batch: e(x) must ignore it
        batch = collate(tok, data, rows)
        with torch.no_grad():
            refs = torch.stack([hand_representation(model, ids) for ids in ref_ids])
            expected_alpha, expected_logits = [], []
            for i in rows:
                e = hand_representation(model, data.row(i))
                cos = [float(e @ r / (e.norm() * r.norm())) for r in refs]
                expected_alpha.append(w * sum(cos) / len(cos))
                expected_logits.append(hand_logits(model, data.row(i), expected_alpha[-1]))
            expected_logits = torch.stack(expected_logits)
            assert len({round(a, 4) for a in expected_alpha}) > 1  # a weight of each row's own
            with model.eval_mode():
                assert torch.allclose(model.instance_alpha(batch, reference), torch.tensor(expected_alpha), atol=1e-5)
                assert torch.allclose(model.logits(batch, (GLOBAL, PRIVATE), reference), expected_logits, atol=1e-4)
        before = model.private_state()
        result = kstep_train(model, tok, data, cfg, 1, None, seed, reference=reference)
        assert result.loss == pytest.approx(F.cross_entropy(expected_logits, data.labels[rows]).item(), abs=1e-4)
        assert any(not torch.equal(before[n], t) for n, t in model.private_state().items())


def test_feddpa_trains_on_the_fixed_mix_and_runs_with_its_weight(tiny_cfg, tmp_path):
    """Without reference rows (training) the tracks mix with private_weight; a run evaluates and K-steps."""
    cfg = tiny_cfg(method="feddpa")
    assert cfg.instance_weight == 0.5 and cfg.private_weight == 0.5
    assert fedslip.make_config({**cfg.to_dict(), "method": "feddpa_fixed", "instance_weight": 0.0}).validate() is None
    with pytest.raises(fedslip.ConfigError, match="instance_weight .* needs private_weight > 0"):
        tiny_cfg(method="fedslip", instance_weight=0.5)
    summary = fedslip.run(tiny_cfg(method="feddpa", rounds=1, kstep=2), tmp_path / "run", progress=False, log=False)
    assert summary["private_bytes_transmitted"] == 0 and summary["kstep_accuracy"] is not None
    with pytest.raises(ExportError, match="a weight computed for each input"):  # no exported model computes it
        RunModel(tmp_path / "run", 0)
    assert RunModel(tmp_path / "run", 0, use_private=False).tracks == (GLOBAL,)


@pytest.mark.flower
def test_a_natural_feddpa_run_on_flower_simulation_equals_the_embedded_one(domain_dir, tmp_path):
    """The natural partition and FedDPA's weight on Flower's simulation runtime: the same run as embedded."""
    from test_flower import assert_same_run

    cfg = natural_cfg(domain_dir, method="feddpa", rounds=2, kstep=2, samples_per_client=16,
                      test_samples_per_client=8).to_dict()
    fedslip.run(fedslip.make_config(cfg), tmp_path / "embedded", progress=False, log=False)
    summary = fedslip.run(fedslip.make_config({**cfg, "engine": "flower-sim"}), tmp_path / "sim", progress=False,
                          log=False)
    assert_same_run(tmp_path / "embedded", tmp_path / "sim")
    assert summary["client_names"] == ["apparel", "books", "dvd"] and summary["kstep_accuracy"] is not None
