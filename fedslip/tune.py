"""``fedslip tune``: a hyperparameter search on validation rows with Optuna; every trial an ordinary run.

    fedslip tune --config configs/seed_cpu.toml --method fedslip --trials 12 --out docs/results/tuning/fedslip
    fedslip.tune("docs/results/tuning/fedslip", trials=12, toml_path="configs/seed_cpu.toml", method="fedslip")

- Rows: trials evaluate on validation rows carved from the clients' train data (``eval_split = "val"``;
  ``val_samples_per_client`` defaults to ``test_samples_per_client``); a config that asks for the test
  split is refused: choosing settings on test rows would make every reported number optimistic. On own
  data (``partition = "own"``) each client carves its validation rows from its own file; the global
  validation set is the server's own ``val.csv[.gz]`` in ``data_dir``, and without one the ``global``
  objective is refused (the server never holds the clients' rows) while the others need none.
- Search: Optuna's TPE sampler, seeded with the config's ``seed``; the first trial is the config's own
  values where they lie in the space (the study never ends worse than the settings it started from).
  Median pruning on the per-round validation objective stops bad trials early (after
  ``pruner_startup_trials`` finished trials and ``pruner_warmup_rounds`` rounds). An objective with
  ``kstep`` in it is not pruned: K-step accuracy exists only after the last round, and the per-round
  zero-shot accuracy says little about it (FedBABU's head is its initialization until K-step trains it).
- Objective (``maximize``): ``personalized`` (zero-shot personalized accuracy), ``global``, ``kstep``
  (personalized after K-step), ``worst_client``, or a mix ``{personalized = 0.5, global = 0.5}``
  (``--maximize personalized=0.5,global=0.5``).
- Space: per-method defaults (``DEFAULT_SPACES``: log-uniform learning rates), the knobs named by
  ``search`` (ranges from ``KNOWN_RANGES``), and ranges in the config's ``[tune.space]`` table, e.g.
  ``lr = [1e-4, 3e-2]`` (log-uniform), ``lora_rank = {choices = [4, 8, 16]}``,
  ``fedprox_mu = {low = 0.0, high = 0.1, log = false}``.
- Files in OUT: ``study.db`` (Optuna's SQLite storage), ``study.json`` (the study's settings: a second call
  with other settings is refused), ``trials/<number>/`` (run directories), ``study.csv``, ``best.toml``
  (a config ``fedslip run --config`` takes as is: the test split again), ``report.md`` and Optuna's
  optimization-history and parameter-importance plots.
- Seeds: ``--seeds 0,1,2`` (``[tune] seeds``) runs every trial once per validation seed and scores the mean
  (run directories ``trials/<number>`` for the first seed, ``trials/<number>-seed<s>`` for the others); the
  pruner follows the first seed's rounds. One seed cannot rank settings less than a point apart.
- Rescore: ``--rescore 2 --rescore-seeds 1`` runs the study's 2 best complete trials again on validation
  seed 1 (``trials/<number>-seed1``) and chooses the best mean over all the seeds each of them ran
  (``rescore.json``; ``best.toml`` and ``best.json`` follow that choice). The cheap form of ``--seeds`` for a
  finished study: only the finalists pay for the extra seeds, and a winner that was one lucky draw of
  partition and initialization is caught.
- Resume: the same call again continues the study. A trial interrupted mid-run is marked failed and its
  parameters re-enqueued; the new trial resumes that run directory from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
import tomllib

from . import api, health
from .config import FIELDS, ConfigError, ExperimentConfig, make_config
from .data import has_local_split
from .server import RoundFailed
from .storage import atomic_write_bytes, write_json

log = logging.getLogger("fedslip")

KNOWN_RANGES: dict[str, dict[str, Any]] = {
    "lr": {"low": 1e-4, "high": 3e-2, "log": True},
    "private_lr": {"low": 1e-4, "high": 3e-2, "log": True},
    "kstep_lr": {"low": 1e-5, "high": 1e-2, "log": True},
    "fedprox_mu": {"low": 1e-4, "high": 1.0, "log": True},
    "weight_decay": {"low": 1e-5, "high": 1e-1, "log": True},
    "private_target_sparsity": {"low": 0.0, "high": 0.9, "log": False},
    "lora_rank": {"choices": [4, 8, 16]},
    "private_rank": {"choices": [4, 8, 16]},
    "local_epochs": {"low": 1, "high": 3, "log": False},
    "ditto_lambda": {"low": 1e-3, "high": 10.0, "log": True},
    "local_first_steps": {"low": 4, "high": 64, "log": True},
    "private_weight": {"low": 0.1, "high": 0.9, "log": False},
}
# what a method's result depends on most: its learning rates (K-step's where the run has one and the
# method relies on it) and the method's own knob (one sweep of both)
DEFAULT_SPACES = {"fedavg_lora": ["lr"], "centralized": ["lr"], "dual_naive": ["lr", "private_lr"],
                  "fedslip": ["lr", "private_lr"], "fedper": ["lr"], "fedrep": ["lr", "local_first_steps"],
                  "fedbabu": ["lr", "kstep_lr"], "fedsa_lora": ["lr"], "ditto": ["lr", "private_lr", "ditto_lambda"],
                  "feddpa_fixed": ["lr", "private_lr", "private_weight"],
                  "feddpa": ["lr", "private_lr", "private_weight"], "local": ["lr"]}
OBJECTIVES = ("personalized", "global", "kstep", "worst_client")
SUMMARY_KEY = {"personalized": "personalized_accuracy", "global": "global_accuracy", "kstep": "kstep_accuracy",
               "worst_client": "worst_client_personalized_accuracy"}
# what each objective is per round, for pruning; K-step accuracy has no per-round value (measured once, after
# the last round): a study whose objective includes it is not pruned (``prunes``)
ROUND_KEY = {"personalized": "personalized_accuracy", "global": "global_accuracy",
             "worst_client": "personalized_accuracy_per_client"}


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched config key: a range (``log`` = log-uniform) or a list of choices."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple | None = None

    @classmethod
    def parse(cls, name: str, spec: Any) -> Param:
        check_searchable([name])
        kind = str(FIELDS[name].type)
        if isinstance(spec, list) and kind not in ("float", "int"):
            raise ConfigError(f"tune space: {name} is a {kind} key: give {{choices = [...]}}")
        if isinstance(spec, list) and len(spec) == 2:
            spec = {"low": spec[0], "high": spec[1], "log": kind == "float"}
        if not isinstance(spec, dict) or not (set(spec) <= {"low", "high", "log", "choices"}):
            raise ConfigError(f"tune space: {name} = {spec!r}; expected [low, high], {{low, high, log}} or "
                              "{choices = [...]}")
        if "choices" in spec:
            if not isinstance(spec["choices"], list) or not spec["choices"]:
                raise ConfigError(f"tune space: {name}.choices must be a non-empty list")
            for value in spec["choices"]:
                make_config({name: value})  # each choice a valid value of the key
            return cls(name, choices=tuple(spec["choices"]))
        if kind not in ("float", "int"):
            raise ConfigError(f"tune space: {name} is a {kind} key: give {{choices = [...]}}")
        try:
            low, high, use_log = float(spec["low"]), float(spec["high"]), bool(spec.get("log", False))
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"tune space: {name} needs numeric low and high, got {spec!r}") from None
        if not low < high or (use_log and low <= 0):
            raise ConfigError(f"tune space: {name}: need low < high (and low > 0 for log), got {low}, {high}")
        return cls(name, low, high, use_log)

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if str(FIELDS[self.name].type) == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def contains(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        return self.low <= value <= self.high

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.name} in {list(self.choices)}"
        return f"{self.name} in [{self.low:g}, {self.high:g}]{' log-uniform' if self.log else ''}"


def check_searchable(names: list[str]) -> None:
    """Refuse names that are not config keys (``--search``, ``[tune] search`` or ``[tune.space]``), saying which
    keys can be searched."""
    unknown = [n for n in names if n not in FIELDS]
    if unknown:
        raise ConfigError(f"tune: {', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} not a config "
                          f"key; searchable keys: {', '.join(KNOWN_RANGES)} (default ranges), or any other config key "
                          "with a range in [tune.space] (fedslip config-reference lists them)")


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# what each setting of the [tune] table must be: a check, and what the error says it expects
TUNE_SETTINGS: dict[str, tuple[Any, str]] = {
    "maximize": (lambda v: isinstance(v, (str, dict)),
                 'an objective or a weighted mix, e.g. "personalized" or "personalized=0.5,global=0.5"'),
    "trials": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "search": (lambda v: v is None or isinstance(v, (list, tuple)) and all(isinstance(k, str) for k in v),
               'a list of config keys, e.g. ["lr", "private_lr"]'),
    "space": (lambda v: isinstance(v, dict), "a table of ranges, e.g. lr = [1e-4, 3e-2]"),
    "pruner_startup_trials": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "pruner_warmup_rounds": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "seeds": (lambda v: isinstance(v, (list, tuple)) and all(map(_integer, v)), "a list of integers, e.g. [0, 1, 2]"),
}
TUNE_KEYS = tuple(TUNE_SETTINGS)


def _setting(table: dict[str, Any], name: str, given: Any, default: Any) -> Any:
    """A study setting: the argument given, else the ``[tune]`` table's value, else ``default``; refused unless
    of its kind (``TUNE_SETTINGS``), the error naming where the value came from."""
    value = given if given is not None else table.get(name, default)
    check, expected = TUNE_SETTINGS[name]
    if not check(value):
        raise ConfigError(f"{name if given is not None else f'[tune] {name}'} must be {expected}, got {value!r}")
    return value


def parse_objective(objective: str | dict[str, float]) -> dict[str, float]:
    """``"personalized"``, ``"personalized=0.5,global=0.5"`` or ``{"personalized": 0.5, ...}`` -> weights."""
    if isinstance(objective, str):
        parts = [p.strip() for p in objective.split(",") if p.strip()]
        try:
            objective = {p.split("=")[0].strip(): float(p.split("=")[1]) if "=" in p else 1.0 for p in parts}
        except ValueError:
            raise ConfigError(f"tune maximize {objective!r}: weights must be numbers") from None
    unknown = sorted(set(objective) - set(OBJECTIVES))
    if not objective or unknown:
        raise ConfigError(f"tune maximize: {', '.join(unknown) or 'nothing'} not among {', '.join(OBJECTIVES)}")
    if any(w <= 0 for w in objective.values()):
        raise ConfigError("tune maximize: weights must be > 0")
    return {k: float(objective[k]) for k in sorted(objective)}


def _value(weights: dict[str, float], values: dict[str, float | None]) -> float | None:
    if any(values[k] is None for k in weights):
        return None
    return sum(w * values[k] for k, w in weights.items()) / sum(weights.values())


def prunes(weights: dict[str, float]) -> bool:
    """Whether trials of this objective are pruned: only where every part of it has a per-round value."""
    return all(k in ROUND_KEY for k in weights)


def round_value(weights: dict[str, float], row: dict) -> float | None:
    """The objective on one round's metrics (pruning compares trials on this, round by round); None where
    the objective has no per-round value (``prunes``)."""
    if not prunes(weights):
        return None
    values = {k: row.get(ROUND_KEY[k]) for k in weights}
    if "worst_client" in weights:
        present = [a for a in values["worst_client"] or [] if a is not None]
        values["worst_client"] = min(present) if present else None
    return _value(weights, values)


def final_value(weights: dict[str, float], summary: dict) -> float | None:
    return _value(weights, {k: summary.get(SUMMARY_KEY[k]) for k in weights})


@dataclasses.dataclass
class Study:
    """A study's settings: everything that must equal on resume."""

    base: dict[str, Any]  # the config keys given (TOML + overrides), method included, eval_split excluded
    objective: dict[str, float]
    space: list[Param]
    trials: int
    pruner_startup_trials: int
    pruner_warmup_rounds: int
    seeds: list[int] = dataclasses.field(default_factory=list)  # validation seeds averaged; [] = the config's

    def config(self, params: dict[str, Any], seed: int | None = None) -> ExperimentConfig:
        keys = {**self.base, **params, **({"seed": seed} if seed is not None else {})}
        if not keys.get("val_samples_per_client"):
            keys["val_samples_per_client"] = make_config(keys).test_samples_per_client
        # the embedded engine: pruning stops a trial from its round callback, which Flower's runtime would
        # swallow; every engine gives the same result (engine is a run-only key)
        return make_config({**keys, "eval_split": "val", "engine": "embedded"})

    def run_seeds(self) -> list[int]:
        """The seeds each trial runs (the first one's rounds feed the pruner)."""
        return self.seeds or [self.config({}).seed]

    def settings(self) -> dict:
        return {"base": self.base, "objective": self.objective, "space": [p.describe() for p in self.space],
                "pruner_startup_trials": self.pruner_startup_trials,
                "pruner_warmup_rounds": self.pruner_warmup_rounds,
                **({"seeds": self.seeds} if self.seeds else {})}  # absent: studies made before seeds existed


