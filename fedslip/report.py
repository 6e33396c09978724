"""Tables and plots from run directories: ``report.md``, ``results.json`` and PNGs.

    fedslip report docs/results/seed_cpu            # a compare directory (rebuilt from its runs)
    fedslip report runs/a runs/b --out reports/ab   # any run directories

Every number comes from the runs' own ``summary.json`` / ``metrics.jsonl``; nothing is typed in. A run
that lost clients (``client_failures``, or ``complete`` false) is marked in every table and plot and left
out of the verdict unless ``allow_incomplete``. Everything is built before the first file is written, so a
failure leaves no ``results.json`` or plot without its ``report.md``.
"""

from __future__ import annotations

import io
import json
import math
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import PRESET_KEYS, ConfigError, ExperimentConfig, load_config
from .paired import Paired, pair
from .storage import RunDirError, atomic_write_bytes, finished_run, read_json


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


def scan_runs(paths: list[Path]) -> tuple[list[RunRecord], list[str]]:
    """The finished runs in ``paths`` (each a run directory or a folder of them), sorted by method and seed,
    and the unfinished runs of those folders that are left out, each as "PATH: why". A run directory named in
    ``paths`` itself must be finished: an unfinished one is refused, with the command that finishes it."""
    found, skipped = [], []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"no such run directory: {p}")
        if not p.is_dir():
            raise RunDirError(f"{p} is a file; report reads run directories or folders of them")
        if (p / "config.toml").is_file():
            candidates = [finished_run(p)]
        else:
            candidates = sorted(d for d in p.iterdir() if (d / "config.toml").is_file())
            skipped += [f"{d}: run not finished (no summary.json; fedslip run --resume {d} finishes it)"
                        for d in candidates if not (d / "summary.json").is_file()]
        found += [load_run(d) for d in candidates if (d / "summary.json").is_file()]
    if not found:
        raise FileNotFoundError(f"no finished run (summary.json) under {', '.join(map(str, paths))}")
    return sorted(found, key=lambda r: (r.method, r.cfg.seed)), skipped


def find_runs(paths: list[Path]) -> list[RunRecord]:
    """``scan_runs``' finished runs; each unfinished run it leaves out is logged as a warning."""
    import logging

    runs, skipped = scan_runs(paths)
    for line in skipped:
        logging.getLogger("fedslip").warning("report: skipped %s", line)
    return runs


INCOMPLETE = "(incomplete)"  # the mark of a method with a run that lost clients, in every table and plot


def lost_clients(run: RunRecord) -> str | None:
    """Why ``run`` is incomplete: clients that failed in some round or K-step (``client_failures``) or final
    accuracies that miss a client (``complete`` false); its means then cover the clients that answered only.
    None for a complete run, and for runs written before these keys existed."""
    failures = run.summary.get("client_failures") or []
    why = [f"{len(failures)} client failure{'s' if len(failures) != 1 else ''}"] if failures else []
    if run.summary.get("complete") is False:
        why.append("final accuracies without every client")
    return ", ".join(why) or None


def labelled(method: str, runs: list[RunRecord]) -> str:
    """``method``, followed by ``INCOMPLETE`` when one of its runs lost clients."""
    return f"{method} {INCOMPLETE}" if any(lost_clients(r) for r in runs if r.method == method) else method


def check_same_settings(method: str, runs: list[RunRecord]) -> None:
    """Refuse to average runs of one method made with different settings into one row (a mean over
    them would describe no experiment); the error names the runs and the keys that differ."""
    first = runs[0].cfg.experiment_dict()
    for r in runs[1:]:
        differ = r.cfg.experiment_diff(first, ignore=("seed",))
        if differ:
            raise ConfigError(f"runs {runs[0].path} and {r.path} of method {method} differ in {', '.join(differ)}; "
                              "a report row averages runs that differ in their seed only: report them separately")


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
                "wall_seconds", "worst_client_personalized_accuracy", "train_sample_passes",
                "kstep_sample_passes", "training_passes_vs_fedavg_lora", "kstep_passes_vs_fedavg_lora",
                "equal_compute_kstep_accuracy", "equal_compute_passes_vs_fedavg_lora", "equal_compute_kstep")},
            "seconds_per_round": _stats([float(np.mean([row["seconds"] for row in r.rounds])) for r in rs]),
            "devices": sorted({str(x.get("device")) for x in s}),
            "incomplete_runs": [r.path.name for r in rs if lost_clients(r)],
        }
    return out


def _pct(stat: dict) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}" if stat["n"] > 1 else f"{100 * stat['mean']:.1f}"


