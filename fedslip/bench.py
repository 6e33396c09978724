"""``fedslip bench --out DIR``: throughput and overhead, measured side by side in one process.

    fedslip bench --out runs/bench                      # embedded MiniLM, AG News rows
    fedslip bench --out runs/bench --backbone tiny --steps 4

Measures (identical token ids, batch size and precision on both sides):
- local-training samples/s through FedSLIP's client code (``train_local``) vs a bare PEFT + PyTorch
  loop (``get_peft_model(task_type=SEQ_CLS)``, AdamW, ``DataCollatorWithPadding``); the ratio is the
  headline (goal >= 0.95); FedSLIP's loop with ``group_by_length``; the bare loop again with every
  batch padded to ``max_seq_len`` (the speedup of dynamic padding);
- the same for evaluation; fp32 vs bf16; sequential vs parallel clients (one fit of two clients);
- round overhead: share of a real round's wall time outside train/eval compute (goal <= 5%);
- peak RSS, and bytes per round vs the floor (global-track params x clients x 2 x 4 bytes).
A benchmark measures; it asserts nothing (tests only check that it runs and writes bench.json).
"""

from __future__ import annotations

import dataclasses
import json
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import DataCollatorWithPadding

from . import api, comm, rounds
from . import client as client_mod
from .config import ExperimentConfig, make_config
from .engines.embedded import EmbeddedEngine, ParallelEngine
from .experiment import RunDir, build_clients, prepare
from .model import GLOBAL, load_backbone, resolve_precision, resolve_targets
from .storage import write_json


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _bare_train(cfg: ExperimentConfig, tokenizer, ids: list[list[int]], labels: torch.Tensor, steps: int,
                pad_to_max: bool = False) -> float:
    """A plain PEFT + PyTorch loop over the same rows; returns seconds for ``steps`` steps after warmup.
    ``pad_to_max``: every batch padded to ``max_seq_len`` (what FedSLIP did before dynamic padding)."""
    torch.manual_seed(cfg.seed)
    base = load_backbone(cfg.backbone, cfg.num_labels, len(tokenizer))
    model = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                            target_modules=resolve_targets(base, cfg.lora_targets)))
    model.config.pad_token_id = tokenizer.pad_token_id
    collator = (DataCollatorWithPadding(tokenizer, padding="max_length", max_length=cfg.max_seq_len) if pad_to_max
                else DataCollatorWithPadding(tokenizer))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    dtype = resolve_precision(cfg.precision, torch.device("cpu"))
    bs = cfg.batch_size
    batches = [collator([{"input_ids": ids[i], "labels": int(labels[i])} for i in range(s, s + bs)])
               for s in range(0, steps * bs, bs)]
    model.train()

    def step(batch):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(batches[0])
    return _timed(lambda: [step(b) for b in batches])


def _bare_eval(cfg: ExperimentConfig, tokenizer, model, ids: list[list[int]]) -> float:
    collator = DataCollatorWithPadding(tokenizer)
    dtype = resolve_precision(cfg.precision, torch.device("cpu"))
    bs = cfg.eval_batch_size

    def run():
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            for s in range(0, len(ids), bs):
                model(**collator([{"input_ids": x} for x in ids[s:s + bs]])).logits.argmax(-1)
    return _timed(run)


def _throughput(cfg: ExperimentConfig, steps: int) -> dict:
    """FedSLIP's train/eval code vs a bare loop, same rows, batch size and precision."""
    setup = prepare(cfg)
    data, test = setup.clients[0].train, setup.clients[0].test
    n = steps * cfg.batch_size

    def ours(k: int, run_cfg: ExperimentConfig = cfg) -> float:
        return _timed(lambda: client_mod.train_local(setup.model, setup.tokenizer, data, run_cfg, k, False, None,
                                                     None, 0))

    ours(1)  # warmup
    ours_train = ours(steps)
    grouped_train = ours(steps, dataclasses.replace(cfg, group_by_length=True))
    bare_train = _bare_train(cfg, setup.tokenizer, data.input_ids, data.labels, steps)
    bare_padded = _bare_train(cfg, setup.tokenizer, data.input_ids, data.labels, steps, pad_to_max=True)
    ours_eval = _timed(lambda: client_mod.evaluate(setup.model, setup.tokenizer, test, (GLOBAL,), cfg.eval_batch_size,
                                                  cfg.num_labels))
    setup.model.model.eval()
    bare_eval = _bare_eval(cfg, setup.tokenizer, setup.model.model, test.input_ids)
    return {"train_samples_per_s": n / ours_train, "bare_train_samples_per_s": n / bare_train,
            "train_ratio_vs_bare": bare_train / ours_train,
            "grouped_train_samples_per_s": n / grouped_train,
            "group_by_length_speedup": ours_train / grouped_train,
            "bare_train_padded_to_max_samples_per_s": n / bare_padded,
            "dynamic_padding_speedup": bare_padded / bare_train,
            "eval_samples_per_s": len(test) / ours_eval, "bare_eval_samples_per_s": len(test) / bare_eval,
            "eval_ratio_vs_bare": bare_eval / ours_eval}


