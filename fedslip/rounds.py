"""The federated round loop: rounds, checkpoints, evaluation, metrics rows and the summary.

``fedslip.run`` (``api.py``) starts it on the embedded engine; the Flower ServerApp (``flower_app.py``)
starts it on its grid's engine; both go through ``start`` / ``start_resumed``. Per round: sample
clients -> broadcast the global track -> each sampled client trains and replies with its global track
-> the server validates the replies and aggregates them with a Flower strategy (``fedslip.server``) ->
evaluation of the global track on the global test set and of every client's inference model on its
own test rows -> health checks (``fedslip.health``) -> checkpoint, metrics row, trackers.

Below the launchers (``fedslip.launch``) and the Flower apps, above the engines: it imports neither.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from tqdm import tqdm  # the text bar: tqdm.auto wants ipywidgets in a notebook and warns without them

from . import __version__, codecs, comm, health, privacy, tracking
from .client import evaluate
from .config import RUN_ONLY_KEYS, ConfigError, ExperimentConfig, load_config
from .engines import Engine
from .engines.embedded import CentralizedEngine, EmbeddedEngine, LocalEngine, ParallelEngine
from .experiment import Checkpoint, RunDir, RunDirError, Setup, build_clients, build_pooled_trainer, prepare
from .inference import save_adapters
from .model import GLOBAL
from .partition import Partition
from .server import (
    RoundFailed,
    Server,
    UpdateError,
    eval_clients,
    global_view_clients,
    sample_clients,
    validate_update,
)
from .storage import StateFileError, run_directory, save_tensors
from .tracking import Callback
from .views import GLOBAL_TEST_VIEW, SERVER_MODEL_VIEW

log = logging.getLogger("fedslip")
MIB = 1024 * 1024
AUDIT_DIR = "audit"


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"fedslip": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def per_client(results: dict[int, dict], num_clients: int) -> list[float | None]:
    """Accuracy per client id; None where the client failed."""
    return [results[c]["accuracy"] if c in results else None for c in range(num_clients)]


def mean_present(values: list[float | None]) -> float | None:
    """Mean of the values present; None (JSON null, never NaN) when there are none."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def sum_over_payloads(payloads: dict[int, bytes], measure: Callable[[bytes], int]) -> int:
    """``measure`` summed over the clients' payloads, computed once per distinct payload (most clients
    of a round share one)."""
    counts: dict[int, list] = {}
    for payload in payloads.values():
        counts.setdefault(id(payload), [payload, 0])[1] += 1
    return sum(measure(payload) * k for payload, k in counts.values())