def make_study(toml_path: str | Path | None = None, overrides: dict[str, Any] | None = None,
               method: str | None = None, trials: int | None = None, maximize: str | dict | None = None,
               search: list[str] | None = None, space: dict[str, Any] | None = None,
               pruner_startup_trials: int | None = None, pruner_warmup_rounds: int | None = None,
               seeds: list[int] | None = None) -> Study:
    """Settings from the config's ``[tune]`` table, overridden by the arguments given; validated."""
    raw: dict[str, Any] = {}
    if toml_path is not None:
        make_config(toml_path=Path(toml_path))  # one clear error for a missing/invalid file
        raw = tomllib.loads(Path(toml_path).read_text(encoding="utf-8"))
    table = raw.pop("tune", {})
    unknown = sorted(set(table) - set(TUNE_KEYS))
    if unknown:
        raise ConfigError(f"[tune]: unknown key(s) {', '.join(unknown)}; known: {', '.join(TUNE_KEYS)}")
    base = {**raw, **(overrides or {})}
    if method is not None:
        base["method"] = method
    if base.get("eval_split") == "test":
        raise ConfigError("fedslip tune evaluates on validation rows only; remove eval_split = 'test' from the "
                          "config (choosing settings on test rows makes every reported number optimistic)")
    base.pop("eval_split", None)
    cfg = make_config(base)
    base["method"] = cfg.method
    names = _setting(table, "search", search, None)
    if names is None:
        names = DEFAULT_SPACES.get(cfg.method, ["lr"]) + (["kstep_lr"] if cfg.kstep > 0 and
                                                          cfg.method == "fedavg_lora" else [])
    given_ranges = {**_setting(table, "space", None, {}), **(space or {})}
    check_searchable([*names, *given_ranges])
    ranges = {**{n: KNOWN_RANGES.get(n) for n in names}, **given_ranges}
    missing = sorted(n for n, r in ranges.items() if r is None)
    if missing:
        raise ConfigError(f"tune: no default range for {', '.join(missing)}: give one in [tune.space], e.g. "
                          f"{missing[0]} = [low, high]")
    params = [Param.parse(n, r) for n, r in sorted(ranges.items())]
    clashes = sorted(p.name for p in params if p.name in ("method", "seed", "eval_split", "val_samples_per_client"))
    if clashes:
        raise ConfigError(f"tune: {', '.join(clashes)} cannot be searched")
    study = Study(base, parse_objective(_setting(table, "maximize", maximize, "personalized")), params,
                  trials=_setting(table, "trials", trials, 12),
                  pruner_startup_trials=_setting(table, "pruner_startup_trials", pruner_startup_trials, 3),
                  pruner_warmup_rounds=_setting(table, "pruner_warmup_rounds", pruner_warmup_rounds, 1),
                  seeds=list(_setting(table, "seeds", seeds, [])))
    if len(study.seeds) == 1 or len(set(study.seeds)) != len(study.seeds):
        raise ConfigError(f"tune seeds: two or more different validation seeds to average, got {study.seeds}")
    if "kstep" in study.objective and cfg.kstep == 0:
        raise ConfigError("tune maximize 'kstep' needs kstep > 0 in the config")
    if "global" in study.objective and cfg.partition == "own" and not has_local_split(cfg, "val"):
        raise ConfigError(f"tune maximize 'global' with partition='own' needs the server's own validation rows, "
                          f"val.csv[.gz] in data_dir ({cfg.resolved_data_dir() or 'none set'}): without them the "
                          "global validation set would be the union of the clients' rows, which the server never "
                          "holds (the personalized, worst_client and kstep objectives need none)")
    study.config({})  # the base config itself must be valid for a validation run
    return study


