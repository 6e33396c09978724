"""Replay the run-health rules (fedslip.health) over every committed run in docs/results.

    python scripts/health_replay.py            # prints each flagged round and the number of runs read

Runs made before the health checks existed lack the per-round ``global_chance`` and
``majority_floor_per_client``: chance is taken as 1/4 (balanced AG News) and the floors from the run's
summary. docs/usage.md (Run health) quotes the result.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedslip import health  # noqa: E402


def main(root: Path) -> None:
    runs = 0
    for metrics in sorted(root.glob("**/metrics.jsonl")):
        summary_path = metrics.parent / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        floors = summary.get("majority_floor_per_client")
        history = []
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            row.setdefault("global_chance", 0.25)
            if floors:
                row.setdefault("majority_floor_per_client", floors)
            history.append(row)
            for entry in health.check_round(history):
                print(f"{metrics.parent.relative_to(root)}: {health.message(entry)[:160]}")
        runs += 1
    print(f"{runs} runs read")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "docs" / "results")