def ratio(part: int, whole: int) -> float | None:
    """part / whole, None (JSON null) when there is no whole (a round without replies)."""
    return part / whole if whole else None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def evaluate_round(setup: Setup, engine: Engine, server: Server, round_idx: int) -> dict:
    """Global track (as the clients hold it) on the global test set; each client's inference model (and
    its global track alone, for dual-track methods) on the client's own test rows; after the last round
    also each client's inference model on the global test set (for single-track methods that is the
    global accuracy). ``eval_fraction`` < 1: a seeded sample of clients each round, every client after the
    last one, and a sample for the global test set (``fedslip.server``)."""
    model, n = setup.model, setup.cfg.num_clients
    model.load_global_state(server.reference)
    model.reset_local()  # partial sharing: the server's model holds the local parts' initial values
    glob = evaluate(model, setup.tokenizer, setup.global_eval, (GLOBAL,), setup.cfg.eval_batch_size,
                    setup.cfg.num_labels)
    # the inference model, and the global track alone: for partial sharing the global adapter with the
    # local parts at their initial values (a client's own parts are not the global track)
    views = [None, (GLOBAL,)] if model.has_private else [None, SERVER_MODEL_VIEW] if model.local_params else [None]
    final = round_idx == setup.cfg.rounds
    evaluated = eval_clients(setup.cfg, round_idx)
    results, failed = engine.evaluate(server.downloads(evaluated), round_idx, views)
    server.delivered(results)
    on_global = {}
    if final and not model.has_client_state:  # single-track: every client's model is the global track
        on_global = {cid: glob for cid in results}
    elif final and setup.cfg.partition != "own":  # each client's own model on the global test set, where
        # the clients hold it; a sample of eval_fraction of them (every client at 1.0): n x the global test set
        scored, failed_global = engine.evaluate(server.downloads(global_view_clients(setup.cfg)), round_idx,
                                                [GLOBAL_TEST_VIEW])
        server.delivered(scored)
        on_global = {cid: r[0] for cid, r in scored.items()}
        failed = {**failed_global, **failed}
    stop_on_unreadable_state(failed, f"the evaluation after round {round_idx}")
    personal = {cid: r[0] for cid, r in results.items()}
    local_global = {cid: r[-1] for cid, r in results.items()}
    return {
        "global_accuracy": glob["accuracy"],
        "global_loss": glob["loss"],
        # method local shares nothing: its "global model" is the untrained initialization, with no chance to be at
        "global_chance": health.majority_floor(glob["total_per_class"]) if model.global_params else None,
        "personalized_accuracy": mean_present(per_client(personal, n)),
        "personalized_accuracy_per_client": per_client(personal, n),
        "global_track_local_accuracy": mean_present(per_client(local_global, n)),
        "global_track_local_accuracy_per_client": per_client(local_global, n),
        **({"personalized_global_test_accuracy_per_client": per_client(on_global, n)} if on_global else {}),
        # each client's floor from the class counts of its own evaluation reply: no client labels read here
        "majority_floor_per_client": [health.majority_floor(personal[c]["total_per_class"]) if c in personal
                                      else None for c in range(n)],
        "failed_evaluations": {str(c): e for c, e in failed.items()},
        **({"evaluated": evaluated} if len(evaluated) < n else {}),  # eval_fraction: the clients measured
        "_detail": {"global": glob, "personalized": personal},
    }


def prepare_for(run_dir: RunDir, cfg: ExperimentConfig, side: str = "all") -> Setup:
    """``prepare(cfg, side)`` for an existing run, refusing data that no longer gives the run's partition."""
    setup = prepare(cfg, side)
    if Partition.load(run_dir.path / "partition.json") != setup.partition:
        raise RunDirError(f"{run_dir.path}: the data or config no longer produce the run's partition.json; "
                          f"refusing to continue an incompatible run")
    return setup


MakeEngine = Callable[[Setup, RunDir], Engine]


def _default_engine(setup: Setup, run_dir: RunDir) -> Engine:
    cfg = setup.cfg
    if cfg.method == "centralized":
        return CentralizedEngine(build_clients(setup, run_dir), build_pooled_trainer(setup, run_dir))
    engine = (ParallelEngine(cfg, str(run_dir.path), cfg.parallel_clients) if cfg.parallel_clients > 1
              else EmbeddedEngine(build_clients(setup, run_dir)))
    return LocalEngine(engine) if cfg.method == "local" else engine


def start(cfg: ExperimentConfig, out: str | Path, overwrite: bool = False, progress: bool = True,
          make_engine: MakeEngine = _default_engine, callbacks: Iterable[Callback] = (), side: str = "all") -> dict:
    """A new run with the engine ``make_engine`` builds (the Flower ServerApp passes its grid's engine and
    ``side="server"``: its process loads no client's rows, ``experiment.prepare``)."""
    started = time.perf_counter()
    run_dir = RunDir(Path(out))
    run_dir.check_writable(overwrite)  # refuse early, before minutes of loading
    tracking.check_available(cfg)
    setup = prepare(cfg, side)
    run_dir.create(overwrite)
    # the data paths as resolved now (FEDSLIP_DATA_DIR included), so a resume reads the same files
    dataclasses.replace(cfg, data_dir=cfg.resolved_data_dir(), client_data=cfg.resolved_client_data()).save(
        run_dir.path / "config.toml")
    setup.partition.save(run_dir.path / "partition.json")
    start_point = Checkpoint(0, setup.model.global_state(), [], 0.0)
    return _federate(setup, run_dir, start_point, started, progress, make_engine, callbacks)