def _compute(a: dict) -> str:
    """The compute cell of a method: its federated training passes relative to fedavg_lora's on the same config
    and, where it ran K-step, the same with the K-step passes added; ``–`` for runs that did not record them."""
    training, with_kstep = a["training_passes_vs_fedavg_lora"]["mean"], a["kstep_passes_vs_fedavg_lora"]["mean"]
    cell = "–" if training is None else f"{training:.2f}x"
    if with_kstep is not None and a["kstep_accuracy"]["mean"] is not None:
        cell += f"; + K-step: {with_kstep:.2f}x"
    return cell


def rarely_trained_lines(runs: list[RunRecord]) -> list[str]:
    """With client sampling (``fraction_fit`` < 1): how many rounds the clients trained, per method (min,
    median, max over clients and seeds), and how many never trained: their personalized accuracy is the
    global track's with an untrained private part, not what the method does for a participating client."""
    by_method: dict[str, list[int]] = defaultdict(list)
    for r in runs:
        if r.cfg.fraction_fit < 1 and r.summary.get("rounds_trained_per_client") is not None:
            by_method[r.method] += r.summary["rounds_trained_per_client"]
    if not by_method:
        return []
    lines = ["", "Rounds each client trained (client sampling, `fraction_fit` < 1; over clients and seeds):"]
    for m, counts in sorted(by_method.items()):
        never = sum(c == 0 for c in counts)
        lines.append(f"- {labelled(m, runs)}: min {min(counts)}, median {float(np.median(counts)):g}, max "
                     f"{max(counts)} of {max(r.cfg.rounds for r in runs if r.method == m)} rounds; "
                     f"{never} of {len(counts)} client runs never trained")
    return lines


BASELINE = "fedavg_lora"  # the verdict's baseline
EQUAL_COMPUTE = "+ equal-compute K-step"  # a method's row from its runs' fedslip.equal_compute_kstep records
VERDICT_METRICS = {"personalized_accuracy": "zero-shot personalized", "kstep_accuracy": "after K-step",
                   "global_accuracy": "global"}


@dataclass
class Comparison:
    """``method``'s ``metric`` against ``reference``'s ``reference_metric``, paired by seed, in points."""
    method: str
    metric: str
    reference: str
    reference_metric: str
    role: str  # why this reference: "baseline", "best other" or "baseline and best other"
    paired: Paired

    def to_dict(self) -> dict:
        return {"method": self.method, "metric": self.metric, "reference": self.reference,
                "reference_metric": self.reference_metric, "role": self.role, "unit": "points",
                **self.paired.to_dict()}


def _points_by_seed(runs: list[RunRecord], method: str, metric: str) -> dict[int, float | None]:
    return {r.cfg.seed: None if r.summary.get(metric) is None else 100 * r.summary[metric]
            for r in runs if r.method == method}


def _left_out_runs(runs: list[RunRecord], methods: tuple[str, ...], allow_incomplete: bool) -> dict[int, str]:
    """Seed -> why it is not paired: a run of ``methods`` that lost clients (unless ``allow_incomplete``)."""
    reasons: dict[int, list[str]] = defaultdict(list)
    for r in runs:
        if r.method in methods and not allow_incomplete and lost_clients(r):
            reasons[r.cfg.seed].append(f"`{r.path.name}` lost clients ({lost_clients(r)})")
    return {seed: "; ".join(why) for seed, why in reasons.items()}


def compare_pair(runs: list[RunRecord], method: str, metric: str, reference: str, reference_metric: str,
                 role: str = "", allow_incomplete: bool = False) -> Comparison:
    """One paired comparison (``fedslip.paired``) over the seeds both methods ran."""
    paired = pair(_points_by_seed(runs, method, metric), _points_by_seed(runs, reference, reference_metric),
                  method, reference, _left_out_runs(runs, (method, reference), allow_incomplete))
    return Comparison(method, metric, reference, reference_metric, role, paired)


def paired_comparisons(runs: list[RunRecord], allow_incomplete: bool = False) -> list[Comparison]:
    """For each accuracy of ``VERDICT_METRICS`` and each method: the method against the baseline and against
    the best other method (the highest mean of that accuracy over the runs the verdict counts)."""
    counted = [r for r in runs if allow_incomplete or not lost_clients(r)]
    found = []
    for metric in VERDICT_METRICS:
        means = {}
        for m in sorted({r.method for r in counted}):
            values = [v for v in _points_by_seed(counted, m, metric).values() if v is not None]
            if values:
                means[m] = float(np.mean(values))
        for m in means:
            references = {BASELINE: "baseline"} if BASELINE in means and m != BASELINE else {}
            best = max((o for o in means if o != m), key=means.get, default=None)
            if best is not None:
                references[best] = "baseline and best other" if best in references else "best other"
            found += [compare_pair(runs, m, metric, ref, metric, role, allow_incomplete)
                      for ref, role in references.items()]
    return found


