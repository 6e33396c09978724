"""Speed switches change speed only: parallel clients, bf16 autocast, dynamic padding."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import fedslip
from fedslip.model import GLOBAL, TrackedModel, load_tokenizer


def rows(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.process  # worker processes
def test_parallel_clients_give_the_sequential_results(tiny_cfg, tmp_path):
    cfg = dict(method="fedslip", rounds=2, private_warmup_rounds=0, private_target_sparsity=0.5, kstep=2)
    seq = fedslip.run(tiny_cfg(**cfg), tmp_path / "seq", progress=False)
    par = fedslip.run(tiny_cfg(**cfg, parallel_clients=2), tmp_path / "par", progress=False)
    assert rows(tmp_path / "seq") == rows(tmp_path / "par")
    assert seq["kstep_accuracy_per_client"] == par["kstep_accuracy_per_client"]
    a, b = load_file(tmp_path / "seq" / "global.safetensors"), load_file(tmp_path / "par" / "global.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    for c in range(4):
        p, q = (load_file(tmp_path / d / "clients" / str(c) / "private.safetensors") for d in ("seq", "par"))
        assert all(torch.allclose(p[k], q[k], atol=1e-6) for k in p)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_precision_switch_takes_the_requested_path(tokenizer, precision, dtype):
    model = TrackedModel(fedslip.make_config({"backbone": "tiny", "precision": precision}), tokenizer)
    seen = []
    layer = next(m for n, m in model.model.named_modules() if n.endswith("attention.self.query.base_layer"))
    handle = layer.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    batch = tokenizer(["stocks rise"], return_tensors="pt")
    logits = model.logits(batch, (GLOBAL,))
    handle.remove()
    assert seen == [dtype]
    assert logits.dtype == torch.float32  # losses are always computed in fp32
    assert all(p.dtype == torch.float32 for p in model.global_params.values())  # master weights stay fp32


def test_dynamic_padding_does_not_change_fp32_logits(tokenizer):
    model = TrackedModel(fedslip.make_config({"backbone": "tiny", "precision": "fp32"}), tokenizer)
    short, long = "stocks rise", "the team won the final match after a long season of hard games and travel"
    with model.eval_mode():
        alone = model.logits(tokenizer([short], return_tensors="pt"), (GLOBAL,))
        padded = model.logits(tokenizer([short, long], return_tensors="pt", padding=True), (GLOBAL,))[:1]
        to_max = model.logits(tokenizer([short], return_tensors="pt", padding="max_length", max_length=64),
                              (GLOBAL,))
    assert torch.allclose(alone, padded, atol=1e-5)
    assert torch.allclose(alone, to_max, atol=1e-5)


@pytest.mark.slow  # a benchmark: it measures several runs
def test_bench_runs_and_writes_well_formed_output(data_dir, tmp_path):
    from fedslip.bench import bench, table

    results = bench(tmp_path, backbone="tiny", steps=2, data_dir=str(data_dir), batch_size=8)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved == json.loads(json.dumps(results))
    for precision in ("fp32", "bf16"):
        assert all(v > 0 for v in saved[precision].values())
    assert 0 <= saved["round"]["overhead_share"] <= 1
    assert saved["bytes_per_round"]["measured"] > saved["bytes_per_round"]["floor"] > 0
    assert saved["peak_rss_mib"] > 0 and saved["clients_fit_seconds"]["parallel_2_workers"] > 0
    assert "train ratio FedSLIP / bare" in table(results)


def test_group_by_length_sees_every_row_once_per_pass_with_less_padding():
    from fedslip.data import Encoded, train_batches

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 60, (320,), generator=gen).tolist()
    data = Encoded(input_ids=[[101] + [1000] * (n - 2) + [102] for n in lengths], labels=torch.arange(320))
    tokenizer = load_tokenizer("tiny")

    def one_pass(grouped: bool, seed: int = 1) -> list[dict]:
        return list(train_batches(tokenizer, data, 16, torch.Generator().manual_seed(seed), 20, grouped))

    grouped, shuffled = one_pass(True), one_pass(False)
    assert sorted(torch.cat([b["labels"] for b in grouped]).tolist()) == list(range(320))  # each row once
    padded = [sum(b["input_ids"].numel() for b in batches) for batches in (grouped, shuffled)]
    assert padded[0] < 0.8 * padded[1]  # far fewer padded positions than random batches
    again = one_pass(True)
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(grouped, again))  # deterministic
    assert not all(torch.equal(a["labels"], b["labels"]) for a, b in zip(grouped, one_pass(True, seed=2)))


def test_batches_are_padded_to_a_multiple_and_rows_stored_compactly():
    """Few distinct batch shapes (bf16 CPU kernels keep code per shape: memory grew with the clients before),
    and the ids held as one int32 array give back exactly the tokenizer's rows."""
    from fedslip.data import PAD_MULTIPLE, Encoded, collate, eval_batches

    tokenizer = load_tokenizer("tiny")
    rows = [[101] + [1000 + k] * (n - 2) + [102] for k, n in enumerate((3, 9, 17, 5, 2))]
    data = Encoded(input_ids=rows, labels=torch.arange(5))
    assert data.input_ids == rows and data.lengths.tolist() == [3, 9, 17, 5, 2]
    assert data.tokens.dtype.itemsize == 4 and data.tokens.size == sum(map(len, rows))
    both = Encoded.union([data, Encoded(input_ids=rows[:2], labels=torch.arange(2))])
    assert both.input_ids == rows + rows[:2] and both.labels.tolist() == [0, 1, 2, 3, 4, 0, 1]
    batch = collate(tokenizer, data, [0, 1])  # longest 9 -> 16
    assert batch["input_ids"].shape == (2, 16) and batch["input_ids"][0, :3].tolist() == rows[0]
    assert batch["attention_mask"].sum(1).tolist() == [3, 9]
    shapes = {b["input_ids"].shape[1] for _, b in eval_batches(tokenizer, data, 1)}
    assert shapes == {8, 16, 24} and all(s % PAD_MULTIPLE == 0 for s in shapes)