def resumable_config(path: Path) -> ExperimentConfig:
    run_directory(path)
    if (path / "summary.json").exists():
        raise RunDirError(f"{path} holds a finished run (summary.json); nothing to resume")
    return load_config(path / "config.toml")


def resume_point(run_dir: RunDir) -> tuple[ExperimentConfig, Checkpoint | None]:
    """The run's config and last checkpoint, refused (one clear error) if the run cannot be resumed as
    the same experiment. Cheap: the Flower simulation calls it before Ray starts."""
    cfg = resumable_config(run_dir.path)
    checkpoint = run_dir.load_checkpoint()
    if checkpoint is not None:
        check_same_experiment(cfg, checkpoint, run_dir.path / "config.toml")
    return cfg, checkpoint


def start_resumed(out: str | Path, progress: bool = True, make_engine: MakeEngine = _default_engine,
                  callbacks: Iterable[Callback] = (), side: str = "all") -> dict:
    """Continue the run in ``out`` after its last checkpoint with the engine ``make_engine`` builds."""
    started = time.perf_counter()
    run_dir = RunDir(Path(out))
    cfg, checkpoint = resume_point(run_dir)
    tracking.check_available(cfg)
    setup = prepare_for(run_dir, cfg, side)
    if side == "all":  # this process holds every client's rows: a changed one is refused before any round
        for client in build_clients(setup, run_dir):
            client.check_rows()
    if checkpoint is None:
        checkpoint = Checkpoint(0, setup.model.global_state(), [], 0.0)
    else:
        try:
            validate_update(checkpoint.global_state, setup.model.global_state())
            if not codecs.of(cfg, "download").lossless:  # the clients' reference and their last download
                if checkpoint.reference is None or checkpoint.download is None:
                    raise UpdateError("no reference/download saved for the lossy download codec")
                validate_update(checkpoint.reference, setup.model.global_state())
                codecs.unpack(checkpoint.download, codecs.of(cfg, "download"), setup.model.global_shapes())
        except (UpdateError, comm.PayloadError) as e:
            raise StateFileError(f"{run_dir.path / 'checkpoint'} does not match the model: {e}") from None
    log.info("resuming %s after round %d", run_dir.path, checkpoint.round)
    run_dir.rewrite_metrics(checkpoint.history)
    return _federate(setup, run_dir, checkpoint, started - checkpoint.elapsed, progress, make_engine, callbacks)


def _federate(setup: Setup, run_dir: RunDir, start_point: Checkpoint, started: float, progress: bool,
              make_engine: MakeEngine, callbacks: Iterable[Callback] = ()) -> dict:
    """Rounds ``start_point.round + 1 .. cfg.rounds``, checkpointing after each; then K-step and the summary."""
    trackers = tracking.Trackers(setup.cfg, run_dir.path, start_point.history, callbacks)
    try:
        engine = make_engine(setup, run_dir)
        try:
            return _rounds(setup, run_dir, engine, start_point, started, progress, trackers)
        finally:
            engine.close()
    finally:
        trackers.close()


def check_same_experiment(cfg: ExperimentConfig, checkpoint: Checkpoint, config_path: Path) -> None:
    """Refuse to resume with a config.toml edited since the checkpoint (a mixed run under a new label);
    only ``RUN_ONLY_KEYS`` (engine, data path, performance) may differ."""
    if checkpoint.config is None:  # checkpoints written before the config was stored with them
        return
    changed = cfg.experiment_diff(checkpoint.config)
    if changed:
        diff = ", ".join(f"{k} ({was!r} -> {now!r})" for k, (was, now) in changed.items())
        raise ConfigError(f"{config_path} changed since round {checkpoint.round} was checkpointed: {diff}. A resume "
                          f"continues the same experiment; only {', '.join(sorted(RUN_ONLY_KEYS))} may change")


