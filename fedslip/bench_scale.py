"""``fedslip bench-scale --out DIR``: memory and time as the federation grows, few clients sampled per round.

    fedslip bench-scale --out docs/results/bench_scale                        # tiny + MiniLM, embedded + flower-sim
    fedslip bench-scale --out runs/bs --backbone tiny --engines embedded      # the quick check

Each point is one ``fedslip run`` in its own process: FedSLIP on IID rows, ``rows_per_client`` training rows
and half as many test rows per client, 4 rounds, K-step off, at 10, 100 and 1,000 clients with 10 clients
sampled to train and 10 to be evaluated per round (``fraction_fit`` = ``eval_fraction`` = 10 / clients),
and at 1,000 clients with 100 sampled: round time should follow the sampled clients, not the federation.
Reported per point:

- peak memory of the run's whole process tree (Ray's processes included), the sum of the processes'
  proportional set sizes (PSS: shared pages counted once), sampled every 0.2 s with psutil;
- setup seconds: from the process start until round 1 begins (imports, data, backbone, clients);
- the first round's seconds (flower-sim starts its Ray workers and their backbones in it);
- seconds per round: the mean of the rounds between the first and the last (the steady state);
- the last round's seconds (training + the final evaluation of every client).

A benchmark measures; it asserts nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from .config import make_config
from .storage import read_json, write_json

POINTS = ((10, 10), (100, 10), (1000, 10), (1000, 100))  # (clients, sampled per round)
MIB = 1024 * 1024


class BenchError(RuntimeError):
    """A benchmark run failed; the message names its log."""


def point_values(clients: int, sampled: int, backbone: str, engine: str, rows_per_client: int,
                 data_dir: str) -> dict:
    return dict(method="fedslip", backbone=backbone, engine=engine, num_clients=clients, partition="iid",
                samples_per_client=rows_per_client, test_samples_per_client=max(1, rows_per_client // 2),
                global_test_samples=200, rounds=4, fraction_fit=sampled / clients, eval_fraction=sampled / clients,
                kstep=0, batch_size=8, data_dir=data_dir)


def _tree_memory(root: psutil.Process) -> int:
    """PSS of ``root`` and all its descendants (processes that vanish meanwhile count 0)."""
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except psutil.Error:
            pass
    return total


def measure(values: dict, run_dir: Path, log_path: Path, poll_s: float = 0.2) -> dict:
    """``fedslip run`` of ``values`` in a child process, its process tree's peak memory sampled meanwhile."""
    toml = log_path.with_suffix(".toml")
    make_config(values).save(toml)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fedslip.cli", "run", "--config", str(toml), "--out",
                                 str(run_dir), "--quiet"], stdout=log, stderr=subprocess.STDOUT)
    root, peak, first_row = psutil.Process(proc.pid), 0, None
    while proc.poll() is None:
        peak = max(peak, _tree_memory(root))
        if first_row is None and (run_dir / "metrics.jsonl").is_file():
            first_row = time.perf_counter() - started
        time.sleep(poll_s)
    if proc.returncode != 0:
        raise BenchError(f"the run of {toml} failed (exit {proc.returncode}); its log: {log_path}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["seconds"] for r in rows]
    return {"clients": values["num_clients"], "sampled": round(values["fraction_fit"] * values["num_clients"]),
            "peak_memory_mib": peak / MIB, "setup_seconds": (first_row or 0.0) - seconds[0],
            "first_round_seconds": seconds[0], "seconds_per_round": sum(seconds[1:-1]) / (len(seconds) - 2),
            "last_round_seconds": seconds[-1],
            "wall_seconds": read_json(run_dir / "summary.json")["wall_seconds"]}


def bench_scale(out: str | Path, backbones: tuple[str, ...] = ("tiny", "minilm"),
                engines: tuple[str, ...] = ("embedded", "flower-sim"), rows_per_client: int = 8,
                points: tuple[tuple[int, int], ...] = POINTS, data_dir: str = "") -> dict:
    """Every (backbone, engine, point); finished points in ``OUT/bench_scale.json`` are kept, so a rerun
    continues. Writes ``bench_scale.json``, ``bench_scale.md`` and ``bench_scale.png``, and each point's
    config and log in ``OUT/logs``; the run directories (1,000 clients' private states) are temporary."""
    out = Path(out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    path = out / "bench_scale.json"
    results = read_json(path) if path.is_file() else {"rows_per_client": rows_per_client, "points": {}}
    data_dir = data_dir or os.environ.get("FEDSLIP_DATA_DIR", "")
    for backbone in backbones:
        for engine in engines:
            for clients, sampled in points:
                key = f"{backbone}/{engine}/{clients}/{sampled}"
                if key in results["points"]:
                    continue
                values = point_values(clients, sampled, backbone, engine, rows_per_client, data_dir)
                with tempfile.TemporaryDirectory() as tmp:
                    measured = measure(values, Path(tmp) / "run", out / "logs" / f"{key.replace('/', '-')}.log")
                results["points"][key] = {"backbone": backbone, "engine": engine, **measured}
                write_json(path, results)
    (out / "bench_scale.md").write_text(table(results) + "\n")
    plot(results, out / "bench_scale.png")
    return results


def table(results: dict) -> str:
    lines = ["| backbone | engine | clients | sampled per round | peak memory (MiB) | setup s | first round s | "
             "s per round | last round s (evaluates all) |", "|---|---|---|---|---|---|---|---|---|"]
    for p in results["points"].values():
        lines.append(f"| {p['backbone']} | {p['engine']} | {p['clients']} | {p['sampled']} | "
                     f"{p['peak_memory_mib']:.0f} | {p['setup_seconds']:.1f} | {p['first_round_seconds']:.1f} | "
                     f"{p['seconds_per_round']:.2f} | {p['last_round_seconds']:.1f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, sec) = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[tuple[str, str], list[dict]] = {}
    for p in results["points"].values():
        series.setdefault((p["backbone"], p["engine"]), []).append(p)
    for (backbone, engine), points in series.items():
        ten = sorted((p for p in points if p["sampled"] == 10), key=lambda p: p["clients"])
        label = f"{backbone}, {engine}"
        mem.plot([p["clients"] for p in ten], [p["peak_memory_mib"] for p in ten], marker="o", label=label)
        largest = max(p["clients"] for p in points)
        many = sorted((p for p in points if p["clients"] == largest), key=lambda p: p["sampled"])
        sec.plot([p["sampled"] for p in many], [p["seconds_per_round"] for p in many], marker="o", label=label)
    mem.set(xscale="log", xlabel="clients (10 sampled per round)", ylabel="peak memory, MiB (PSS of the process tree)",
            ylim=(0, None))
    sec.set(xscale="log", yscale="log", xlabel="clients sampled per round (1,000 clients)", ylabel="seconds per round")
    for ax in (mem, sec):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