def _optuna():
    import optuna

    # Optuna's own record of a failed trial carries the exception's traceback (a Ctrl-C's is some 160 lines, before
    # the CLI's "interrupted" line): the log's line per trial (``_log_trial``) and the CLI's error say it instead
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


@contextlib.contextmanager
def _warnings_logged() -> Iterator[None]:
    """Python warnings raised inside (Optuna's, e.g. the parameter importances' "Target and region quantiles
    select the same set of trials") become INFO lines of the log, which ``--quiet`` hides."""
    experimental = _optuna().exceptions.ExperimentalWarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=experimental)  # "plot_... is experimental": not for users
        yield
    for message in dict.fromkeys(str(w.message) for w in caught):
        log.info("tune: %s", message)


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()) or "-"


def _log_trial(optuna_study, trial) -> None:
    """One INFO line per finished trial: number, state, parameters, objective (an Optuna callback; a trial
    whose run raised is logged by the objective, as Optuna stops the study before its callbacks)."""
    rounds = sorted(trial.intermediate_values)
    value = trial.value if trial.value is not None else trial.intermediate_values[rounds[-1]] if rounds else None
    result = "no objective" if value is None else f"objective {value:.4f}"
    if trial.state.name == "PRUNED" and rounds:  # its value: the round it stopped in
        result += f" at round {rounds[-1]}"
    why = trial.user_attrs.get("failed_round")
    log.info("tune: trial %d %s: %s; %s%s", trial.number, trial.state.name.lower(), _params(trial.params), result,
             f" ({why})" if why else "")


