"""docs/results/privacy/report.md from the settings scripts/privacy.sh ran.

    python scripts/privacy_table.py [docs/results/privacy]

One row per setting and method: utility (global, zero-shot personalized), the two attacks' accuracy at
guessing each client's dominant class (chance 25%), and epsilon; mean (± std) over the seeds that ran.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def _cell(values: list[float | None], pct: bool = True) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    scale = 100 if pct else 1
    mean = scale * float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.1f}" if pct else f"{mean:.3g}"
    return f"{mean:.1f} ± {scale * float(np.std(values, ddof=1)):.1f}" if pct else f"{mean:.3g}"


def _attack(results: list[dict | None]) -> str:
    """Mean accuracy over the seeds, with the right guesses out of all of them (4 clients x 5 rounds per seed)."""
    found = [r for r in results if r is not None]
    if not found:
        return "-"
    right = sum(round(r["accuracy"] * r["guesses"]) for r in found)
    return f"{_cell([r['accuracy'] for r in found])} ({right}/{sum(r['guesses'] for r in found)})"


# each attack's result in an audit.json (None where it did not run: no classifier sent, no public data)
ATTACKS = {"bias": lambda audit: audit if audit["available"] else None,
           "shadow": lambda audit: audit.get("shadow")}


def rows(root: Path) -> list[str]:
    lines = []
    for setting in sorted(p for p in root.iterdir() if p.is_dir()):
        by_method: dict[str, list[tuple[dict, dict]]] = {}
        for run in sorted(setting.glob("*-seed*")):
            summary, attacks = run / "summary.json", run / "audit" / "audit.json"
            if summary.is_file() and attacks.is_file():
                method = run.name.rsplit("-seed", 1)[0]
                by_method.setdefault(method, []).append((json.loads(summary.read_text()),
                                                         json.loads(attacks.read_text())))
        for method, runs in sorted(by_method.items()):
            summaries, audits = zip(*runs)
            bias, shadow = (_attack([pick(a) for a in audits]) for pick in ATTACKS.values())
            utility = [_cell([s[k] for s in summaries]) for k in ("global_accuracy", "personalized_accuracy")]
            lines.append(f"| {setting.name} | {method} | {len(runs)} | {utility[0]} | {utility[1]} | {bias} | "
                         f"{shadow} | {_cell([s.get('dp_epsilon') for s in summaries], pct=False)} |")
    return lines


def per_round_rows(root: Path) -> list[str]:
    """Each attack's accuracy per round (mean over the seeds), per setting and method."""
    lines = []
    for setting in sorted(p for p in root.iterdir() if p.is_dir()):
        for method in sorted({r.name.rsplit("-seed", 1)[0] for r in setting.glob("*-seed*")}):
            audits = [json.loads(f.read_text()) for f in sorted(setting.glob(f"{method}-seed*/audit/audit.json"))]
            for attack, pick in ATTACKS.items():
                found = [pick(a) for a in audits if pick(a) is not None]
                if not found:
                    continue
                rounds = sorted({r["round"] for a in found for r in a["rounds"]})
                cells = [_cell([next((r["accuracy"] for r in a["rounds"] if r["round"] == k), None) for a in found])
                         for k in rounds]
                lines.append(f"| {setting.name} | {method} | {attack} | {len(found)} | {' | '.join(cells)} |")
    return lines


def main(root: Path) -> None:
    table = ["| setting | method | seeds | global accuracy | personalized (zero-shot) | bias attack | "
             "shadow attack | epsilon |", "|---|---|---|---|---|---|---|---|", *rows(root)]
    head = [
        "# What the server infers from the updates", "",
        "Commands: `scripts/privacy.sh none`, `scripts/privacy.sh local SIGMA`, `scripts/privacy.sh central SIGMA` "
        "(each a `fedslip compare --audit` of fedavg_lora, fedslip and fedper on configs/seed_cpu.toml, then "
        "`fedslip audit --public-data` on every run), then `python scripts/privacy_table.py`. Attack accuracy "
        "= share of (client, round) guesses of the client's dominant class that were right; chance is 25%. "
        "`-` for the bias attack: the method sends no classifier (fedper). Epsilon at delta = 1e-5 after "
        "the last round (local DP: per client against the server).", ""]
    notes = root / "notes.md"
    by_round = ["", "Per round (the attack's accuracy over the 4 clients after each round; mean ± std over the seeds):",
                "", "| setting | method | attack | seeds | round 1 | round 2 | round 3 | round 4 | round 5 |",
                "|---|---|---|---|---|---|---|---|---|", *per_round_rows(root)]
    text = "\n".join(head + table + by_round) + "\n" + (f"\n{notes.read_text()}" if notes.is_file() else "")
    (root / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/privacy"))
