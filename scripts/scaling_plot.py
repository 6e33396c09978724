"""Data-scaling curve: accuracy against training rows per client, from finished runs.

    python scripts/scaling_plot.py docs/results/scaling docs/results/seed_cpu/fedavg_lora-seed0 \
        docs/results/seed_cpu/fedslip-seed0      # every summary.json below the paths given

Writes ``scaling.png`` and ``scaling.md`` (a table) into the first folder. Runs are grouped by method and
``samples_per_client``; values are means over the seeds present.
"""
import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import tomllib  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

KEYS = (("global_accuracy", "global"), ("personalized_accuracy", "personalized (zero-shot)"),
        ("kstep_accuracy", "after K-step"))


def main(roots: list[Path]) -> None:
    root = roots[0]
    table: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for path in sorted(p for r in roots for p in r.rglob("summary.json")):
        cfg = tomllib.loads((path.parent / "config.toml").read_text())
        table[cfg["method"], cfg["samples_per_client"]].append(json.loads(path.read_text()))
    methods = sorted({m for m, _ in table})
    sizes = sorted({n for _, n in table})

    def mean(m: str, n: int, key: str) -> float | None:
        values = [s[key] for s in table.get((m, n), []) if s.get(key) is not None]
        return 100 * sum(values) / len(values) if values else None

    lines = ["| method | rows per client | runs | global | personalized (zero-shot) | after K-step |",
             "|---|---|---|---|---|---|"]
    for m in methods:
        for n in sizes:
            if (m, n) in table:
                cells = [f"{v:.1f}" if (v := mean(m, n, k)) is not None else "-" for k, _ in KEYS]
                lines.append(f"| {m} | {n} | {len(table[m, n])} | " + " | ".join(cells) + " |")
    (root / "scaling.md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, len(KEYS), figsize=(13, 3.8), sharey=True)
    for ax, (key, title) in zip(axes, KEYS):
        for m in methods:
            xs = [n for n in sizes if mean(m, n, key) is not None]
            ax.plot(xs, [mean(m, n, key) for n in xs], marker="o", label=m)
        if key == "personalized_accuracy" and "fedavg_lora" in methods:  # the bar zero-shot must clear
            xs = [n for n in sizes if mean("fedavg_lora", n, "kstep_accuracy") is not None]
            ax.plot(xs, [mean("fedavg_lora", n, "kstep_accuracy") for n in xs], linestyle="--", color="grey",
                    label="fedavg_lora + K-step")
            ax.legend(fontsize=8)
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training rows per client")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "scaling.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]] or [Path("docs/results/scaling")])