def _interval_text(p: Paired) -> str:
    interval = p.interval
    if interval is None:
        return "undefined (1 seed)" if p.n == 1 else "–"
    return f"[{interval[0]:+.2f}, {interval[1]:+.2f}]"


def _paired_phrase(p: Paired) -> str:
    """``95% interval [a, b] over n seeds: reading`` (or why there is no interval)."""
    if p.n < 2:
        return f"{p.n} seed, no interval: {p.reading}" if p.n else p.reading
    return f"95% interval {_interval_text(p)} over {p.n} seeds: {p.reading}"


def _targets(runs: list[RunRecord], agg: dict, allow_incomplete: bool) -> list[dict]:
    """FedSLIP's targets against fedavg_lora (and the centralized reference), each a paired comparison."""
    if not {"fedslip", BASELINE} <= set(agg):
        return []
    targets = [("personalized_accuracy", BASELINE, "kstep_accuracy", 0.5,
                "zero-shot personalized accuracy", "fedavg_lora + K-step", "the target (>= +0.5)"),
               ("personalized_accuracy", BASELINE, "equal_compute_kstep_accuracy", 0.0,
                "zero-shot personalized accuracy", f"{BASELINE} {EQUAL_COMPUTE} (the training passes FedSLIP "
                "spent, spent on fine-tuning)", "the target (>= 0)"),
               ("global_accuracy", BASELINE, "global_accuracy", -0.5, "global accuracy", "fedavg_lora's",
                "the target (>= -0.5)"),
               ("global_accuracy", "centralized", "global_accuracy", -1.5, "global accuracy", "the centralized "
                "reference (same rows and steps on one machine)", "the target (within 1.5)")]
    found = []
    for metric, reference, reference_metric, bound, what, against, target in targets:
        if reference not in agg or agg[reference][reference_metric]["mean"] is None:
            continue
        c = compare_pair(runs, "fedslip", metric, reference, reference_metric, "target", allow_incomplete)
        met = c.paired.n and c.paired.mean >= bound
        text = (f"FedSLIP's {what} is {c.paired.mean:+.2f} points from {against} ({_paired_phrase(c.paired)}): "
                f"{target} is {'met' if met else 'not met'}." if c.paired.n else
                f"FedSLIP's {what} against {against}: not compared (no seed with both runs).")
        found.append({**c.to_dict(), "target": bound, "met": bool(met), "text": text})
    return found


def verdict(runs: list[RunRecord], agg: dict, allow_incomplete: bool = False) -> tuple[list[str], dict]:
    """The verdict section's lines and its record for ``results.json``: every paired comparison, FedSLIP's
    targets, and the runs left out. A run that lost clients is left out unless ``allow_incomplete``."""
    if len(agg) < 2:
        return [], {}
    comparisons = paired_comparisons(runs, allow_incomplete)
    targets = _targets(runs, agg, allow_incomplete)
    lines = [f"- {t['text']}" for t in targets]
    if {"fedslip", BASELINE} <= set(agg):
        f, b = agg["fedslip"], agg[BASELINE]
        same = f["comm_mib_per_round"]["mean"] == b["comm_mib_per_round"]["mean"]
        lines.append(f"- Bytes per round {'equal' if same else 'differ from'} the baseline's "
                     f"({f['comm_mib_per_round']['mean']:.3f} vs {b['comm_mib_per_round']['mean']:.3f} MiB); "
                     f"private bytes transmitted: {f['private_bytes_transmitted']['mean']:.0f}.")
    lines += ["", "Each method against the baseline (fedavg_lora) and against the best other method on each "
              "accuracy, paired by seed (the runs of a seed share the partition and the initialization): the "
              "difference per seed in points, their mean and its 95% interval (t over seeds). Ahead / behind: "
              "the whole interval above / below 0; else no measurable difference (also with one seed, where "
              "the interval is undefined).", "",
              "| method | against | accuracy | difference per seed (points) | mean | 95% interval | reading |",
              "|---|---|---|---|---|---|---|"]
    for c in comparisons:
        p = c.paired
        per_seed = ", ".join(f"{s}: {d:+.2f}" for s, d in zip(p.seeds, p.differences)) or "–"
        mean = "–" if p.mean is None else f"{p.mean:+.2f}"
        lines.append(f"| {labelled(c.method, runs)} | {labelled(c.reference, runs)}, {c.role} | "
                     f"{VERDICT_METRICS[c.metric]} | {per_seed} | {mean} | {_interval_text(p)} | {p.reading} |")
    left_out = sorted({why for c in comparisons for why in c.paired.left_out})
    if left_out:
        lines += ["", "Not paired: " + "; ".join(left_out) + "."]
    included = sorted(r.path.name for r in runs if lost_clients(r)) if allow_incomplete else []
    if included:
        lines += ["", f"Included at `--allow-incomplete` although they lost clients (their means cover the "
                  f"clients that answered only): {', '.join(f'`{n}`' for n in included)}."]
    record = {"allow_incomplete": allow_incomplete, "paired": [c.to_dict() for c in comparisons],
              "targets": targets, "left_out": left_out}
    return lines, record


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


