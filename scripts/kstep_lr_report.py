"""docs/results/kstep_lr/report.md and kstep_lr.json from scripts/kstep_lr.sh's runs: each preset's K-step
accuracy on validation rows at every learning rate of the grid, and the chosen kstep_lr (the best one;
ties go to the smaller rate).

    python scripts/kstep_lr_report.py [docs/results/kstep_lr]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import tomllib

root = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/kstep_lr")
rows, chosen = [], {}
for pointer in sorted(root.glob("*/run.txt")):  # written by scripts/kstep_lr.sh: the run each grid ran on
    method, run = pointer.parent.name, Path(pointer.read_text().strip())
    summary = json.loads((run / "summary.json").read_text())
    steps = tomllib.loads((run / "config.toml").read_text())["kstep"]  # the protocol's K; other K-steps aside
    results = sorted((r for r in map(json.loads, map(Path.read_text, (run / "kstep").glob("*.json")))
                      if r["kstep"] == steps), key=lambda r: r["kstep_lr"])
    if not results:
        continue
    best = max(results, key=lambda r: (r["kstep_accuracy"], -r["kstep_lr"]))
    chosen[method] = {"kstep_lr": best["kstep_lr"], "kstep": best["kstep"], "kstep_accuracy": best["kstep_accuracy"],
                      "zero_shot_accuracy": summary["personalized_accuracy"], "run": str(run)}
    rows.append((method, summary, results, best))

grid = sorted({r["kstep_lr"] for _, _, results, _ in rows for r in results})
lines = [
    "# kstep_lr per method (validation rows)", "",
    "Each preset's chosen validation trial (docs/results/tuning/<preset>/best.json, after the rescore on seed 1)",
    "at validation seed 1, then `fedslip kstep` at every learning rate below (the one K-step protocol,",
    "docs/methods.md) on that run. Made with:", "",
    "```bash", "JOBS=2 scripts/kstep_lr.sh && python scripts/kstep_lr_report.py", "```", "",
    "| method | zero-shot | " + " | ".join(f"K-step at {lr:g}" for lr in grid)
    + " | chosen kstep_lr | K-step steps | training passes vs fedavg_lora | with K-step |",
    "|---|---|" + "---|" * len(grid) + "---|---|---|---|",
]
for method, summary, results, best in rows:
    at = {r["kstep_lr"]: r["kstep_accuracy"] for r in results}
    cells = [f"{100 * at[lr]:.1f}" if lr in at else "–" for lr in grid]
    lines.append(f"| {method} | {100 * summary['personalized_accuracy']:.1f} | " + " | ".join(cells)
                 + f" | {best['kstep_lr']:g} | {best['kstep']} | {summary['training_passes_vs_fedavg_lora']:.2f}x"
                 f" | {best['kstep_passes_vs_fedavg_lora']:.2f}x |")
lines += ["", "Accuracies in %, mean over the clients' validation rows; one validation seed (1). Training passes",
          "vs fedavg_lora: forward/backward sample passes of the federation over fedavg_lora's on the same clients",
          "and batches; with K-step: federation + the K-step's passes, over the same denominator."]
(root / "report.md").write_text("\n".join(lines) + "\n")
(root / "kstep_lr.json").write_text(json.dumps(chosen, indent=2) + "\n")
print("\n".join(lines))
