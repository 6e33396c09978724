"""``fedslip compare``: every method x seed on identical partitions per seed, resumable, then a report.

    fedslip compare --config configs/seed_cpu.toml --methods fedavg_lora,dual_naive,fedslip \
        --seeds 0,1,2 --out docs/results/seed_cpu

Runs live in ``OUT/<method>-seed<seed>/``. A finished run is skipped, an interrupted one resumed, so
an interrupted comparison continues where it stopped. Partitions depend only on the seed and the data
settings, so all methods of one seed see the same clients.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from . import api
from .config import RUN_ONLY_KEYS, load_config, make_config
from .experiment import RunDirError
from .report import build_report, load_run

log = logging.getLogger("fedslip")


def run_dir_for(out: Path, method: str, seed: int) -> Path:
    return Path(out) / f"{method}-seed{seed}"


def compare(methods: list[str], seeds: list[int], out: str | Path, overrides: dict[str, Any] | None = None,
            toml_path: str | Path | None = None, command: str = "", progress: bool = True,
            method_configs: dict[str, str | Path] | None = None, allow_incomplete: bool = False) -> dict:
    """Run (or skip / resume) each method x seed, then write ``results.json``, ``report.md`` and PNGs.

    ``method_configs``: a TOML file per method that replaces ``toml_path`` for that method (e.g. the
    ``best.toml`` of its ``fedslip tune`` study, so that every method runs at its own tuned settings).
    ``allow_incomplete``: count runs that lost clients in the report's verdict (``report.build_report``)."""
    if not methods or not seeds:
        raise ValueError("compare needs at least one method and one seed")
    unknown = sorted(set(method_configs or {}) - set(methods))
    if unknown:
        raise ValueError(f"--method-config for {', '.join(unknown)}, which --methods does not list")
    overrides = {k: v for k, v in (overrides or {}).items() if k not in ("method", "seed")}
    configs = {(m, s): make_config({**overrides, "method": m, "seed": s}, (method_configs or {}).get(m, toml_path))
               for s in seeds for m in methods}
    for (method, seed), cfg in configs.items():  # check every existing run before spending hours on any
        path = run_dir_for(out, method, seed)
        existing = load_config(path / "config.toml") if (path / "config.toml").is_file() else None
        if existing is not None and cfg.experiment_diff(existing.experiment_dict()):
            raise RunDirError(f"{path} holds a run with a different config; use another --out or remove it")
    for (method, seed), cfg in configs.items():
        path = run_dir_for(out, method, seed)
        if (path / "summary.json").is_file():
            log.info("skipping %s (finished)", path)
        elif (path / "config.toml").is_file():
            log.info("resuming %s", path)
            api.resume(path, progress=progress, run_only={k: getattr(cfg, k) for k in overrides if k in RUN_ONLY_KEYS})
        else:
            log.info("running %s", path)
            api.run(cfg, path, progress=progress)
    runs = [load_run(run_dir_for(out, m, s)) for s in seeds for m in methods]
    return build_report(sorted(runs, key=lambda r: (r.method, r.cfg.seed)), Path(out), command, allow_incomplete)
