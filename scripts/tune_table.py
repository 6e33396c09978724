"""Print the tuning table: one row per run directory under the given folder (validation accuracies)."""
import json
import sys
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tune")
print("| run | split | global | personalized | k-step | MiB/round | minutes |")
print("|---|---|---|---|---|---|---|")
for path in sorted(root.glob("*/summary.json")):
    s = json.loads(path.read_text())
    k = f"{100 * s['kstep_accuracy']:.1f}" if s.get("kstep_accuracy") is not None else "-"
    print(f"| {path.parent.name} | {s['eval_split']} | {100 * s['global_accuracy']:.1f} | "
          f"{100 * s['personalized_accuracy']:.1f} | {k} | {s['comm_mib_per_round']:.2f} | "
          f"{s['wall_seconds'] / 60:.1f} |")
