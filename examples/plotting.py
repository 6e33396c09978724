"""Tables and inline plots for the example notebooks, read from run directories.

Per round from ``metrics.jsonl``, final values from ``summary.json`` (docs/run-directory.md); nothing
here trains or changes a run. Each method has the colour it has in every ``fedslip report`` figure.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from fedslip.report import method_color

# summary.json key -> column name, in the order of the README's results table
FINAL_COLUMNS = {
    "global_accuracy": "global",
    "personalized_accuracy": "personalized (zero-shot)",
    "worst_client_personalized_accuracy": "worst client",
    "kstep_accuracy": "after K-step",
    "personalized_global_test_accuracy": "personalized model on the global test set",
}
BARS = ("global_accuracy", "personalized_accuracy", "kstep_accuracy")


def load_summary(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def load_rounds(run_dir: str | Path) -> pd.DataFrame:
    """One row per round, as ``metrics.jsonl`` holds it."""
    return pd.read_json(Path(run_dir) / "metrics.jsonl", lines=True)


def summary_table(runs: dict[str, str | Path]) -> pd.DataFrame:
    """Final accuracies (%) and MiB per round of each run, one row per run."""
    rows = {}
    for name, run_dir in runs.items():
        summary = load_summary(run_dir)
        rows[name] = {column: None if summary.get(key) is None else 100 * summary[key]
                      for key, column in FINAL_COLUMNS.items()}
        rows[name]["majority-class floor"] = 100 * np.mean(summary["majority_floor_per_client"])
        rows[name]["MiB per round"] = summary["comm_mib_per_round"]
        rows[name]["private bytes sent"] = summary["private_bytes_transmitted"]
    return pd.DataFrame.from_dict(rows, orient="index").round(3)


def per_client_table(run_dir: str | Path) -> pd.DataFrame:
    """Each client's accuracy (%) on its own test rows: zero-shot, global track alone, after K-step."""
    summary = load_summary(run_dir)
    columns = {"personalized (zero-shot)": "personalized_accuracy_per_client",
               "global track alone": "global_track_local_accuracy_per_client",
               "after K-step": "kstep_accuracy_per_client",
               "majority-class floor": "majority_floor_per_client"}
    table = pd.DataFrame({name: summary[key] for name, key in columns.items() if summary.get(key) is not None})
    table.index.name = "client"
    return (100 * table).round(1)


def plot_runs(runs: dict[str, str | Path]) -> None:
    """Left: global and personalized accuracy per round. Right: final global / personalized / K-step
    accuracy. The dotted line is the clients' mean majority-class floor (always predicting a client's
    most frequent class)."""
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(runs)
    floors = []
    for i, (name, run_dir) in enumerate(runs.items()):
        rounds, summary = load_rounds(run_dir), load_summary(run_dir)
        color = method_color(summary["method"])
        curves.plot(rounds["round"], 100 * rounds["global_accuracy"], "o-", color=color, label=f"{name}: global")
        curves.plot(rounds["round"], 100 * rounds["personalized_accuracy"], "s--", color=color,
                    label=f"{name}: personalized")
        values = [np.nan if summary.get(key) is None else 100 * summary[key] for key in BARS]
        drawn = bars.bar(np.arange(len(BARS)) + i * width, values, width, color=color, label=name)
        bars.bar_label(drawn, fmt="%.1f", fontsize=8)
        floors.append(np.mean(summary["majority_floor_per_client"]))
    for ax in (curves, bars):
        ax.axhline(100 * np.mean(floors), color="gray", linestyle=":", label="majority-class floor")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
    curves.set_xlabel("round")
    curves.set_ylabel("accuracy (%)")
    curves.set_xticks(rounds["round"])
    curves.set_title("Accuracy per round (metrics.jsonl)", fontsize=10)
    curves.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    bars.set_xticks(np.arange(len(BARS)) + width * (len(runs) - 1) / 2,
                    ["global\n(global test set)", "personalized, zero-shot\n(own test rows)",
                     "after K-step\n(own test rows)"])
    bars.set_title("Final accuracy (summary.json)", fontsize=10)
    bars.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=len(runs) + 1)
    fig.tight_layout()
    plt.show()
