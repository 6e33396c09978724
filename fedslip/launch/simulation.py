"""The Flower simulation launcher (``engine = "flower-sim"``): the run on Flower's simulation runtime
(Ray) in this process, ``num_clients`` virtual SuperNodes answering the ServerApp's ``FlowerEngine``.

    fedslip run --engine flower-sim --method fedslip --out runs/flower-sim
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.simulation import run_simulation

from ..config import ExperimentConfig
from ..experiment import RunDir, prepare
from ..flower_app import make_client_app, make_server_app
from ..health import HealthError
from ..rounds import resume_point
from ..storage import read_json
from .environment import flower_environment, ray_temp_dir, scoped_environment


def simulate(cfg: ExperimentConfig, out: str | Path, overwrite: bool = False, resume: bool = False,
             progress: bool = True, callbacks: Iterable[Callable[[dict], Any]] = ()) -> dict:
    """Run (or resume) the experiment on Flower's simulation runtime (Ray): ``num_clients`` virtual
    SuperNodes, ``client_cpus`` cores each; Ray's temp dir and FLWR_HOME inside ``out``."""
    # every refusal before Ray starts: no Ray/Flower noise, no .ray/ or .flwr/ left in ``out``
    run_dir = RunDir(Path(out))
    if resume:
        resume_point(run_dir)
    else:
        run_dir.check_writable(overwrite)
    prepare(cfg)  # bad data, partition sizes, backbone files, max_seq_len: before Ray or any directory
    run_path = run_dir.path.resolve()
    run_path.mkdir(parents=True, exist_ok=True)
    with scoped_environment(flower_environment(run_path)), ray_temp_dir(run_path / ".ray") as ray_tmp:
        backend = {"client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": 0.0},
                   "init_args": {"_temp_dir": ray_tmp, "num_cpus": max(os.cpu_count() or 1, cfg.client_cpus)}}
        server_app = make_server_app(cfg, run_path, overwrite=overwrite, resume=resume, progress=progress,
                                     callbacks=callbacks)
        client_app = make_client_app(cfg, state_root=run_path / "clients")
        run_simulation(server_app, client_app, num_supernodes=cfg.num_clients, backend_config=backend)

    summary_path = run_path / "summary.json"
    if not summary_path.is_file():
        checkpoint = run_dir.load_checkpoint()
        last = checkpoint.history[-1] if checkpoint is not None and checkpoint.history else {}
        if cfg.strict_health and last.get("health"):  # the ServerApp stopped the run (its error stays in Ray)
            raise HealthError.of(last, run_path)
        raise RuntimeError(f"the Flower simulation ended without writing {summary_path}; see the log above")
    return read_json(summary_path)