def _open(study: Study, out: Path):
    """Create or load the study in ``out``, refusing a directory that holds another study or other files."""
    optuna = _optuna()
    settings_path = out / "study.json"
    if settings_path.is_file():
        previous = json.loads(settings_path.read_text())
        if previous != study.settings():
            changed = sorted(k for k in study.settings() if previous.get(k) != study.settings()[k])
            raise ConfigError(f"{out} holds a study with other settings ({', '.join(changed)}); use another --out")
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and holds no study; use a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    write_json(settings_path, study.settings())
    base_cfg = study.config({})
    optuna_study = optuna.create_study(
        study_name="fedslip-tune", storage=f"sqlite:///{out / 'study.db'}", load_if_exists=True,
        direction="maximize", pruner=make_pruner(study))
    # seeded by the config's seed and the trials the study already holds: a continued study draws new
    # points (a sampler seeded alone would replay, after a restart, the draws it made before)
    seed = np.random.SeedSequence([base_cfg.seed, len(optuna_study.trials)]).generate_state(1)[0]
    optuna_study.sampler = optuna.samplers.TPESampler(seed=int(seed))
    return optuna_study


def make_pruner(study: Study):
    """Median pruning: a trial whose objective at round r is below the median of the finished trials' at
    round r stops, once ``pruner_startup_trials`` trials finished and from round ``pruner_warmup_rounds
    + 1`` on (Optuna counts steps from 0 and prunes at ``step >= n_warmup_steps``; rounds count from 1).
    None for an objective without per-round values (K-step accuracy): every trial runs to the end."""
    optuna = _optuna()
    if not prunes(study.objective):
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=study.pruner_startup_trials,
                                       n_warmup_steps=study.pruner_warmup_rounds + 1)