def majority_floors(runs: list[RunRecord]) -> np.ndarray:
    """Each client's majority-class floor, mean over ``runs``; NaN for a client no run evaluated (a client
    whose evaluation failed has no class counts, so no floor)."""
    floors = np.array([[np.nan if f is None else f for f in r.summary["majority_floor_per_client"]] for r in runs],
                      dtype=float)
    count = np.sum(~np.isnan(floors), axis=0)
    return np.divide(np.nansum(floors, axis=0), count, out=np.full(floors.shape[1], np.nan), where=count > 0)


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
            label = f"{m} (n={len(curves)})" + (f" {INCOMPLETE}" if labelled(m, runs) != m else "")
            ax.plot(x, mean, marker="o", color=method_color(m), label=label)
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


def client_names(runs: list[RunRecord]) -> list[str]:
    """Each client's name: its group where the partition names clients (``partition = "natural"``:
    ``client_names`` in summary.json), else ``client <id>``."""
    names = runs[0].summary.get("client_names")
    if names and len(names) == runs[0].cfg.num_clients and runs[0].cfg.partition == "natural":
        return [str(n) for n in names]
    return [f"client {c}" for c in range(runs[0].cfg.num_clients)]


# The per-client rows of a method: summary key, name in results.json, label in tables and plots, CDF line style
ROW_KINDS = (("personalized_accuracy_per_client", "zero_shot", "zero-shot", "-"),
             ("kstep_accuracy_per_client", "kstep", "+ K-step", "--"))
MANY_CLIENTS = 12  # above this many clients a report shows distributions over clients, not a column per client


def client_count(runs: list[RunRecord]) -> int:
    return max(r.cfg.num_clients for r in runs)


def many_clients(runs: list[RunRecord]) -> bool:
    return client_count(runs) > MANY_CLIENTS


def client_distribution(accuracies: np.ndarray, floors: np.ndarray, names: list[str]) -> dict:
    """The distribution over clients of one accuracy per client (NaN, a client no seed scored, is left out):
    ``clients`` counted, ``mean``, ``median``, ``worst_client`` (and its name), ``worst_10_percent`` (the mean
    of the lowest tenth, ceil(n / 10) clients) and ``below_floor``: how many clients score below their own
    majority-class floor, of ``below_floor_of`` (those with both values), and that as ``share_below_floor``."""
    scored = ~np.isnan(accuracies)
    values = accuracies[scored]
    compared = scored & ~np.isnan(floors)
    below = int(np.sum(accuracies[compared] < floors[compared]))
    found = {"clients": int(values.size), "below_floor": below, "below_floor_of": int(compared.sum()),
             "share_below_floor": below / int(compared.sum()) if compared.any() else None}
    if not values.size:
        return {**found, "mean": None, "median": None, "worst_client": None, "worst_client_name": None,
                "worst_10_percent": None}
    return {**found, "mean": float(values.mean()), "median": float(np.median(values)),
            "worst_client": float(values.min()), "worst_client_name": names[int(np.nanargmin(accuracies))],
            "worst_10_percent": float(np.sort(values)[:math.ceil(values.size / 10)].mean())}


def per_client_distributions(runs: list[RunRecord]) -> dict:
    """``client_distribution`` of each method's per-client accuracies (``ROW_KINDS``: zero-shot, and after
    K-step where its runs ran it), each client's accuracy the mean over the method's seeds first, against the
    clients' majority-class floors; and of the floors themselves (``majority_floor``)."""
    floors, names = majority_floors(runs), client_names(runs)
    found: dict = {}
    for m in sorted({r.method for r in runs}):
        mine = [r for r in runs if r.method == m]
        for key, kind, _, _ in ROW_KINDS:
            stats = per_client_stats(mine, key)
            if stats is not None:
                found.setdefault(m, {})[kind] = client_distribution(stats[0], floors, names)
    found["majority_floor"] = client_distribution(floors, np.full_like(floors, np.nan), names)
    return found


