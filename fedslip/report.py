"""Tables and plots from run directories: ``report.md``, ``results.json`` and PNGs.

    fedslip report docs/results/seed_cpu            # a compare directory (rebuilt from its runs)
    fedslip report runs/a runs/b --out reports/ab   # any run directories

Every number comes from the runs' own ``summary.json`` / ``metrics.jsonl``; nothing is typed in.
"""

from __future__ import annotations

import json
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import PRESET_KEYS, ConfigError, ExperimentConfig, load_config
from .storage import atomic_write_bytes, read_json, write_json


@dataclass
class RunRecord:
    path: Path
    cfg: ExperimentConfig
    summary: dict
    rounds: list[dict]

    @property
    def method(self) -> str:
        return self.cfg.method


def load_run(path: Path) -> RunRecord:
    path = Path(path)
    rounds = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return RunRecord(path, load_config(path / "config.toml"), read_json(path / "summary.json"), rounds)


def find_runs(paths: list[Path]) -> list[RunRecord]:
    """Finished runs in ``paths`` (each a run directory or a folder of them), sorted by method and seed."""
    found = []
    for p in map(Path, paths):
        candidates = [p] if (p / "summary.json").is_file() else sorted(d for d in p.iterdir() if d.is_dir())
        found += [load_run(d) for d in candidates if (d / "summary.json").is_file()]
    if not found:
        raise FileNotFoundError(f"no finished run (summary.json) under {', '.join(map(str, paths))}")
    return sorted(found, key=lambda r: (r.method, r.cfg.seed))


def check_same_settings(method: str, runs: list[RunRecord]) -> None:
    """Refuse to average runs of one method made with different settings into one row (a mean over
    them would describe no experiment); the error names the runs and the keys that differ."""
    first = runs[0].cfg.experiment_dict()
    for r in runs[1:]:
        differ = r.cfg.experiment_diff(first, ignore=("seed",))
        if differ:
            raise ConfigError(f"{method}: {runs[0].path} and {r.path} differ in {', '.join(differ)}; a report row "
                              "averages runs that differ in their seed only: report them separately")