def bench(out: str | Path, backbone: str = "minilm", steps: int = 20, data_dir: str = "",
          batch_size: int = 32, max_seq_len: int = 64) -> dict:
    out = Path(out)
    n = steps * batch_size
    base = dict(backbone=backbone, batch_size=batch_size, max_seq_len=max_seq_len, samples_per_client=n + batch_size,
                test_samples_per_client=n, global_test_samples=n, num_clients=2, rounds=1, kstep=0,
                partition="iid", data_dir=data_dir)
    results: dict = {"backbone": backbone, "batch_size": batch_size, "max_seq_len": max_seq_len, "steps": steps,
                     "threads": torch.get_num_threads()}
    for precision in ("fp32", "bf16"):
        results[precision] = _throughput(make_config({**base, "precision": precision}), steps)
    results["bf16_train_speedup"] = results["bf16"]["train_samples_per_s"] / results["fp32"]["train_samples_per_s"]
    results["bf16_eval_speedup"] = results["bf16"]["eval_samples_per_s"] / results["fp32"]["eval_samples_per_s"]

    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_config({**base, "precision": "auto", "local_steps": steps})
        setup = prepare(cfg)
        payload = setup.model.global_state()
        message = dict.fromkeys([0, 1], comm.encode(payload))
        sequential = EmbeddedEngine(build_clients(setup, RunDir(Path(tmp) / "seq")))
        sequential.fit(message, 1)  # warmup
        seq = _timed(lambda: sequential.fit(message, 2))
        parallel = ParallelEngine(cfg, str(Path(tmp) / "par"), 2)
        try:
            parallel.fit(message, 1)  # warmup (workers load the backbone)
            par = _timed(lambda: parallel.fit(message, 2))
        finally:
            parallel.close()
        results["clients_fit_seconds"] = {"sequential": seq, "parallel_2_workers": par, "speedup": seq / par}

        # round overhead: a real 1-round run, compute time measured inside train_local/evaluate
        compute = {"seconds": 0.0}

        def timing(fn):
            def wrapped(*a, **k):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    compute["seconds"] += time.perf_counter() - t0
            return wrapped

        originals = (client_mod.train_local, client_mod.evaluate, rounds.evaluate)
        client_mod.train_local, client_mod.evaluate = timing(originals[0]), timing(originals[1])
        rounds.evaluate = client_mod.evaluate
        try:
            summary = api.run(cfg, Path(tmp) / "round", progress=False)
        finally:
            client_mod.train_local, client_mod.evaluate, rounds.evaluate = originals
        round_seconds = json.loads((Path(tmp) / "round" / "metrics.jsonl").read_text().splitlines()[0])["seconds"]
        results["round"] = {"seconds": round_seconds, "compute_seconds": compute["seconds"],
                            "overhead_share": max(0.0, 1 - compute["seconds"] / round_seconds)}
        floor = summary["global_track_params"] * cfg.num_clients * 2 * 4
        results["bytes_per_round"] = {"measured": summary["comm_bytes_per_round"], "floor": floor,
                                      "framing_overhead_share": summary["comm_bytes_per_round"] / floor - 1}
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench.json", results)
    return results


def table(results: dict) -> str:
    lines = ["| measurement | fp32 | bf16 |", "|---|---|---|"]
    for key, label in (("train_samples_per_s", "train samples/s (FedSLIP client)"),
                       ("bare_train_samples_per_s", "train samples/s (bare PEFT loop)"),
                       ("train_ratio_vs_bare", "train ratio FedSLIP / bare"),
                       ("grouped_train_samples_per_s", "train samples/s (FedSLIP, group_by_length)"),
                       ("group_by_length_speedup", "group_by_length speedup"),
                       ("bare_train_padded_to_max_samples_per_s", "train samples/s (bare, padded to max_seq_len)"),
                       ("dynamic_padding_speedup", "dynamic padding speedup (bare loop)"),
                       ("eval_samples_per_s", "eval samples/s (FedSLIP)"),
                       ("bare_eval_samples_per_s", "eval samples/s (bare loop)"),
                       ("eval_ratio_vs_bare", "eval ratio FedSLIP / bare")):
        lines.append(f"| {label} | {results['fp32'][key]:.2f} | {results['bf16'][key]:.2f} |")
    c, r, b = results["clients_fit_seconds"], results["round"], results["bytes_per_round"]
    lines += ["", "| measurement | value |", "|---|---|",
              f"| bf16 speedup, train / eval | {results['bf16_train_speedup']:.2f}x / "
              f"{results['bf16_eval_speedup']:.2f}x |",
              f"| fit of 2 clients, sequential / 2 workers | {c['sequential']:.1f} s / {c['parallel_2_workers']:.1f} s "
              f"({c['speedup']:.2f}x) |",
              f"| round overhead (outside train/eval compute) | {100 * r['overhead_share']:.1f}% of "
              f"{r['seconds']:.1f} s |",
              f"| bytes per round, measured / floor | {b['measured']:.0f} / {b['floor']:.0f} "
              f"(+{100 * b['framing_overhead_share']:.2f}% framing) |",
              f"| peak RSS | {results['peak_rss_mib']:.0f} MiB |"]
    return "\n".join(lines)