def _distribution_row(label: str, d: dict) -> str:
    def pct(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:.1f}"

    worst = "–" if d["worst_client"] is None else f"{pct(d['worst_client'])} ({d['worst_client_name']})"
    below = "–" if d["share_below_floor"] is None else \
        f"{100 * d['share_below_floor']:.0f}% ({d['below_floor']} of {d['below_floor_of']})"
    return (f"| {label} | {d['clients']} | {pct(d['mean'])} | {pct(d['median'])} | {worst} | "
            f"{pct(d['worst_10_percent'])} | {below} |")


def per_client_section(runs: list[RunRecord], distributions: dict) -> list[str]:
    """The report's "Per client" section: a column per client up to ``MANY_CLIENTS`` clients, else the
    distributions over clients (``per_client_distributions``)."""
    lines = ["## Per client", ""]
    if many_clients(runs):
        lines += [f"Personalized accuracy over the {client_count(runs)} clients: each client's "
                  "accuracy on its own test rows, mean over seeds first, then over the clients: mean, median, the "
                  "worst client (named), the worst 10% (the mean of the lowest tenth of the clients) and the "
                  "clients below their majority-class floor (a constant predictor of the dominant class of their "
                  "test rows). Clients = the clients some seed scored (a client whose evaluation failed in every seed "
                  "is not counted). The CDF plot shows the whole distribution.", "",
                  "| method | clients | mean | median | worst client | worst 10% | below their floor |",
                  "|---|---|---|---|---|---|---|"]
        for m, kinds in distributions.items():
            if m != "majority_floor":
                lines += [_distribution_row(labelled(m, runs) + ("" if kind == "zero_shot" else f" {label}"),
                                            kinds[kind]) for _, kind, label, _ in ROW_KINDS if kind in kinds]
        return lines + [_distribution_row("majority floor", distributions["majority_floor"])]
    lines += ["Personalized accuracy (zero-shot) per client, mean over seeds, next to the majority-class floor of "
              "that client's test rows (a constant predictor of its dominant class); `–`: a client no seed scored "
              "(with `eval_fraction` < 1 only a sample of clients also scores its model on the global test set).",
              "", "| method | " + " | ".join(client_names(runs)) + " |",
              "|---|" + "---|" * len(client_names(runs))]
    for m in sorted({r.method for r in runs}):
        mine = [r for r in runs if r.method == m]
        zero_shot, _ = per_client_stats(mine, "personalized_accuracy_per_client")
        lines.append(f"| {labelled(m, runs)} | {_percent_cells(zero_shot)} |")
        for key, label in (("kstep_accuracy_per_client", "+ K-step"),
                           ("personalized_global_test_accuracy_per_client", "on the global test set")):
            stats = per_client_stats(mine, key)
            if stats is not None and (key.startswith("kstep") or any(r.cfg.private_track for r in mine)):
                lines.append(f"| {labelled(m, runs)} {label} | {_percent_cells(stats[0])} |")
    return lines + [f"| majority floor | {_percent_cells(majority_floors(runs))} |"]


def per_client_figure(runs: list[RunRecord]):
    """Per client: each method's zero-shot personalized accuracy and, next to it (hatched), its accuracy after
    K-step, mean over seeds with ± std error bars, and the client's majority-class floor. The y-axis starts a
    little below the lowest bar or error bar (not at 0), so that differences of a point or two in the 80-100
    range stay visible. Bar containers are labelled ``<method> zero-shot``, ``<method> + K-step`` and
    ``majority-class floor`` (with ``INCOMPLETE`` after the method's labels where a run lost clients)."""
    methods = sorted({r.method for r in runs})
    num_clients = runs[0].cfg.num_clients
    bars = []  # (label, mean, std or None (one seed: no error bar), colour, hatch)
    for m in methods:
        mine = [r for r in runs if r.method == m]
        mark = f" {INCOMPLETE}" if labelled(m, runs) != m else ""
        for (key, _, label, _), hatch in zip(ROW_KINDS, (None, "//")):
            stats = per_client_stats(mine, key)
            if stats is not None:
                bars.append((f"{m} {label}{mark}", 100 * stats[0], 100 * stats[1] if len(mine) > 1 else None,
                             method_color(m), hatch))
    floors = 100 * majority_floors(runs)
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
    ax.set_xticks(clients, client_names(runs), rotation=45 if num_clients > 8 else 0)
    ax.set_ylabel("accuracy on own test rows (%), mean ± std over seeds")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(len(bars), 5))
    ax.set_title("Per-client personalized accuracy: zero-shot and after K-step, vs. the majority-class floor",
                 fontsize=10)
    fig.tight_layout()
    return fig


def _cdf_line(ax, values: np.ndarray, label: str, color: str, linestyle: str) -> None:
    """The empirical CDF of ``values`` (NaN left out) as a step line: at x, the fraction of values <= x."""
    x = np.sort(values[~np.isnan(values)])
    if x.size:
        ax.step(np.r_[x[0], x], np.r_[0.0, np.arange(1, x.size + 1) / x.size], where="post", label=label,
                color=color, linestyle=linestyle)