def _rounds(setup: Setup, run_dir: RunDir, engine: Engine, start: Checkpoint, started: float,
            progress: bool, trackers: tracking.Trackers) -> dict:
    cfg = setup.cfg
    server = Server(cfg, start.global_state, start.round, start.reference, start.download, start.held)
    history = list(start.history)
    evaluation = None
    for round_idx in tqdm(range(start.round + 1, cfg.rounds + 1), desc="rounds", disable=not progress or None,
                          initial=start.round, total=cfg.rounds):
        t0 = time.perf_counter()
        cids = sample_clients(cfg, round_idx)
        downloads = server.downloads(cids)
        if cfg.audit:  # the global track the clients train from this round (shadow clients start from it)
            save_tensors(run_dir.path / AUDIT_DIR / f"global-{round_idx:04d}.safetensors", server.reference)
        replies, failed, download_bytes = engine.fit(downloads, round_idx)
        server.delivered(replies)
        stop_on_unreadable_state(failed, f"round {round_idx}")
        try:
            outcome = server.aggregate({cid: (r.payload, r.num_examples) for cid, r in replies.items()}, failed,
                                       round_idx)
        except RoundFailed as e:
            raise RoundFailed(f"round {round_idx} not applied: {e}. The checkpoint of round {round_idx - 1} is "
                              f"kept; fix the cause and continue with `fedslip run --resume {run_dir.path}`") from None
        if cfg.audit:  # what the server received, for fedslip audit
            save_tensors(run_dir.path / AUDIT_DIR / f"round-{round_idx:04d}.safetensors",
                         {f"{cid}/{name}": t for cid, change in outcome.changes.items() for name, t in change.items()})
        evaluation = evaluate_round(setup, engine, server, round_idx)
        row = {
            "round": round_idx,
            **{k: v for k, v in evaluation.items() if not k.startswith("_")},
            "train_loss": mean_present([r.metrics["train_loss"] for r in replies.values()]),
            # compute: forward/backward sample passes of the round's local training, and fedavg_lora's on the
            # same clients and batches (client.reference_passes)
            "train_sample_passes": sum(r.metrics.get("sample_passes", 0) for r in replies.values()),
            "reference_passes": sum(r.metrics.get("reference_passes", 0) for r in replies.values()),
            "participants": cids,
            "rejected_updates": len(outcome.rejected),
            "rejected": {str(c): reason for c, reason in outcome.rejected.items()},
            "upload_bytes": sum(r.wire_bytes for r in replies.values()),
            "download_bytes": download_bytes,
            "full_state_downloads": 0 if server.download.lossless else sum_over_payloads(downloads, codecs.is_full),
            "private_bytes_transmitted": sum_over_payloads(downloads, lambda d: comm.private_bytes(d, cfg.local_params))
            + sum(comm.private_bytes(r.payload, cfg.local_params) for r in replies.values()),
        }
        if setup.model.has_private:
            row["private_train_loss"] = mean_present([r.metrics["private_train_loss"] for r in replies.values()])
            row["private_trained"] = any(r.metrics["private_trained"] for r in replies.values())
            row["private_sparsity"] = {str(c): r.metrics["private_sparsity"] for c, r in replies.items()}
        if privacy.enabled(cfg):
            row["dp_epsilon"] = privacy.epsilon(cfg, round_idx)  # None without noise: no guarantee
        row["training_passes_vs_fedavg_lora"] = ratio(row["train_sample_passes"], row["reference_passes"])
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        row["health"] = health.check_round(history)
        run_dir.save_checkpoint(Checkpoint(round_idx, server.state, history, time.perf_counter() - started,
                                           cfg.experiment_dict(), *server.resume_state()))
        run_dir.append_metrics(row)
        trackers.log_round(row)
        scored = sum(a is not None for a in row["personalized_accuracy_per_client"])
        covers = f" ({scored}/{cfg.num_clients} clients)" if scored < cfg.num_clients else ""  # a sampled mean
        log.info("round %d/%d | global %s | personalized %s%s | loss %.4f | %d trained | up %.2f MiB down %.2f MiB "
                 "| %.1fs", round_idx, cfg.rounds, _pct(row["global_accuracy"]), _pct(row["personalized_accuracy"]),
                 covers, row["train_loss"], len(cids) - len(outcome.rejected), row["upload_bytes"] / MIB,
                 row["download_bytes"] / MIB, row["seconds"])
        if row.get("dp_epsilon") is not None:
            log.info("round %d: differential privacy (epsilon, delta) = (%.4g, %g)", round_idx, row["dp_epsilon"],
                     cfg.dp_delta)
        for entry in row["health"]:
            log.warning(health.message(entry))
        if row["health"] and cfg.strict_health:
            raise health.HealthError.of(row, run_dir.path)

    if evaluation is None:  # resumed after the last round: evaluate the final state again
        evaluation = evaluate_round(setup, engine, server, cfg.rounds)
    run_dir.save_global(server.reference)  # the global track the clients hold and were evaluated with
    summary = _summary(cfg, setup, history, evaluation["_detail"])
    if cfg.kstep > 0:
        kstep, kstep_failed = engine.kstep(server.downloads(range(cfg.num_clients)), cfg.kstep)
        server.delivered(kstep)
        stop_on_unreadable_state(kstep_failed, "K-step")
        summary["kstep_accuracy_per_client"] = per_client(kstep, cfg.num_clients)
        summary["kstep_accuracy"] = mean_present(summary["kstep_accuracy_per_client"])
        summary["kstep_sample_passes"] = sum(r.get("sample_passes", 0) for r in kstep.values())
        summary["kstep_passes_vs_fedavg_lora"] = ratio(summary["train_sample_passes"] + summary["kstep_sample_passes"],
                                                       summary["reference_passes"])
        summary["client_failures"] += [{"round": None, "client": cid, "stage": "kstep", "reason": why}
                                       for cid, why in sorted(kstep_failed.items())]
        log.info("k-step (%d steps) personalized accuracy %s", cfg.kstep, _pct(summary["kstep_accuracy"]))
    final = [summary["personalized_accuracy_per_client"], summary["kstep_accuracy_per_client"] or []]
    summary["complete"] = all(a is not None for accuracies in final for a in accuracies)
    if not summary["complete"]:
        log.warning("incomplete run: the final accuracies average over the clients that answered only; "
                    "see client_failures in %s", run_dir.path / "summary.json")
    summary["wall_seconds"] = time.perf_counter() - started
    save_adapters(run_dir.path)  # the tracks as peft adapters, loadable without FedSLIP (docs/usage.md)
    run_dir.write_summary(summary)  # the commit point of a finished run: last
    trackers.log_summary(summary)
    return summary


