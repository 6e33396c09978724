"""Accuracy against the private track's density: finished FedSLIP runs that differ only in the
magnitude-pruning mask's target sparsity (and the prune rate that reaches it).

    T=docs/results/tuning_runs   # config, metrics, summary of the second/third hand passes (docs/results/tuning.md)
    python scripts/density_plot.py docs/results/density $T/fedslip_phase-first_sparsity0 \
        $T/fedslip_phase-first_sparsity0.25 $T/fedslip_phase-first $T/fedslip_phase-first_sparsity0.75 \
        $T/fedslip_phase-first_sparsity0.9

Writes ``density.png`` and ``density.md`` (the table, with the runs it came from) into the first folder.
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def private_density(summary: dict) -> float:
    """Share of the private LoRA weights left by the magnitude-pruning mask, mean over clients."""
    sparsity = list(summary["private_sparsity"].values())
    return 1 - sum(sparsity) / len(sparsity)


SERIES = (("personalized_accuracy", "personalized (zero-shot)"), ("worst_client_personalized_accuracy",
          "worst client"), ("global_accuracy", "global"))


def main(out: Path, runs: list[Path]) -> None:
    rows = sorted(((private_density(s), run, s) for run in runs
                   for s in [json.loads((run / "summary.json").read_text())]), key=lambda r: r[0])
    out.mkdir(parents=True, exist_ok=True)
    split = {s["eval_split"] for _, _, s in rows}
    lines = [f"Accuracy ({'/'.join(sorted(split))} rows, seed 0) against the private track's density "
             "(share of private LoRA weights kept by the mask).", "",
             "| private density | personalized | worst client | global | run |", "|---|---|---|---|---|"]
    for d, run, s in rows:
        lines.append(f"| {d:.2f} | {100 * s['personalized_accuracy']:.1f} | "
                     f"{100 * s['worst_client_personalized_accuracy']:.1f} | {100 * s['global_accuracy']:.1f} | "
                     f"`{run}` |")
    (out / "density.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in SERIES:
        ax.plot([d for d, _, _ in rows], [100 * s[key] for _, _, s in rows], marker="o", label=label)
    ax.set_xlabel("private track density (1 - sparsity)")
    ax.set_ylabel(f"accuracy on {'/'.join(sorted(split))} rows (%)")
    ax.set_title("FedSLIP: accuracy vs private density")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "density.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