def _stats(values: list[float | None]) -> dict:
    v = np.array([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def aggregate(runs: list[RunRecord]) -> dict:
    """Mean and std over the seeds of each method; the runs of one method must differ in their seed only."""
    by_method: dict[str, list[RunRecord]] = defaultdict(list)
    for r in runs:
        by_method[r.method].append(r)
    for method, rs in by_method.items():
        check_same_settings(method, rs)
    out = {}
    for method, rs in by_method.items():
        s = [r.summary for r in rs]
        out[method] = {
            "seeds": [r.cfg.seed for r in rs],
            **{key: _stats([x.get(key) for x in s]) for key in
               ("global_accuracy", "personalized_accuracy", "kstep_accuracy", "comm_mib_per_round",
                "global_track_local_accuracy", "personalized_global_test_accuracy", "private_bytes_transmitted",
                "wall_seconds", "worst_client_personalized_accuracy")},
            "seconds_per_round": _stats([float(np.mean([row["seconds"] for row in r.rounds])) for r in rs]),
            "devices": sorted({str(x.get("device")) for x in s}),
        }
    return out


def _pct(stat: dict) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}" if stat["n"] > 1 else f"{100 * stat['mean']:.1f}"


def _verdict(agg: dict) -> list[str]:
    """Plain statements comparing fedslip with fedavg_lora (only when both are present)."""
    if not {"fedslip", "fedavg_lora"} <= set(agg):
        return []
    f, b = agg["fedslip"], agg["fedavg_lora"]
    lines = []
    if f["personalized_accuracy"]["mean"] is not None and b["kstep_accuracy"]["mean"] is not None:
        diff = 100 * (f["personalized_accuracy"]["mean"] - b["kstep_accuracy"]["mean"])
        lines.append(f"- FedSLIP's zero-shot personalized accuracy is {diff:+.2f} points from fedavg_lora + K-step: "
                     f"the target (>= +0.5) is {'met' if diff >= 0.5 else 'not met'}.")
    gdiff = 100 * (f["global_accuracy"]["mean"] - b["global_accuracy"]["mean"])
    lines.append(f"- FedSLIP's global accuracy is {gdiff:+.2f} points from fedavg_lora's: the target (>= -0.5) is "
                 f"{'met' if gdiff >= -0.5 else 'not met'}.")
    if "centralized" in agg:
        cdiff = 100 * (f["global_accuracy"]["mean"] - agg["centralized"]["global_accuracy"]["mean"])
        met = "met" if cdiff >= -1.5 else "not met"
        lines.append(f"- FedSLIP's global accuracy is {cdiff:+.2f} points from the centralized reference (same "
                     f"rows and steps on one machine): the target (within 1.5) is {met}.")
    same = f["comm_mib_per_round"]["mean"] == b["comm_mib_per_round"]["mean"]
    lines.append(f"- Bytes per round {'equal' if same else 'differ from'} the baseline's "
                 f"({f['comm_mib_per_round']['mean']:.3f} vs {b['comm_mib_per_round']['mean']:.3f} MiB); private "
                 f"bytes transmitted: {f['private_bytes_transmitted']['mean']:.0f}.")
    return lines


# One colour per method in every plot of every report (scripts that plot methods can use it too), so a method
# is recognised at a glance across reports; fedavg_lora and fedslip keep the C0 / C1 that the scaling and
# compression plots (scripts/) give them.
METHOD_COLORS = {"fedavg_lora": "tab:blue", "fedslip": "tab:orange", "dual_naive": "tab:green",
                 "centralized": "tab:purple"}
OTHER_COLORS = ("tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:red")
FLOOR_COLOR = "lightgray"


def method_color(method: str) -> str:
    """The colour of ``method`` in every plot: ``METHOD_COLORS``, else one of ``OTHER_COLORS`` chosen by a
    stable hash of the name (the same in every process and report)."""
    return METHOD_COLORS.get(method) or OTHER_COLORS[zlib.crc32(method.encode()) % len(OTHER_COLORS)]


def _percent_cells(values: np.ndarray) -> str:
    """Accuracies as table cells in %, ``–`` where NaN (not evaluated)."""
    return " | ".join("–" if np.isnan(v) else f"{100 * v:.1f}" for v in values)


def per_client_stats(runs: list[RunRecord], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Mean and sample std over ``runs`` (the seeds of one method) of the per-client list ``summary[key]``
    (None entries, failed evaluations, are left out); std 0 where fewer than two seeds have a value.
    None when a run lacks ``key`` (e.g. no K-step)."""
    values = [r.summary.get(key) for r in runs]
    if not all(values):
        return None
    per = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    count = np.sum(~np.isnan(per), axis=0)
    mean = np.divide(np.nansum(per, axis=0), count, out=np.full(per.shape[1], np.nan), where=count > 0)
    std = np.zeros_like(mean)  # a client no seed evaluated (a sampled view) stays NaN, without numpy's warning
    several = count > 1
    std[several] = np.nanstd(per[:, several], axis=0, ddof=1)
    return mean, std


def _subplots(figsize: tuple[float, float], *grid: int, **kw):
    """A figure and its axes without pyplot: no backend switch and no global figure state, so a report
    is written on a machine without a display and a notebook keeps its inline plots."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **kw)


def accuracy_per_round_figure(runs: list[RunRecord]):
    from matplotlib.ticker import MaxNLocator

    methods = sorted({r.method for r in runs})
    fig, axes = _subplots((11, 4), 1, 2, sharey=True)
    for ax, key, title in ((axes[0], "global_accuracy", "Global accuracy (global track, global test set)"),
                           (axes[1], "personalized_accuracy", "Personalized accuracy (zero-shot, own test rows)")):
        for m in methods:
            curves = np.array([[row[key] for row in r.rounds] for r in runs if r.method == m], dtype=float)
            x = np.arange(1, curves.shape[1] + 1)
            mean = 100 * curves.mean(0)
            ax.plot(x, mean, marker="o", color=method_color(m), label=f"{m} (n={len(curves)})")
            if len(curves) > 1:
                std = 100 * curves.std(0, ddof=1)
                ax.fill_between(x, mean - std, mean + std, color=method_color(m), alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%), mean ± std over seeds")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def per_client_figure(runs: list[RunRecord]):
    """Per client: each method's zero-shot personalized accuracy and, next to it (hatched), its accuracy after
    K-step, mean over seeds with ± std error bars, and the client's majority-class floor. The y-axis starts a
    little below the lowest bar or error bar (not at 0), so that differences of a point or two in the 80-100
    range stay visible. Bar containers are labelled ``<method> zero-shot``, ``<method> + K-step`` and
    ``majority-class floor``."""
    methods = sorted({r.method for r in runs})
    num_clients = runs[0].cfg.num_clients
    bars = []  # (label, mean, std or None (one seed: no error bar), colour, hatch)
    for m in methods:
        mine = [r for r in runs if r.method == m]
        for key, label, hatch in (("personalized_accuracy_per_client", f"{m} zero-shot", None),
                                  ("kstep_accuracy_per_client", f"{m} + K-step", "//")):
            stats = per_client_stats(mine, key)
            if stats is not None:
                bars.append((label, 100 * stats[0], 100 * stats[1] if len(mine) > 1 else None, method_color(m),
                             hatch))
    floors = 100 * np.mean([r.summary["majority_floor_per_client"] for r in runs], axis=0)
    bars.append(("majority-class floor", floors, None, FLOOR_COLOR, None))

    fig, ax = _subplots((max(8, 1.0 + 0.35 * len(bars) * num_clients), 4.5))
    width = 0.85 / len(bars)
    clients = np.arange(num_clients)
    for i, (label, mean, std, color, hatch) in enumerate(bars):
        ax.bar(clients + (i - (len(bars) - 1) / 2) * width, mean, width, yerr=std,
               color=color, hatch=hatch, edgecolor="white" if hatch else None, linewidth=0, label=label,
               error_kw={"elinewidth": 1, "capsize": 2, "ecolor": "black"})
    low = min(np.nanmin(mean - (0 if std is None else std)) for _, mean, std, *_ in bars)
    high = max(np.nanmax(mean + (0 if std is None else std)) for _, mean, std, *_ in bars)
    ax.set_ylim(max(0.0, 5 * np.floor((low - 3) / 5)), max(100.0, high + 1))
    ax.set_xticks(clients, [f"client {c}" for c in clients])
    ax.set_ylabel("accuracy on own test rows (%), mean ± std over seeds")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(len(bars), 5))
    ax.set_title("Per-client personalized accuracy: zero-shot and after K-step, vs. the majority-class floor",
                 fontsize=10)
    fig.tight_layout()
    return fig


def bytes_per_round_figure(runs: list[RunRecord]):
    methods = sorted({r.method for r in runs})
    fig, ax = _subplots((6, 3.5))
    for m in methods:  # one labelled bar per method
        mib = np.mean([r.summary["comm_mib_per_round"] for r in runs if r.method == m])
        ax.bar_label(ax.bar(m, mib, color=method_color(m), label=m), fmt="%.3f MiB")
    ax.set_ylabel("MiB per round (upload + download, all clients)")
    ax.set_title("Communication per round", fontsize=10)
    fig.tight_layout()
    return fig


FIGURES = {"accuracy_per_round.png": accuracy_per_round_figure, "per_client_accuracy.png": per_client_figure,
           "bytes_per_round.png": bytes_per_round_figure}


def plot(runs: list[RunRecord], out: Path) -> list[str]:
    """Write ``FIGURES`` into ``out``; return their file names."""
    for name, make in FIGURES.items():
        make(runs).savefig(out / name, dpi=110)
    return list(FIGURES)


def per_method_settings(runs: list[RunRecord]) -> str:
    """The settings that differ between the federated methods beyond their presets (each method at its own,
    e.g. tuned, config: ``compare --method-config``), as a sentence; "" when they share one config."""
    configs = {}
    for r in runs:
        if r.method != "centralized":
            configs.setdefault(r.method, r.cfg)
    if len(configs) < 2:
        return ""
    first = next(iter(configs.values()))
    ignore = ("method", "seed", *PRESET_KEYS)
    keys = sorted({k for cfg in configs.values() for k in cfg.experiment_diff(first.experiment_dict(), ignore)})
    if not keys:
        return ""
    return " Per method (each its own config): " + "; ".join(
        f"{k} " + ", ".join(f"{m} {getattr(cfg, k)}" for m, cfg in configs.items()) for k in keys) + "."


def health_section(runs: list[RunRecord]) -> list[str]:
    """The health entries of every run (``fedslip.health``): a run that learned nothing must not hide in a
    table of means."""
    lines = ["## Health", ""]
    unchecked = [r.path.name for r in runs if "health" not in r.summary]
    entries = [(r, e) for r in runs for e in r.summary.get("health", [])]
    if entries:
        lines += ["| run | round | symptom | detail |", "|---|---|---|---|"]
        lines += [f"| `{r.path.name}` | {e['round']} | {e['symptom']} | {e['detail']} |" for r, e in entries]
        lines += ["", "Causes and fixes: docs/usage.md, Run health."]
    else:
        lines.append(f"No health warning in {len(runs) - len(unchecked)} checked run(s).")
    if unchecked:
        lines += ["", f"Not checked (written before health checks existed): {len(unchecked)} run(s)."]
    return lines + [""]


def _default_targets(backbone: str) -> str:
    return "query, value" if backbone in ("minilm", "tiny") else "the architecture's default targets"


def build_report(runs: list[RunRecord], out: Path, command: str = "") -> dict:
    """Write ``results.json``, ``report.md`` and the PNGs into ``out``; return the results."""
    out = Path(out)
    agg = aggregate(runs)  # refuses mixed settings before anything is written
    out.mkdir(parents=True, exist_ok=True)
    if not command and (out / "results.json").is_file():  # rebuilding: keep the command that made the runs
        command = read_json(out / "results.json").get("command", "")
    results = {"runs": [{"dir": str(r.path), "method": r.method, "seed": r.cfg.seed, "summary": r.summary}
                        for r in runs], "by_method": agg, "command": command}
    write_json(out / "results.json", results)
    pngs = plot(runs, out)
    first = next((r for r in runs if r.method != "centralized"), runs[0])  # the settings of the federated runs
    c, summaries = first.cfg, first.summary
    other_lrs = sorted({r.cfg.lr for r in runs if r.method == "centralized" and r.cfg.lr != c.lr})
    lines = [
        "# FedSLIP comparison report", "",
        f"Command: `{command}`" if command else "Rebuilt with `fedslip report` from the run directories.", "",
        f"Settings: backbone `{c.backbone}`, {c.num_clients} clients, partition `{c.partition}`"
        + (f" (dominant fraction {c.dominant_fraction})" if c.partition == "dominant" else "")
        + f", {c.rounds} rounds, {c.samples_per_client} train / {c.test_samples_per_client} test rows per client, "
        f"global test set {len(json.loads((runs[0].path / 'partition.json').read_text())['global_test'])} rows, "
        f"LoRA r={c.lora_rank} on {', '.join(c.lora_targets) or _default_targets(c.backbone)}, lr {c.lr}, "
        f"batch {c.batch_size}, "
        f"local epochs {c.local_epochs if not c.local_steps else f'{c.local_steps} steps'}, K-step {c.kstep} steps "
        f"at lr {c.kstep_lr or c.lr}, "
        f"precision {summaries.get('precision')}, device {summaries.get('device')}, accuracies on the "
        f"`{summaries.get('eval_split')}` split; seeds {sorted({r.cfg.seed for r in runs})}"
        + (f"; the centralized reference at its own tuned lr {', '.join(map(str, other_lrs))}" if other_lrs else "")
        + "." + per_method_settings(runs), "",
        "| method | global accuracy | personalized accuracy (zero-shot) | worst client | after K-step | "
        "personalized model on the global test set | MiB per round | s per round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    mixed = len({d for a in agg.values() for d in a["devices"]}) > 1  # then each row names its device
    for m, a in sorted(agg.items()):
        where = f" ({', '.join(a['devices'])})" if mixed else ""
        lines.append(f"| {m} | {_pct(a['global_accuracy'])} | {_pct(a['personalized_accuracy'])} | "
                     f"{_pct(a['worst_client_personalized_accuracy'])} | {_pct(a['kstep_accuracy'])} | "
                     f"{_pct(a['personalized_global_test_accuracy'])} | {a['comm_mib_per_round']['mean']:.3f} | "
                     f"{a['seconds_per_round']['mean']:.1f}{where} |")
    lines += ["", "Accuracies in %, mean ± sample std over seeds. Worst client = the lowest zero-shot personalized "
              "accuracy among the clients of a run. Personalized model on the global test set = each client's "
              "inference model (global + its private track) on the balanced global test set, averaged over "
              "clients: what personalization costs a client outside its own distribution (for single-track "
              "methods it is the global accuracy). MiB per round = upload + download of all clients, measured "
              "from the serialized payloads (`centralized` sends nothing). s per round = wall seconds of a round "
              "(training, aggregation and evaluation), mean over rounds and seeds, on the run's device (runs "
              "sharing a machine are slower than alone).", ""]
    verdict = _verdict(agg)
    if verdict:
        lines += ["## Verdict", "", *verdict, ""]
    lines += health_section(runs)
    lines += ["## Per client", "", "Personalized accuracy (zero-shot) per client, mean over seeds, next to the "
              "majority-class floor of that client's test rows (a constant predictor of its dominant class); "
              "`–`: a client no seed scored (with `eval_fraction` < 1 only a sample of clients also scores its "
              "model on the global test set).", "",
              "| method | " + " | ".join(f"client {i}" for i in range(c.num_clients)) + " |",
              "|---|" + "---|" * c.num_clients]
    for m in sorted(agg):
        mine = [r for r in runs if r.method == m]
        zero_shot, _ = per_client_stats(mine, "personalized_accuracy_per_client")
        lines.append(f"| {m} | {_percent_cells(zero_shot)} |")
        for key, label in (("kstep_accuracy_per_client", "+ K-step"),
                           ("personalized_global_test_accuracy_per_client", "on the global test set")):
            stats = per_client_stats(mine, key)
            if stats is not None and (key.startswith("kstep") or any(r.cfg.private_track for r in mine)):
                lines.append(f"| {m} {label} | {_percent_cells(stats[0])} |")
    floors = np.mean([r.summary["majority_floor_per_client"] for r in runs], axis=0)
    lines.append("| majority floor | " + " | ".join(f"{100 * v:.1f}" for v in floors) + " |")
    lines += ["", "## Per class (global test set, global track)", "",
              "| method | " + " | ".join(c.class_names) + " |", "|---|" + "---|" * len(c.class_names)]
    for m in sorted(agg):
        pc = np.array([r.summary["global_accuracy_per_class"] for r in runs if r.method == m], dtype=float).mean(0)
        lines.append(f"| {m} | " + " | ".join(f"{100 * v:.1f}" for v in pc) + " |")
    if (out / "notes.md").is_file():  # hand-written context (e.g. ablations) kept across rebuilds
        lines += ["", "## Notes", "", (out / "notes.md").read_text().strip()]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in pngs] + [""]
    lines += ["## Runs", "", "| run | method | seed | wall time (min) |", "|---|---|---|---|"]
    lines += [f"| `{r.path.name}` | {r.method} | {r.cfg.seed} | {r.summary['wall_seconds'] / 60:.1f} |" for r in runs]
    atomic_write_bytes(out / "report.md", ("\n".join(lines) + "\n").encode())
    return results