def _summary(cfg: ExperimentConfig, setup: Setup, history: list[dict], detail: dict) -> dict:
    last = history[-1]
    comm_per_round = [r["upload_bytes"] + r["download_bytes"] for r in history]

    def per_class(result: dict) -> list[float | None]:
        return [c / t if t else None for c, t in zip(result["correct_per_class"], result["total_per_class"])]

    summary = {
        "method": cfg.method, "seed": cfg.seed, "rounds": cfg.rounds, "num_clients": cfg.num_clients,
        "backbone": cfg.backbone, "eval_split": cfg.eval_split,
        # what reports call each client: its group with partition = "natural", else its id
        "client_names": setup.partition.names(cfg.num_clients),
        **{k: last[k] for k in ("global_accuracy", "personalized_accuracy", "personalized_accuracy_per_client",
                                "global_track_local_accuracy", "global_track_local_accuracy_per_client",
                                "train_loss", "upload_bytes", "download_bytes")},
        "worst_client_personalized_accuracy": min((a for a in last["personalized_accuracy_per_client"]
                                                   if a is not None), default=None),
        "personalized_global_test_accuracy_per_client": last.get("personalized_global_test_accuracy_per_client"),
        "personalized_global_test_accuracy": mean_present(
            last.get("personalized_global_test_accuracy_per_client") or []),
        "global_accuracy_per_class": per_class(detail["global"]),
        "personalized_accuracy_per_class_per_client": [per_class(detail["personalized"][c])
                                                       if c in detail["personalized"] else None
                                                       for c in range(cfg.num_clients)],
        "majority_floor_per_client": last.get("majority_floor_per_client"),
        "global_chance": last.get("global_chance"),
        "comm_bytes_per_round": float(np.mean(comm_per_round)),
        "comm_mib_per_round": float(np.mean(comm_per_round)) / MIB,
        "private_bytes_transmitted": sum(r["private_bytes_transmitted"] for r in history),
        "kstep": cfg.kstep, "kstep_lr": cfg.kstep_lr or cfg.lr, "kstep_params": cfg.kstep_params,
        "kstep_accuracy": None, "kstep_accuracy_per_client": None,
        # compute (docs/run-directory.md): sample passes of federated training and of K-step, and their
        # ratio to what fedavg_lora spends on the same clients, rounds and batches
        "train_sample_passes": sum(r.get("train_sample_passes", 0) for r in history),
        "reference_passes": sum(r.get("reference_passes", 0) for r in history),
        "kstep_sample_passes": 0,
        "global_track_params": sum(t.numel() for t in setup.model.global_params.values()),
        # what each client keeps and never sends: its private track and the local parts of its global adapter
        "private_track_params": sum(t.numel() for t in setup.model.private_state().values()),
        "precision": "bf16" if setup.model.autocast_dtype is not None else "fp32",
        "device": str(setup.model.device),
        "versions": _versions(),
    }
    summary["training_passes_vs_fedavg_lora"] = ratio(summary["train_sample_passes"], summary["reference_passes"])
    summary["kstep_passes_vs_fedavg_lora"] = summary["training_passes_vs_fedavg_lora"]  # until K-step runs
    if "private_sparsity" in last:
        summary["private_sparsity"] = last["private_sparsity"]
    summary["client_failures"] = _client_failures(history)
    summary["rounds_trained_per_client"] = rounds_trained(history, cfg.num_clients)
    summary["health"] = [entry for row in history for entry in row.get("health", [])]
    if privacy.enabled(cfg):
        summary.update(dp_mode=cfg.dp_mode, dp_clip=cfg.dp_clip, dp_noise_multiplier=cfg.dp_noise_multiplier,
                       dp_delta=cfg.dp_delta, dp_epsilon=last.get("dp_epsilon"))
    return summary


