"""``fedslip.run(config, out)``: the federated round loop, metrics and summary. The CLI calls this.

    >>> import fedslip
    >>> cfg = fedslip.make_config({"backbone": "tiny", "rounds": 2, "samples_per_client": 64,
    ...                            "test_samples_per_client": 64})
    >>> summary = fedslip.run(cfg, "runs/tiny")          # doctest: +SKIP
    >>> summary["personalized_accuracy"]                  # doctest: +SKIP

Per round: sample clients -> broadcast the global track -> each sampled client trains and replies
with its global track -> the server validates and FedAvg-aggregates -> evaluation of the global track
on the global test set and of every client's inference model on its own test rows.
"""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import __version__, comm
from .client import Client
from .config import ExperimentConfig
from .engines.embedded import EmbeddedEngine
from .experiment import RunDir, Setup, prepare
from .model import GLOBAL
from .server import Server, sample_clients
from .client import evaluate

log = logging.getLogger("fedslip")
MIB = 1024 * 1024


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"fedslip": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def _per_client(results: dict[int, dict]) -> list[float]:
    return [results[c]["accuracy"] for c in sorted(results)]


def evaluate_round(setup: Setup, engine: EmbeddedEngine, payload: bytes) -> dict:
    """Global track on the global test set; each client's inference model (and its global track alone,
    for dual-track methods) on the client's own test rows."""
    model = setup.model
    model.load_global_state(comm.decode(payload))
    glob = evaluate(model, setup.tokenizer, setup.global_eval, (GLOBAL,), setup.cfg.eval_batch_size,
                    setup.cfg.num_labels)
    personal = engine.evaluate(payload)
    local_global = engine.evaluate(payload, (GLOBAL,)) if model.has_private else personal
    return {
        "global_accuracy": glob["accuracy"],
        "global_loss": glob["loss"],
        "personalized_accuracy": float(np.mean(_per_client(personal))),
        "personalized_accuracy_per_client": _per_client(personal),
        "global_track_local_accuracy": float(np.mean(_per_client(local_global))),
        "global_track_local_accuracy_per_client": _per_client(local_global),
        "_detail": {"global": glob, "personalized": personal},
    }


def run(cfg: ExperimentConfig, out: str | Path, overwrite: bool = False, progress: bool = True) -> dict:
    """Run one federated experiment into ``out`` and return its summary (also ``out/summary.json``)."""
    started = time.perf_counter()
    run_dir = RunDir(Path(out))
    run_dir.check_writable(overwrite)  # refuse early, before minutes of loading
    setup = prepare(cfg)
    run_dir.create(overwrite)
    cfg.save(run_dir.path / "config.toml")
    setup.partition.save(run_dir.path / "partition.json")

    clients = [Client(cid, cfg, setup.model, setup.tokenizer, data.train, data.test, run_dir.client_dir(cid))
               for cid, data in enumerate(setup.clients)]
    engine = EmbeddedEngine(clients)
    server = Server(cfg, setup.model.global_state())
    history: list[dict] = []

    for round_idx in tqdm(range(1, cfg.rounds + 1), desc="rounds", disable=not progress or None):
        t0 = time.perf_counter()
        cids = sample_clients(cfg, round_idx)
        download = server.broadcast()
        replies = engine.fit(download, cids, round_idx)
        outcome = server.aggregate({cid: (r.payload, r.num_examples) for cid, r in replies.items()})
        messages = [download] * len(cids) + [r.payload for r in replies.values()]
        evaluation = evaluate_round(setup, engine, server.broadcast())
        row = {
            "round": round_idx,
            **{k: v for k, v in evaluation.items() if not k.startswith("_")},
            "train_loss": float(np.mean([r.metrics["train_loss"] for r in replies.values()])),
            "participants": cids,
            "rejected_updates": len(outcome.rejected),
            "upload_bytes": sum(len(r.payload) for r in replies.values()),
            "download_bytes": len(download) * len(cids),
            "private_bytes_transmitted": sum(comm.private_bytes(m) for m in messages),
        }
        if setup.model.has_private:
            private_losses = [r.metrics["private_train_loss"] for r in replies.values()
                              if r.metrics["private_train_loss"] is not None]
            row["private_train_loss"] = float(np.mean(private_losses)) if private_losses else None
            row["private_trained"] = any(r.metrics["private_trained"] for r in replies.values())
            row["private_sparsity"] = {str(c): r.metrics["private_sparsity"] for c, r in replies.items()}
        row["seconds"] = time.perf_counter() - t0
        run_dir.append_metrics(row)
        history.append(row)
        log.info("round %d/%d | global %.2f%% | personalized %.2f%% | loss %.4f | up %.2f MiB down %.2f MiB "
                 "| %.1fs", round_idx, cfg.rounds, 100 * row["global_accuracy"],
                 100 * row["personalized_accuracy"], row["train_loss"], row["upload_bytes"] / MIB,
                 row["download_bytes"] / MIB, row["seconds"])

    final_payload = server.broadcast()
    run_dir.save_global(server.state)
    summary = _summary(cfg, setup, history, evaluation["_detail"])
    if cfg.kstep > 0:
        kstep = engine.kstep(final_payload, cfg.kstep)
        summary["kstep_accuracy_per_client"] = _per_client(kstep)
        summary["kstep_accuracy"] = float(np.mean(summary["kstep_accuracy_per_client"]))
        log.info("k-step (%d steps) personalized accuracy %.2f%%", cfg.kstep, 100 * summary["kstep_accuracy"])
    summary["wall_seconds"] = time.perf_counter() - started
    run_dir.write_summary(summary)
    return summary


def _summary(cfg: ExperimentConfig, setup: Setup, history: list[dict], detail: dict) -> dict:
    last = history[-1]
    comm_per_round = [r["upload_bytes"] + r["download_bytes"] for r in history]

    def per_class(result: dict) -> list[float]:
        return [c / t if t else float("nan") for c, t in zip(result["correct_per_class"], result["total_per_class"])]

    summary = {
        "method": cfg.method, "seed": cfg.seed, "rounds": cfg.rounds, "num_clients": cfg.num_clients,
        "backbone": cfg.backbone, "eval_split": cfg.eval_split,
        **{k: last[k] for k in ("global_accuracy", "personalized_accuracy", "personalized_accuracy_per_client",
                                "global_track_local_accuracy", "global_track_local_accuracy_per_client",
                                "train_loss", "upload_bytes", "download_bytes")},
        "global_accuracy_per_class": per_class(detail["global"]),
        "personalized_accuracy_per_class_per_client": [per_class(detail["personalized"][c])
                                                       for c in sorted(detail["personalized"])],
        "majority_floor_per_client": [c.majority_floor for c in setup.clients],
        "comm_bytes_per_round": float(np.mean(comm_per_round)),
        "comm_mib_per_round": float(np.mean(comm_per_round)) / MIB,
        "private_bytes_transmitted": sum(r["private_bytes_transmitted"] for r in history),
        "kstep": cfg.kstep, "kstep_accuracy": None, "kstep_accuracy_per_client": None,
        "global_track_params": sum(t.numel() for t in setup.model.global_params.values()),
        "private_track_params": sum(t.numel() for t in setup.model.private_params.values()),
        "precision": "bf16" if setup.model.autocast_dtype is not None else "fp32",
        "device": str(setup.model.device),
        "versions": _versions(),
    }
    if "private_sparsity" in last:
        summary["private_sparsity"] = last["private_sparsity"]
    return summary
