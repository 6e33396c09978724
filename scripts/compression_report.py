"""Compression sweep report: accuracy against MiB per round for each codec setting, from finished runs.

    python scripts/compression_report.py [docs/results/compression] [docs/results/seed_cpu]

Reads every finished run under the first folder (``<setting>/<method>-seed<s>/``, made by
scripts/compression.sh) and the fp32 runs of the second (the same protocol, fp32 both ways), and writes
``report.md`` (a table), ``results.json`` and ``accuracy_vs_bytes.png`` into the first. Each row is one
(setting, method): means over the seeds present; the deltas compare with fp32 on the same seeds, so a
one-seed setting is compared with fp32 seed 0 only. Bytes are the runs' measured payload bytes
(upload + download per round).
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
MIB = 1024 * 1024


def load(root: Path, only_fp32: bool = False) -> dict[tuple[str, str], dict[int, dict]]:
    """{(setting, method): {seed: summary}} of the finished runs below ``root``."""
    runs: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for path in sorted(root.rglob("summary.json")):
        cfg = tomllib.loads((path.parent / "config.toml").read_text())
        up, down = cfg.get("upload_codec", "fp32"), cfg.get("download_codec", "fp32")
        if only_fp32 and (up, down) != ("fp32", "fp32"):
            continue
        setting = up if up == down else f"{up} up / {down} down"
        runs[setting, cfg["method"]][cfg["seed"]] = json.loads(path.read_text())
    return runs


def mean(summaries: list[dict], key: str) -> float:
    return sum(s[key] for s in summaries) / len(summaries)


def main(root: Path, fp32_root: Path) -> None:
    runs = load(root)
    for (setting, method), by_seed in load(fp32_root, only_fp32=True).items():
        if method in {m for _, m in runs}:
            runs[setting, method] = by_seed
    rows = []
    for (setting, method), by_seed in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        seeds = sorted(by_seed)
        base = runs.get(("fp32", method), {})
        if not all(s in base for s in seeds):
            continue  # no fp32 run of these seeds to compare with
        mine, ref = [by_seed[s] for s in seeds], [base[s] for s in seeds]
        row = {"setting": setting, "method": method, "seeds": seeds,
               "mib_per_round": mean(mine, "comm_bytes_per_round") / MIB,
               "ratio": mean(ref, "comm_bytes_per_round") / mean(mine, "comm_bytes_per_round")}
        for key, _ in KEYS:
            row[key] = 100 * mean(mine, key)
            row[f"{key}_delta"] = 100 * (mean(mine, key) - mean(ref, key))
        rows.append(row)
    lines = ["| setting | method | seeds | MiB/round | fewer bytes | global | personalized (zero-shot) "
             "| after K-step |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[k]:.1f} ({r[k + '_delta']:+.1f})" for k, _ in KEYS]
        lines.append(f"| {r['setting']} | {r['method']} | {','.join(map(str, r['seeds']))} | "
                     f"{r['mib_per_round']:.3f} | {r['ratio']:.1f}x | " + " | ".join(cells) + " |")
    intro = ("Accuracy (%) on the test split of configs/seed_cpu.toml, mean over the seeds listed; in brackets "
             "the change against fp32 on the same seeds. MiB/round: measured payload bytes, upload + download, "
             "4 clients. Made by `python scripts/compression_report.py` from the runs in this folder and the "
             "fp32 runs of docs/results/seed_cpu.\n\n")
    (root / "report.md").write_text(intro + "\n".join(lines) + "\n")
    (root / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    fig, axes = plt.subplots(1, len(KEYS), figsize=(14, 4.2), sharey=True)
    markers = {"fedavg_lora": "o", "fedslip": "s"}
    for ax, (key, title) in zip(axes, KEYS):
        for r in rows:
            ax.scatter(r["mib_per_round"], r[key], marker=markers.get(r["method"], "^"),
                       color="C0" if r["method"] == "fedavg_lora" else "C1")
            ax.annotate(r["setting"], (r["mib_per_round"], r[key]), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
        ax.set_xscale("log")
        ticks = [0.125, 0.25, 0.5, 1, 2]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("MiB per round (upload + download, log)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    for method, marker in markers.items():
        axes[0].scatter([], [], marker=marker, color="C0" if method == "fedavg_lora" else "C1", label=method)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "accuracy_vs_bytes.png", dpi=120)


if __name__ == "__main__":
    args = [Path(a) for a in sys.argv[1:]]
    main(args[0] if args else Path("docs/results/compression"),
         args[1] if len(args) > 1 else Path("docs/results/seed_cpu"))