def _requeue_interrupted(optuna_study) -> None:
    """Trials left RUNNING by a process that died, or failed by Ctrl-C: failed, and their parameters queued
    again with the run directory to resume (once each: the study remembers which it requeued)."""
    from optuna.trial import TrialState

    requeued = set(optuna_study.user_attrs.get("requeued", []))
    for t in optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.FAIL)):
        if t.number in requeued or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted")):
            continue
        if t.state == TrialState.RUNNING:
            optuna_study.tell(t.number, state=TrialState.FAIL)
        optuna_study.enqueue_trial(t.params, user_attrs={"resume_run": t.user_attrs.get("run_dir", "")})
        requeued.add(t.number)
        log.info("tune: trial %d was interrupted; its run continues in a new trial", t.number)
    optuna_study.set_user_attr("requeued", sorted(requeued))


def _objective(study: Study, out: Path, progress: bool):
    optuna = _optuna()

    def objective(trial) -> float:
        try:
            return run_trial(trial)
        except (KeyboardInterrupt, optuna.TrialPruned):
            raise
        except Exception as e:
            log.info("tune: trial %d failed: %s; %s", trial.number, _params(trial.params), e)
            raise

    def run_trial(trial) -> float:
        params = {p.name: p.suggest(trial) for p in study.space}
        resume_run = trial.user_attrs.get("resume_run")  # relative to out, like every run_dir attribute
        run_dir = resume_run or f"trials/{trial.number:04d}"
        trial.set_user_attr("run_dir", run_dir)

        def report(row: dict) -> None:
            value = round_value(study.objective, row)
            if value is not None:
                trial.report(value, row["round"])
                if trial.should_prune():
                    raise optuna.TrialPruned(f"round {row['round']}: {value:.4f} below the median")

        summaries = []
        for i, seed in enumerate(study.run_seeds()):  # the first seed's rounds feed the pruner
            path = out / (run_dir if i == 0 else f"{run_dir}-seed{seed}")
            try:
                summaries.append(_trial_run(study.config(params, seed if study.seeds else None), path,
                                            bool(resume_run), report if i == 0 else _ignore, progress))
            except KeyboardInterrupt:
                trial.set_user_attr("interrupted", True)  # the next call continues this run
                raise
            except RoundFailed as e:  # e.g. every client diverged at this learning rate: a bad point, not a crash
                trial.set_user_attr("failed_round", str(e))
                raise optuna.TrialPruned(f"the run stopped: {e}") from None
        for key in ("global_accuracy", "personalized_accuracy", "kstep_accuracy",
                    "worst_client_personalized_accuracy", "wall_seconds"):
            trial.set_user_attr(key, _mean([s.get(key) for s in summaries]))
        values = [final_value(study.objective, s) for s in summaries]
        if None in values:
            raise ValueError(f"trial {trial.number}: a run gave no value for the objective")
        return float(np.mean(values))  # the mean over the validation seeds

    return objective