def per_client_cdf_figure(runs: list[RunRecord]):
    """The distribution over clients of the personalized accuracy (mean over seeds per client), as an empirical
    CDF: accuracy on x, the fraction of clients at or below it on y. One colour per method, zero-shot solid and
    after K-step dashed (lines labelled like ``per_client_figure``'s bars), the clients' majority-class floors
    in light gray: a method's line left of the gray one has clients below their floor."""
    fig, ax = _subplots((7.5, 4.5))
    for m in sorted({r.method for r in runs}):
        mine = [r for r in runs if r.method == m]
        mark = f" {INCOMPLETE}" if labelled(m, runs) != m else ""
        for key, _, label, linestyle in ROW_KINDS:
            stats = per_client_stats(mine, key)
            if stats is not None:
                _cdf_line(ax, 100 * stats[0], f"{m} {label}{mark}", method_color(m), linestyle)
    _cdf_line(ax, 100 * majority_floors(runs), "majority-class floor", FLOOR_COLOR, "-")
    ax.set_xlabel("accuracy on own test rows (%), mean over seeds per client")
    ax.set_ylabel("fraction of clients at or below")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"Per-client personalized accuracy over {client_count(runs)} clients: "
                 "zero-shot (solid) and after K-step (dashed)", fontsize=10)
    fig.tight_layout()
    return fig


def bytes_per_round_figure(runs: list[RunRecord]):
    methods = sorted({r.method for r in runs})
    fig, ax = _subplots((6, 3.5))
    for m in methods:  # one labelled bar per method
        mib = np.mean([r.summary["comm_mib_per_round"] for r in runs if r.method == m])
        ax.bar_label(ax.bar(labelled(m, runs), mib, color=method_color(m), label=labelled(m, runs)),
                     fmt="%.3f MiB")
    ax.set_ylabel("MiB per round (upload + download, all clients)")
    ax.set_title("Communication per round", fontsize=10)
    fig.tight_layout()
    return fig


FIGURES = {"accuracy_per_round.png": accuracy_per_round_figure, "per_client_accuracy.png": per_client_figure,
           "per_client_cdf.png": per_client_cdf_figure, "bytes_per_round.png": bytes_per_round_figure}


def figures_for(runs: list[RunRecord]) -> dict:
    """The ``FIGURES`` a report on ``runs`` holds: the per-client bars up to ``MANY_CLIENTS`` clients, the CDF
    above (where bars are too narrow to read)."""
    left_out = "per_client_accuracy.png" if many_clients(runs) else "per_client_cdf.png"
    return {name: make for name, make in FIGURES.items() if name != left_out}


def render_figures(runs: list[RunRecord]) -> dict[str, bytes]:
    """``figures_for(runs)`` as PNG bytes, by file name (written by ``build_report`` once everything is built)."""
    pngs = {}
    for name, make in figures_for(runs).items():
        buffer = io.BytesIO()
        make(runs).savefig(buffer, format="png", dpi=110)
        pngs[name] = buffer.getvalue()
    return pngs


def federated_configs(runs: list[RunRecord]) -> dict[str, ExperimentConfig]:
    """The config of each federated method (the first run of each; a method's runs differ in their seed only)."""
    configs: dict[str, ExperimentConfig] = {}
    for r in runs:
        if r.method != "centralized":
            configs.setdefault(r.method, r.cfg)
    return configs or {runs[0].method: runs[0].cfg}


def _kstep_lr(cfg: ExperimentConfig) -> float:
    return cfg.kstep_lr or cfg.lr  # kstep_lr 0 = lr


def settings_by_method(runs: list[RunRecord]) -> dict[str, dict[str, object]]:
    """The settings that differ between the federated methods beyond their presets (each method at its own,
    e.g. tuned, config: ``compare --method-config``): key -> {method: value}. ``kstep_lr`` is the learning
    rate K-step used (``lr`` where ``kstep_lr`` is 0), listed only when some method ran K-step."""
    configs = federated_configs(runs)
    first = next(iter(configs.values()))
    ignore = ("method", "seed", "kstep_lr", *PRESET_KEYS)
    keys = sorted({k for cfg in configs.values() for k in cfg.experiment_diff(first.experiment_dict(), ignore)})
    differing = {k: {m: getattr(cfg, k) for m, cfg in configs.items()} for k in keys}
    kstep_lrs = {m: _kstep_lr(cfg) for m, cfg in configs.items()}
    if len(set(kstep_lrs.values())) > 1 and any(cfg.kstep for cfg in configs.values()):
        differing["kstep_lr"] = kstep_lrs
    return dict(sorted(differing.items()))


