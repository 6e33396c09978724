"""Print tuning tables (validation accuracies).

    python scripts/tune_table.py runs/tune_math            # one row per run directory under the folder
    python scripts/tune_table.py --kstep runs/tune_math/fedavg_lora   # the K-step grid of one run
"""
import json
import sys
from pathlib import Path


def private_density(summary: dict) -> float:
    """Share of the private LoRA weights left by the lottery-ticket mask, mean over clients."""
    sparsity = list(summary["private_sparsity"].values())
    return 1 - sum(sparsity) / len(sparsity)


def runs_table(root: Path) -> None:
    print("| run | split | global | personalized | worst client | k-step | private density | MiB/round | minutes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in sorted(root.glob("*/summary.json")):
        s = json.loads(path.read_text())
        k = f"{100 * s['kstep_accuracy']:.1f}" if s.get("kstep_accuracy") is not None else "-"
        worst = min(a for a in s["personalized_accuracy_per_client"] if a is not None)
        density = f"{private_density(s):.2f}" if s.get("private_sparsity") else "-"
        print(f"| {path.parent.name} | {s['eval_split']} | {100 * s['global_accuracy']:.1f} | "
              f"{100 * s['personalized_accuracy']:.1f} | {100 * worst:.1f} | {k} | {density} | "
              f"{s['comm_mib_per_round']:.2f} | {s['wall_seconds'] / 60:.1f} |")


def kstep_table(run: Path) -> None:
    results = [json.loads(p.read_text()) for p in (run / "kstep").glob("*.json")]
    steps = sorted({r["kstep"] for r in results})
    lrs = sorted({r["kstep_lr"] for r in results})
    cell = {(r["kstep"], r["kstep_lr"]): r["kstep_accuracy"] for r in results}
    print(f"K-step accuracy ({results[0]['eval_split']} rows) of `{run}`; rows = steps, columns = K-step lr\n")
    print("| steps | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |")
    print("|---|" + "---|" * len(lrs))
    for s in steps:
        print(f"| {s} | " + " | ".join(f"{100 * cell[s, lr]:.1f}" if (s, lr) in cell else "-" for lr in lrs) + " |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--kstep"]:
        kstep_table(Path(sys.argv[2]))
    else:
        runs_table(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tune"))