def _ignore(row: dict) -> None:
    """The rounds of a trial's second and later seeds: not reported (the pruner follows the first)."""


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if len(present) == len(values) else None


def _trial_run(cfg: ExperimentConfig, run_path: Path, resumed: bool, report, progress: bool) -> dict:
    """A trial's run: new, or (a requeued trial) the interrupted run continued from its checkpoint with the
    rounds it had already finished reported again, so pruning sees the whole curve."""
    if resumed and (run_path / "summary.json").is_file():
        return json.loads((run_path / "summary.json").read_text())
    if resumed and (run_path / "config.toml").is_file():
        history = [json.loads(line) for line in (run_path / "metrics.jsonl").read_text().splitlines() if line]
        for row in history:
            report(row)
        return api.resume(run_path, progress=progress, callbacks=[report], log=False)
    return api.run(cfg, run_path, overwrite=True, progress=progress, callbacks=[report], log=False)


def tune(out: str | Path, trials: int | None = None, toml_path: str | Path | None = None,
         overrides: dict[str, Any] | None = None, method: str | None = None, maximize: str | dict | None = None,
         search: list[str] | None = None, space: dict[str, Any] | None = None,
         pruner_startup_trials: int | None = None, pruner_warmup_rounds: int | None = None,
         enqueue: list[dict[str, Any]] = (), progress: bool = False, command: str = "",
         timeout: float | None = None, seeds: list[int] | None = None, rescore: int = 0,
         rescore_seeds: list[int] | None = None) -> dict:
    """Run (or continue) the study in ``out`` until it holds ``trials`` finished (complete or pruned)
    trials; write ``study.csv``, ``best.toml``, ``report.md`` and the plots; return the best trial.
    ``rescore``, ``rescore_seeds``: then run the ``rescore`` best complete trials on ``rescore_seeds`` too
    and choose by the mean over every seed each ran (``rescore_finalists``).
    ``enqueue``: parameter sets to try first (after the config's own values). ``timeout``: seconds after
    which no new trial starts (the running one finishes); the outputs are written from the trials finished
    so far and the same call later continues the study (a time budget for a shared or lent machine).
    ``seeds``: two or more validation seeds; each trial runs one run per seed and scores their mean (the
    pruner follows the first seed's rounds): settings that differ by less than a point need more than one."""
    from optuna.trial import TrialState

    study = make_study(toml_path, overrides, method, trials, maximize, search, space, pruner_startup_trials,
                       pruner_warmup_rounds, seeds)
    if rescore < 0 or bool(rescore) != bool(rescore_seeds):
        raise ConfigError(f"tune rescore: give the number of finalists (>= 1) and the seeds to add together, got "
                          f"rescore={rescore}, rescore_seeds={rescore_seeds}")
    out = Path(out)
    optuna_study = _open(study, out)
    if not optuna_study.trials:  # a new study: the config's own values first (those inside the space), then
        start = study.config({})  # what the caller queued
        optuna_study.enqueue_trial({p.name: getattr(start, p.name) for p in study.space
                                    if p.contains(getattr(start, p.name))})
        for params in enqueue:
            optuna_study.enqueue_trial(params)
    _requeue_interrupted(optuna_study)
    done = len(optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    if done < study.trials:
        log.info("tune: %d of %d trials done; running %d", done, study.trials, study.trials - done)
        if not prunes(study.objective):
            log.info("tune: %s", pruning_note(study))
        optuna_study.optimize(_objective(study, out, progress), n_trials=study.trials - done, timeout=timeout,
                              callbacks=[_log_trial])
    done = len(optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    if rescore and done >= study.trials:  # a study stopped by its timeout is rescored when it is finished
        rescore_finalists(study, optuna_study, out, rescore, rescore_seeds, progress)
    with _warnings_logged():
        return write_outputs(study, optuna_study, out, command)


def rescore_finalists(study: Study, optuna_study, out: Path, top: int, seeds: list[int], progress: bool) -> dict:
    """Run the ``top`` best complete trials on the validation ``seeds`` they have not run yet (run
    directories ``<run_dir>-seed<s>``, as ``--seeds`` names them; finished ones are kept, interrupted ones
    continued) and write ``rescore.json``: each finalist's value per seed and their mean, and the finalist
    with the best mean (ties: the better single-seed rank). ``write_outputs`` recommends that one."""
    from optuna.trial import TrialState

    complete = sorted(optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                      key=lambda t: -t.value)[:top]
    finalists = []
    for t in complete:
        values = {}
        for i, seed in enumerate(study.run_seeds() + [s for s in seeds if s not in study.run_seeds()]):
            path = out / (t.user_attrs["run_dir"] if i == 0 else f"{t.user_attrs['run_dir']}-seed{seed}")
            cfg = study.config(t.params, seed)
            summary = _trial_run(cfg, path, (path / "config.toml").is_file(), _ignore, progress)
            values[str(seed)] = final_value(study.objective, summary)
        if None in values.values():
            raise ValueError(f"trial {t.number}: a rescore run gave no value for the objective")
        finalists.append({"trial": t.number, "params": t.params, "run_dir": t.user_attrs["run_dir"],
                          "study_value": t.value, "values": values, "mean": float(np.mean(list(values.values())))})
    best = max(finalists, key=lambda f: f["mean"])  # max keeps the first (best single-seed rank) on a tie
    result = {"top": top, "seeds": sorted({int(s) for f in finalists for s in f["values"]}),
              "objective": study.objective, "finalists": finalists, "best_trial": best["trial"],
              "best_value": best["mean"], "changed": best["trial"] != complete[0].number}
    write_json(out / "rescore.json", result)
    return result


def write_outputs(study: Study, optuna_study, out: Path, command: str = "") -> dict:
    """study.csv, best.toml, report.md and the plots from the study's storage."""
    from optuna.trial import TrialState

    optuna_study.trials_dataframe().to_csv(out / "study.csv", index=False)
    complete = optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise ValueError(f"{out}: no trial completed; nothing to recommend")
    best, value, rescored = optuna_study.best_trial, optuna_study.best_value, None
    if (out / "rescore.json").is_file():  # the finalists' mean over more seeds decides
        rescored = json.loads((out / "rescore.json").read_text())
        best, value = optuna_study.trials[rescored["best_trial"]], rescored["best_value"]
    best_toml = {k: v for k, v in study.base.items() if k not in ("eval_split", "val_samples_per_client")}
    best_toml.update(best.params)
    how = (f"mean over validation seeds {rescored['seeds']} of the {rescored['top']} best trials"
           if rescored else "validation objective")
    header = (f"# Best of the fedslip tune study in {out} (trial {best.number}, {how} "
              f"{value:.4f}: {json.dumps(study.objective)}).\n# Evaluates on the test split:\n"
              f"#   fedslip run --config {out / 'best.toml'} --out runs/best\n")
    atomic_write_bytes(out / "best.toml", (header + tomli_w.dumps(best_toml)).encode())
    pngs = _plots(optuna_study, out)
    result = {"best_trial": best.number, "best_value": value, "best_params": best.params,
              "best_run": best.user_attrs.get("run_dir"), "objective": study.objective,
              **({"rescored": {k: rescored[k] for k in ("top", "seeds", "changed")}} if rescored else {}),
              "trials": len(optuna_study.trials),
              "states": {s.name.lower(): len(optuna_study.get_trials(deepcopy=False, states=(s,)))
                         for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}}
    write_json(out / "best.json", result)
    atomic_write_bytes(out / "report.md", _report(study, optuna_study, result, pngs, command, out).encode())
    return result


def _plots(optuna_study, out: Path) -> list[str]:
    """Optuna's optimization history and parameter importances (importances need 2+ complete trials and a
    parameter that varied)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ov

    written = []
    for name, draw in (("optimization_history.png", ov.plot_optimization_history),
                       ("param_importances.png", ov.plot_param_importances)):
        try:
            ax = draw(optuna_study)
        except (ValueError, RuntimeError) as e:  # too few trials for importances
            log.info("tune: no %s (%s)", name, e)
            continue
        fig = ax.figure
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(name)
    return written


def _symptoms(run_path: Path) -> list[str]:
    """The health symptoms of a trial's run (``fedslip.health`` replayed over its metrics.jsonl)."""
    metrics = run_path / "metrics.jsonl"
    if not metrics.is_file():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    return sorted({e["symptom"] for e in health.check_history(rows)})


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def pruning_note(study: Study) -> str:
    """How the study prunes, in words (the log and report.md)."""
    if not prunes(study.objective):
        return ("no pruning (the objective includes K-step accuracy, measured only after the last round; the "
                "per-round zero-shot accuracy is not a stand-in for it)")
    return (f"median pruning once {study.pruner_startup_trials} trials finished, from round "
            f"{study.pruner_warmup_rounds + 1} on")


def _rescore_lines(out: Path) -> list[str]:
    """The finalists' table when the study was rescored on more validation seeds (``rescore.json``)."""
    if not (out / "rescore.json").is_file():
        return []
    r = json.loads((out / "rescore.json").read_text())
    lines = [f"Rescored: the {r['top']} best complete trials on validation seeds {r['seeds']}; the choice is the "
             f"best mean ({'another trial than' if r['changed'] else 'the same trial as'} the single-seed best).",
             "", "| trial | " + " | ".join(f"seed {s}" for s in r["seeds"]) + " | mean |",
             "|---|" + "---|" * (len(r["seeds"]) + 1)]
    for f in r["finalists"]:
        lines.append(f"| {f['trial']} | " + " | ".join(_pct(f["values"].get(str(s))) for s in r["seeds"])
                     + f" | {_pct(f['mean'])} |")
    return lines + [""]


def _report(study: Study, optuna_study, result: dict, pngs: list[str], command: str, out: Path) -> str:
    lines = [f"# fedslip tune: {study.base['method']}", ""]
    if command:
        lines += ["```bash", command, "```", ""]
    lines += [f"Objective (validation rows): {json.dumps(study.objective)}; space: "
              f"{'; '.join(p.describe() for p in study.space)}; TPE sampler (seeded by the config's seed "
              f"{study.config({}).seed}), {pruning_note(study)}; validation seeds {study.run_seeds()} (a trial's "
              f"value is their mean). Trials: {result['states']}.", "",
              f"**Best: trial {result['best_trial']}**, objective {100 * result['best_value']:.2f}, "
              f"{json.dumps(result['best_params'])} -> [best.toml](best.toml)", "",
              *_rescore_lines(out),
              "| trial | state | " + " | ".join(p.name for p in study.space)
              + " | objective | global | personalized | K-step | worst client | rounds | minutes | health |",
              "|---|---|" + "---|" * len(study.space) + "---|---|---|---|---|---|---|---|"]
    for t in optuna_study.trials:
        a = t.user_attrs
        symptoms = _symptoms(out / a["run_dir"]) if a.get("run_dir") else []
        params = " | ".join(f"{t.params[p.name]:.3g}" if isinstance(t.params.get(p.name), float)
                            else str(t.params.get(p.name, "-")) for p in study.space)
        value = t.value if t.value is not None else (t.intermediate_values[max(t.intermediate_values)]
                                                     if t.intermediate_values else None)
        rounds = max(t.intermediate_values) if t.intermediate_values else "-"
        minutes = f"{a['wall_seconds'] / 60:.1f}" if a.get("wall_seconds") else "-"
        lines.append(f"| {t.number} | {t.state.name.lower()} | {params} | {_pct(value)} | "
                     f"{_pct(a.get('global_accuracy'))} | {_pct(a.get('personalized_accuracy'))} | "
                     f"{_pct(a.get('kstep_accuracy'))} | {_pct(a.get('worst_client_personalized_accuracy'))} | "
                     f"{rounds} | {minutes} | {', '.join(symptoms) or '-'} |")
    lines += ["", "Accuracies in % on validation rows; a pruned trial shows its objective at the round it "
              "stopped. Every trial is a run directory in `trials/` (config.toml, metrics.jsonl).", ""]
    lines += [f"![{p}]({p})" for p in pngs] + [""]
    return "\n".join(lines)
