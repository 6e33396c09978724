"""``fedslip.run(config, out)``, ``fedslip.resume(out)``, ``fedslip.kstep(out, steps)``: the Python API the
CLI calls. The round loop itself is ``fedslip.rounds``.

    >>> import fedslip
    >>> cfg = fedslip.make_config({"backbone": "tiny", "rounds": 2, "samples_per_client": 64,
    ...                            "test_samples_per_client": 64})
    >>> summary = fedslip.run(cfg, "runs/tiny")          # doctest: +SKIP
    >>> summary["personalized_accuracy"]                  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from . import comm
from .config import ConfigError, ExperimentConfig, check_run_only, load_config
from .engines.embedded import EmbeddedEngine
from .experiment import RunDir, RunDirError, build_clients
from .rounds import mean_present, per_client, prepare_for, ratio, resumable_config, start, start_resumed
from .server import RoundFailed
from .storage import atomic_write_bytes, finished_run, load_tensors, read_json, write_json
from .tracking import Callback

log = logging.getLogger("fedslip")


def run(cfg: ExperimentConfig, out: str | Path, overwrite: bool = False, progress: bool = True,
        callbacks: Iterable[Callback] = (), log: bool = True) -> dict:
    """Run one federated experiment into ``out`` and return its summary (also ``out/summary.json``).

    ``cfg.engine`` picks who carries the messages: ``embedded`` (this process, or ``parallel_clients``
    worker processes) or ``flower-sim`` (Flower's simulation runtime). The rounds are the same code.
    ``callbacks``: callables given each round's metrics row (as in ``metrics.jsonl``) after the round is
    checkpointed; ``cfg.report_to`` names trackers fed the same rows (``fedslip.tracking``). ``log``:
    the round lines reach the console (a notebook's output) even where logging is not configured.
    """
    with console_log(log):
        if cfg.engine == "flower-sim":
            from .launch.simulation import simulate

            return simulate(cfg, out, overwrite=overwrite, progress=progress, callbacks=callbacks)
        return start(cfg, out, overwrite, progress, callbacks=callbacks)


def resume(out: str | Path, progress: bool = True, callbacks: Iterable[Callback] = (), log: bool = True,
           run_only: dict[str, Any] | None = None) -> dict:
    """Continue an interrupted run from its last completed round; the result equals an uninterrupted run.

    ``run_only``: new values of run-only keys (``config.RUN_ONLY_KEYS``: ``strict_health``, ``report_to``,
    ``engine``, timeouts, ...), e.g. ``{"strict_health": False}`` to finish a run that strict health stopped.
    They replace the run's own in ``out/config.toml``; any other key is refused (it would change the experiment)."""
    check_run_only(run_only or {})  # a key it cannot take is refused first, whatever the directory holds
    with console_log(log):
        cfg = resumable_config(Path(out))
        if run_only:
            cfg = cfg.with_run_only(run_only)
            atomic_write_bytes(Path(out) / "config.toml",
                               dataclasses.replace(cfg, data_dir=cfg.resolved_data_dir()).to_toml().encode())
        if cfg.engine == "flower-sim":
            from .launch.simulation import simulate

            return simulate(cfg, out, resume=True, progress=progress, callbacks=callbacks)
        return start_resumed(out, progress, callbacks=callbacks)


LOG_FORMAT, LOG_DATE_FORMAT = "%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"


@contextlib.contextmanager
def console_log(enabled: bool) -> Iterator[None]:
    """Round lines at INFO with timestamps on stderr for the duration of a call, when nothing else shows
    them (no handler on the ``fedslip`` logger or the root logger: a notebook, a plain script). A program
    that configures logging itself (the CLI does) keeps its own handlers."""
    if not enabled or log.handlers or logging.getLogger().handlers:
        yield
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def kstep(out: str | Path, steps: int, lr: float | None = None, allow_test: bool = False) -> dict:
    """K-step on a finished run: every client fine-tunes the run's final model for ``steps`` steps at
    ``lr`` (None = the run's ``kstep_lr``; 0 = the run's ``lr``), exactly as the run's own K-step would
    with those settings (docs/methods.md, K-step), and is evaluated on the run's evaluation rows.
    Nothing of the run is changed; the result is also written to ``out/kstep/steps<N>-lr<X>.json``.

    It exists to choose ``kstep`` / ``kstep_lr``, which must be chosen on validation rows: a run made on the
    test split (``eval_split = "test"``) is refused unless ``allow_test`` (``--allow-test``).

        fedslip kstep --run runs/tune/fedavg_lora --steps 100 --lr 1e-3
    """
    run_dir = RunDir(finished_run(out))
    if steps <= 0:
        raise ConfigError(f"kstep needs steps > 0, got {steps}")
    cfg = load_config(run_dir.path / "config.toml")
    if cfg.eval_split == "test" and not allow_test:
        raise ConfigError(f"{run_dir.path} was evaluated on the test split (eval_split = 'test'): choosing K-step's "
                          "steps or learning rate on test rows makes the reported K-step accuracy optimistic. Use a "
                          "run made with --eval-split val (e.g. a fedslip tune trial), or pass --allow-test "
                          "(Python: allow_test=True) to measure on test rows anyway")
    cfg = dataclasses.replace(cfg, kstep=steps, kstep_lr=cfg.kstep_lr if lr is None else lr)
    setup = prepare_for(run_dir, cfg)
    engine = EmbeddedEngine(build_clients(setup, run_dir))
    final = comm.encode(load_tensors(run_dir.path / "global.safetensors"))
    results, failed = engine.kstep(dict.fromkeys(range(cfg.num_clients), final), steps)
    if failed:
        raise RoundFailed(f"K-step failed on client(s) {sorted(failed)}: {failed}")
    accuracies = per_client(results, cfg.num_clients)
    effective_lr = cfg.kstep_lr or cfg.lr
    summary = read_json(run_dir.path / "summary.json")
    passes = sum(r.get("sample_passes", 0) for r in results.values())
    result = {"run": str(run_dir.path), "eval_split": cfg.eval_split, "kstep": steps, "kstep_lr": effective_lr,
              "kstep_params": cfg.kstep_params, "kstep_accuracy": mean_present(accuracies),
              "kstep_accuracy_per_client": accuracies, "kstep_sample_passes": passes,
              "kstep_passes_vs_fedavg_lora": ratio(summary.get("train_sample_passes", 0) + passes,
                                                   summary.get("reference_passes", 0))}
    write_json(run_dir.path / "kstep" / f"steps{steps}-lr{effective_lr:g}.json", result)
    return result


def equal_compute_steps(out: str | Path, match: str | Path) -> int:
    """K-step steps per client that bring run ``out`` (e.g. fedavg_lora) to the training passes run
    ``match`` (e.g. fedslip, zero-shot) spent in its federation: K = ceil((passes of ``match`` - passes
    of ``out``) / (clients x batch_size)). The baseline a reviewer asks for first: the same compute,
    spent on fine-tuning instead of a private track.

        fedslip kstep --run runs/fedavg_lora --match-compute runs/fedslip
    """
    summaries = {}
    for name, path in (("run", Path(out)), ("match", Path(match))):
        summaries[name] = read_json(finished_run(path) / "summary.json")
        if not summaries[name].get("train_sample_passes"):
            raise RunDirError(f"{path}: its summary.json records no training passes (a run made before compute "
                              "was recorded); rerun it")
    cfg = load_config(Path(out) / "config.toml")
    extra = summaries["match"]["train_sample_passes"] - summaries["run"]["train_sample_passes"]
    if extra <= 0:
        spent = (summaries["match"]["train_sample_passes"], summaries["run"]["train_sample_passes"])
        raise ConfigError(f"{match} spent no more training passes than {out} ({spent[0]} vs {spent[1]}): "
                          "nothing to match")
    return -(-extra // (cfg.num_clients * cfg.batch_size))


EQUAL_COMPUTE_KEYS = ("equal_compute_kstep_accuracy", "equal_compute_kstep_accuracy_per_client",
                      "equal_compute_kstep", "equal_compute_matched_to", "equal_compute_passes_vs_fedavg_lora")


def equal_compute_kstep(out: str | Path, match: str | Path) -> dict:
    """The K-step of run ``out`` that spends the training passes run ``match`` spent (``equal_compute_steps``),
    at ``out``'s own (validation-tuned) ``kstep_lr``, recorded in ``out``'s summary.json as the
    ``EQUAL_COMPUTE_KEYS`` (reports show it as the row "<method> + equal-compute K-step"; the verdict pairs
    FedSLIP's zero-shot accuracy with it). It chooses nothing, so it runs on test rows too. A second call
    with another ``match`` replaces the record.

        fedslip kstep --run runs/fedavg_lora-seed0 --match-compute runs/fedslip-seed0
    """
    steps = equal_compute_steps(out, match)
    result = kstep(out, steps, allow_test=True)
    summary_path = Path(out) / "summary.json"
    summary = read_json(summary_path)
    summary.update(zip(EQUAL_COMPUTE_KEYS, (result["kstep_accuracy"], result["kstep_accuracy_per_client"], steps,
                                            str(match), result["kstep_passes_vs_fedavg_lora"])))
    write_json(summary_path, summary)
    return result