def per_method_settings(runs: list[RunRecord]) -> str:
    """``settings_by_method`` as a sentence; "" when the federated methods share one config."""
    differing = settings_by_method(runs)
    if not differing:
        return ""
    return " Per method (each its own config): " + "; ".join(
        f"{k} " + ", ".join(f"{m} {v}" for m, v in values.items()) for k, values in differing.items()) + "."


def settings_line(runs: list[RunRecord]) -> str:
    """The report's "Settings" line: the values every federated method shares; a setting that differs between
    them says "per method" and is listed, per method, at the end (``per_method_settings``)."""
    c = next(iter(federated_configs(runs).values()))
    summary = next(r.summary for r in runs if r.cfg is c)
    differing = settings_by_method(runs)

    def shared(keys: tuple[str, ...], name: str, text: str) -> str:
        return f"{name} per method" if any(k in differing for k in keys) else text

    federated_lrs = {cfg.lr for cfg in federated_configs(runs).values()}
    other_lrs = sorted({r.cfg.lr for r in runs if r.method == "centralized" and r.cfg.lr not in federated_lrs})
    global_test = len(json.loads((runs[0].path / "partition.json").read_text())["global_test"])
    partition = f"partition `{c.partition}`" + (f" (dominant fraction {c.dominant_fraction})"
                                                if c.partition == "dominant" else "")
    epochs = f"local epochs {c.local_epochs if not c.local_steps else f'{c.local_steps} steps'}"
    parts = [
        shared(("backbone",), "backbone", f"backbone `{c.backbone}`"),
        shared(("num_clients",), "clients", f"{c.num_clients} clients"),
        shared(("partition", "dominant_fraction"), "partition", partition),
        shared(("rounds",), "rounds", f"{c.rounds} rounds"),
        shared(("samples_per_client", "test_samples_per_client"), "rows per client",
               f"{c.samples_per_client} train / {c.test_samples_per_client} test rows per client"),
        f"global test set {global_test} rows",
        shared(("lora_rank", "lora_targets"), "LoRA",
               f"LoRA r={c.lora_rank} on {', '.join(c.lora_targets) or _default_targets(c.backbone)}"),
        shared(("lr",), "lr", f"lr {c.lr}"),
        shared(("batch_size",), "batch", f"batch {c.batch_size}"),
        shared(("local_epochs", "local_steps"), "local epochs", epochs),
        shared(("kstep", "kstep_lr"), "K-step", f"K-step {c.kstep} steps at lr {_kstep_lr(c)}" if c.kstep
               else "no K-step"),
        f"precision {summary.get('precision')}, device {summary.get('device')}, accuracies on the "
        f"`{summary.get('eval_split')}` split; seeds {sorted({r.cfg.seed for r in runs})}",
    ]
    centralized = f"; the centralized reference at its own tuned lr {', '.join(map(str, other_lrs))}" \
        if other_lrs else ""
    return "Settings: " + ", ".join(parts) + centralized + "." + per_method_settings(runs)


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


def runs_table(runs: list[RunRecord]) -> list[str]:
    """One line per run, with whether it kept every client."""
    def complete(r: RunRecord) -> str:
        if lost_clients(r):
            return f"no: {lost_clients(r)}"
        return "–" if "complete" not in r.summary else "yes"

    lines = ["## Runs", "", "| run | method | seed | every client answered | wall time (min) |",
             "|---|---|---|---|---|"]
    return lines + [f"| `{r.path.name}` | {r.method} | {r.cfg.seed} | {complete(r)} | "
                    f"{r.summary['wall_seconds'] / 60:.1f} |" for r in runs]