def rounds_trained(history: list[dict], num_clients: int) -> list[int]:
    """Per client, the rounds whose aggregate took its update: sampled (``participants``) and not rejected.
    With ``fraction_fit`` < 1 some clients train rarely or never; their personalized accuracy is then mostly
    the global track's (reports name them)."""
    counts = [0] * num_clients
    for row in history:
        for cid in row["participants"]:
            counts[cid] += str(cid) not in row.get("rejected", {})
    return counts


def _client_failures(history: list[dict]) -> list[dict]:
    """Every client that failed to train (or whose update was rejected) or to evaluate, per round."""
    return [{"round": row["round"], "client": int(cid), "stage": stage, "reason": why}
            for row in history for stage, key in (("fit", "rejected"), ("evaluate", "failed_evaluations"))
            for cid, why in sorted(row.get(key, {}).items(), key=lambda item: int(item[0]))]


def stop_on_unreadable_state(failed: dict[int, str], stage: str) -> None:
    """A client whose own saved state cannot be read stops the run with an error naming the file.
    Counting it as a failed client instead would finish a run that silently lacks that client in
    every remaining round (its private track can only come from that file)."""
    for cid, reason in sorted(failed.items()):
        if "StateFileError" in reason:
            raise StateFileError(f"client {cid} cannot read its own state in {stage}: {reason}. Restore the "
                                 "file and continue with --resume")
