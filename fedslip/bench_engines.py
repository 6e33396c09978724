"""``fedslip bench-engines --out DIR``: per-round wall time of the same run on every engine.

    fedslip bench-engines --out docs/results/bench_engines          # tiny backbone, synthetic-free: AG News
    fedslip bench-engines --out runs/be --backbone minilm --rounds 2

Runs one config (FedSLIP, ``num_clients`` clients, K-step off) on
- ``embedded``: this process, clients one after another;
- ``flower-sim``: ``fedslip run --engine flower-sim`` (Flower's Ray simulation, in-process ServerApp);
- ``flwr-run-sim``: ``flwr run`` on a ``flower-superlink --simulation`` (ServerApp in its own process);
- ``deployment``: ``flwr run`` on a SuperLink + one SuperNode per client, all on 127.0.0.1.
and reports each engine's seconds per round (metrics.jsonl ``seconds``: the round's fit, aggregation and
evaluation) and its overhead over the embedded engine. Round 1 carries the start-up (Ray actors, the
first ClientApp processes), so steady state is the mean of rounds 2.. . All runs give the same accuracy
(tests check that); this only measures time. A benchmark asserts nothing.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from . import api
from .config import make_config
from .launch.deployment import LocalDeployment, flower_run_config
from .storage import write_json


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


ENGINES = ("embedded", "flower-sim", "flwr-run-sim", "deployment")


def bench_engines(out: str | Path, backbone: str = "tiny", rounds: int = 3, num_clients: int = 2,
                  data_dir: str = "", engines: tuple[str, ...] = ENGINES) -> dict:
    """Time the same run on ``engines`` (``embedded`` always first: the reference)."""
    out = Path(out)
    engines = ("embedded", *[e for e in engines if e != "embedded"])
    values = dict(method="fedslip", backbone=backbone, rounds=rounds, num_clients=num_clients, kstep=0,
                  samples_per_client=64, test_samples_per_client=32, global_test_samples=128,
                  data_dir=data_dir or os.environ.get("FEDSLIP_DATA_DIR", ""))
    cfg = make_config(values)
    results: dict = {"config": {k: v for k, v in values.items() if k != "data_dir"}, "engines": {}}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for name in engines:
            t0 = time.perf_counter()
            if name in ("embedded", "flower-sim"):
                run_dir = Path(tmp) / name
                api.run(make_config({**values, "engine": name}), run_dir, progress=False)
            else:
                workdir = Path(tmp) / name
                with LocalDeployment(workdir, num_clients, simulation=name == "flwr-run-sim") as fed:
                    fed.run({**flower_run_config(cfg), "out": str(workdir / "run")})
                run_dir = workdir / "run"
            runs[name] = (run_dir, time.perf_counter() - t0)
        base = None
        for name, (run_dir, total) in runs.items():
            rows = _rows(run_dir)
            seconds = [r["seconds"] for r in rows]
            steady = sum(seconds[1:]) / max(1, len(seconds) - 1)
            base = base if base is not None else steady
            results["engines"][name] = {"round_seconds": seconds, "steady_round_seconds": steady,
                                        "overhead_vs_embedded_seconds": steady - base,
                                        "total_seconds_incl_startup": total,
                                        "bytes_per_round": rows[-1]["upload_bytes"] + rows[-1]["download_bytes"],
                                        "global_accuracy": rows[-1]["global_accuracy"]}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench_engines.json", results)
    return results


def table(results: dict) -> str:
    lines = ["| engine | round 1 s | steady round s (rounds 2..) | overhead vs embedded | whole run incl. start-up "
             "| bytes/round | global acc |", "|---|---|---|---|---|---|---|"]
    for name, r in results["engines"].items():
        lines.append(f"| {name} | {r['round_seconds'][0]:.1f} | {r['steady_round_seconds']:.1f} | "
                     f"{r['overhead_vs_embedded_seconds']:+.1f} s | {r['total_seconds_incl_startup']:.0f} s | "
                     f"{r['bytes_per_round']} | {r['global_accuracy']:.4f} |")
    return "\n".join(lines)