def build_report(runs: list[RunRecord], out: Path, command: str = "", allow_incomplete: bool = False,
                 skipped: list[str] | None = None) -> dict:
    """Write ``results.json``, ``report.md`` and the PNGs into ``out``; return the results. A run that lost
    clients is marked everywhere and left out of the verdict's comparisons unless ``allow_incomplete``;
    ``skipped``: the runs left out (``scan_runs``), listed in report.md.
    Every file is built before the first is written: a failure leaves ``out`` as it was."""
    out = Path(out)
    agg = aggregate(runs)  # refuses mixed settings before anything is written
    if not command and (out / "results.json").is_file():  # rebuilding: keep the command that made the runs
        command = read_json(out / "results.json").get("command", "")
    verdict_lines, verdict_record = verdict(runs, agg, allow_incomplete)
    results = {"runs": [{"dir": str(r.path), "method": r.method, "seed": r.cfg.seed, "summary": r.summary}
                        for r in runs], "by_method": agg, "per_client_distribution": per_client_distributions(runs),
               "verdict": verdict_record, "command": command}
    pngs = render_figures(runs)
    c = next(iter(federated_configs(runs).values()))
    incomplete = [r.path.name for r in runs if lost_clients(r)]
    lines = [
        "# FedSLIP comparison report", "",
        f"Command: `{command}`" if command else "Rebuilt with `fedslip report` from the run directories.", "",
        settings_line(runs), "",
        "| method | global accuracy | personalized accuracy (zero-shot) | worst client | after K-step | "
        "personalized model on the global test set | MiB per round | s per round | training passes vs "
        "fedavg_lora |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    mixed = len({d for a in agg.values() for d in a["devices"]}) > 1  # then each row names its device
    for m, a in sorted(agg.items()):
        where = f" ({', '.join(a['devices'])})" if mixed else ""
        lines.append(f"| {labelled(m, runs)} | {_pct(a['global_accuracy'])} | {_pct(a['personalized_accuracy'])} | "
                     f"{_pct(a['worst_client_personalized_accuracy'])} | {_pct(a['kstep_accuracy'])} | "
                     f"{_pct(a['personalized_global_test_accuracy'])} | {a['comm_mib_per_round']['mean']:.3f} | "
                     f"{a['seconds_per_round']['mean']:.1f}{where} | {_compute(a)} |")
        if a["equal_compute_kstep_accuracy"]["n"]:  # the same federation, K-step matched to another run's passes
            steps = a["equal_compute_kstep"]["mean"]
            lines.append(f"| {labelled(m, runs)} {EQUAL_COMPUTE} ({steps:.0f} steps) | – | – | – | "
                         f"{_pct(a['equal_compute_kstep_accuracy'])} | – | – | – | "
                         f"{a['equal_compute_passes_vs_fedavg_lora']['mean']:.2f}x |")
    lines += ["", "Accuracies in %, mean ± sample std over seeds. Worst client = the lowest zero-shot personalized "
              "accuracy among the clients of a run. Personalized model on the global test set = each client's "
              "inference model (global + its private track) on the balanced global test set, averaged over "
              "clients: what personalization costs a client outside its own distribution (for single-track "
              "methods it is the global accuracy). MiB per round = upload + download of all clients, measured "
              "from the serialized payloads (`centralized` sends nothing). s per round = wall seconds of a round "
              "(training, aggregation and evaluation), mean over rounds and seeds, on the run's device (runs "
              "sharing a machine are slower than alone). Training passes vs fedavg_lora = the forward/backward "
              "sample passes of the federated training, all clients, relative to fedavg_lora's on the same "
              "config; + K-step: the K-step fine-tune's passes added (`–`: runs that did not record them). A row '+ "
              "equal-compute K-step': the method's runs fine-tuned for as many K-step steps as bring them to the "
              "training passes of the run named in their `equal_compute_matched_to` (`fedslip kstep --run RUN "
              "--match-compute OTHER`), at their own K-step learning rate."]
    lines += rarely_trained_lines(runs)
    if incomplete:
        names = ", ".join(f"`{n}`" for n in incomplete)
        lines += ["", f"{INCOMPLETE}: the method has a run that lost clients ({names}: a failed training, a rejected "
                  "update, a failed evaluation or K-step; see the Runs table and "
                  "`client_failures` in its summary.json); its means cover the clients that answered only"
                  + (", and the verdict counts it (`--allow-incomplete`)." if allow_incomplete else
                     ", and the verdict leaves it out (`--allow-incomplete` counts it).")]
    if skipped:
        lines += ["", "Left out of this report: " + "; ".join(skipped) + "."]
    lines.append("")
    if verdict_lines:
        lines += ["## Verdict", "", *verdict_lines, ""]
    lines += health_section(runs)
    lines += per_client_section(runs, results["per_client_distribution"])
    lines += ["", "## Per class (global test set, global track)", "",
              "| method | " + " | ".join(c.class_names) + " |", "|---|" + "---|" * len(c.class_names)]
    for m in sorted(agg):
        pc = np.array([r.summary["global_accuracy_per_class"] for r in runs if r.method == m], dtype=float).mean(0)
        lines.append(f"| {labelled(m, runs)} | {_percent_cells(pc)} |")
    if (out / "notes.md").is_file():  # hand-written context (e.g. ablations) kept across rebuilds
        lines += ["", "## Notes", "", (out / "notes.md").read_text().strip()]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in pngs] + [""]
    lines += runs_table(runs)
    files = {**pngs, "results.json": (json.dumps(results, indent=2) + "\n").encode(),
             "report.md": ("\n".join(lines) + "\n").encode()}
    out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():  # report.md last: it always describes the files beside it
        atomic_write_bytes(out / name, content)  # last: a report.md always describes the files beside it
    return results
