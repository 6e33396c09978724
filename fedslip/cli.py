"""``fedslip`` command line: a thin layer over the Python API.

    fedslip run --method fedavg_lora --out runs/x [--config cfg.toml] [--rounds 3 ...]
    fedslip predict --run runs/x --client 0 "some text" ...   # or --file texts.txt|texts.jsonl|-
    fedslip export --run runs/x --client 0 --out exported/ [--format peft]
    fedslip kstep --run runs/x --steps 100 --lr 1e-3   # K-step again on a finished run
    fedslip tune --config cfg.toml --method fedslip --trials 12 --out runs/tune   # Optuna, validation rows
    fedslip audit runs/x              # the server's attack on a run made with --audit
    fedslip bench-engines --out DIR   # per-round time on embedded / Flower simulation / deployment
    fedslip bench-scale --out DIR     # memory and round time at 10 / 100 / 1,000 clients
    fedslip deploy-local --workdir runs/deploy [config flags]   # SuperLink + SuperNodes on 127.0.0.1
    fedslip flower-app DIR            # DIR/pyproject.toml: the Flower app of the installed package (flwr run DIR)
    fedslip config-reference          # the config table of docs/configuration.md
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .config import CHOICES, FIELDS, PRESET_BASE, PRESET_KEYS, ConfigError, make_config


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default(name: str) -> str:
    """The field's default as shown in --help and docs/configuration.md; preset-controlled fields say so."""
    if name in PRESET_KEYS:
        return f"method preset, else {json.dumps(PRESET_BASE[name])}"
    f = FIELDS[name]
    return json.dumps(f.default_factory() if callable(f.default_factory) else f.default)


def add_config_flags(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One flag per config field (but ``exclude``: keys the command sets itself); values stay None unless given,
    so TOML and presets are not masked."""
    group = parser.add_argument_group("experiment config (any key of the TOML config)")
    for name, f in FIELDS.items():
        if name in exclude:
            continue
        kind = str(f.type)
        help_text = f.metadata["help"].replace("%", "%%") + f" (default: {_default(name)})"
        if kind == "bool":
            group.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        elif name in CHOICES:
            group.add_argument(_flag(name), dest=name, default=None, choices=CHOICES[name], help=help_text)
        else:
            metavar = "A,B,..." if kind.startswith("list") else kind.upper()
            group.add_argument(_flag(name), dest=name, default=None, metavar=metavar, help=help_text)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}


def config_reference() -> str:
    """Markdown table of every config key (docs/configuration.md embeds this output; a test keeps them in sync)."""
    lines = ["| key | flag | default | meaning |", "|---|---|---|---|"]
    for name, f in FIELDS.items():
        lines.append(f"| `{name}` | `{_flag(name)}` | `{_default(name)}` | {f.metadata['help']} |")
    return "\n".join(lines)


def _command(argv: Sequence[str] | None) -> str:
    import shlex

    return "fedslip " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))


ALLOW_INCOMPLETE = ("count runs that lost clients (client_failures) in the report's verdict; without it they "
                    "are marked in every table and plot and left out of the verdict's comparisons")


class Parser(argparse.ArgumentParser):
    """argparse's parser (each subcommand's too) with a short answer to a bad flag: the problem and where the help
    is, not the whole usage first (some 60 lines for ``fedslip run``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\nsee {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fedslip", description="Personalized federated fine-tuning with dual-track LoRA.")
    parser.add_argument("--version", action="version", version=f"fedslip {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one federated experiment")
    run.add_argument("--config", type=str, default=None, help="TOML file with config keys")
    run.add_argument("--out", type=str, default=None, help="run directory to create")
    run.add_argument("--resume", type=str, default=None, metavar="RUN_DIR",
                     help="continue an interrupted run from its last completed round (uses RUN_DIR/config.toml)")
    run.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    run.add_argument("--quiet", action="store_true", help="no progress bars or round log")
    add_config_flags(run)
    predict = sub.add_parser("predict", help="classify texts with a client's personalized model")
    predict.add_argument("--run", required=True, help="finished run directory")
    predict.add_argument("--client", type=int, required=True, help="client id (0-based)")
    predict.add_argument("--global", dest="global_only", action="store_true", help="global track only")
    predict.add_argument("--json", action="store_true", help="print JSON lines with probabilities")
    predict.add_argument("--file", default=None, metavar="PATH|-", help="read the texts from PATH, one per line (a "
                         "name ending in .jsonl: one JSON object per line, its \"text\" field), or from standard "
                         "input with -; blank lines are skipped")
    predict.add_argument("texts", nargs="*", help="texts to classify (or --file)")
    export = sub.add_parser("export", help="save a client's model for plain transformers (merged) or peft (adapters)")
    export.add_argument("--run", required=True, help="finished run directory")
    export.add_argument("--client", type=int, required=True, help="client id (0-based)")
    export.add_argument("--global", dest="global_only", action="store_true", help="global track only")
    export.add_argument("--out", required=True, help="new or empty directory")
    export.add_argument("--format", choices=("merged", "peft"), default="merged",
                        help="merged: tracks folded into the backbone, one transformers model directory; peft: the "
                        "global and private adapters and how to load them on the base model (default: merged)")
    compare = sub.add_parser("compare", help="run methods x seeds on identical partitions, then report")
    # --method / --seed: the same flags (compare sets the config keys method and seed of each of its runs)
    compare.add_argument("--methods", "--method", default="fedavg_lora,dual_naive,fedslip",
                         help="comma-separated presets")
    compare.add_argument("--seeds", "--seed", type=seed_list, default="0,1,2", help="comma-separated seeds")
    compare.add_argument("--config", type=str, default=None, help="TOML file with config keys")
    compare.add_argument("--out", required=True, help="comparison directory (runs are kept and resumed there)")
    compare.add_argument("--method-config", action="append", default=[], metavar="METHOD=TOML",
                         help="a config file for one method, in place of --config (e.g. its tuned best.toml); "
                         "repeatable")
    compare.add_argument("--allow-incomplete", action="store_true", help=ALLOW_INCOMPLETE)
    compare.add_argument("--quiet", action="store_true", help="no progress bars or round log")
    add_config_flags(compare, exclude=("method", "seed"))
    kstep = sub.add_parser("kstep", help="re-run K-step on a finished run with other steps / learning rate "
                           "(to tune K-step on a validation run); writes RUN/kstep/steps<N>-lr<X>.json")
    kstep.add_argument("--run", required=True, help="finished run directory")
    steps = kstep.add_mutually_exclusive_group(required=True)
    steps.add_argument("--steps", type=int, help="local fine-tuning steps per client")
    steps.add_argument("--match-compute", metavar="RUN", default=None,
                       help="as many steps as bring this run to the training passes RUN spent (the "
                       "equal-compute K-step baseline: e.g. fedavg_lora's run matched to fedslip's); at the run's "
                       "kstep_lr it is recorded in the run's summary.json and reports show it as a row")
    kstep.add_argument("--lr", type=float, default=None, help="K-step learning rate (default: the run's "
                       "kstep_lr; 0 = the run's lr)")
    kstep.add_argument("--allow-test", action="store_true", help="also on a run evaluated on the test split "
                       "(eval_split = 'test'; refused otherwise: K-step is tuned on validation rows)")
    report = sub.add_parser("report", help="rebuild report.md, results.json and plots from finished runs")
    report.add_argument("paths", nargs="+", help="run directories or folders of them (e.g. a compare --out)")
    report.add_argument("--out", default=None, help="where to write (default: the single path given)")
    report.add_argument("--command", dest="made_by", default="", help="the command that made the runs, shown "
                        "in the report (default: the one OUT/results.json recorded)")
    report.add_argument("--allow-incomplete", action="store_true", help=ALLOW_INCOMPLETE)
    def benchmark(name: str, help: str, output: str, backbone: str) -> argparse.ArgumentParser:
        bench = sub.add_parser(name, help=f"{help}; writes OUT/{output}")
        bench.add_argument("--out", required=True, help=f"directory for {output}")
        bench.add_argument("--backbone", default=backbone, help=f"backbone (default: {backbone})")
        bench.add_argument("--data-dir", default="", help="AG News directory (default: FEDSLIP_DATA_DIR)")
        return bench

    benchmark("bench", "measure throughput and overhead", "bench.json", "minilm").add_argument(
        "--steps", type=int, default=20, help="timed training steps per measurement")
    benchmark("bench-engines", "per-round time of one run on every engine (embedded, Flower simulation, "
              "flwr run, local deployment)", "bench_engines.json", "tiny").add_argument(
        "--rounds", type=int, default=3, help="rounds per run (default: 3)")
    scale = benchmark("bench-scale", "peak memory, setup and round time at 10 / 100 / 1,000 clients with few "
                      "sampled per round", "bench_scale.json, .md, .png", "tiny,minilm")
    scale.add_argument("--engines", default="embedded,flower-sim", help="engines (default: embedded,flower-sim)")
    scale.add_argument("--rows-per-client", type=int, default=8, help="training rows per client (default: 8)")
    deploy = sub.add_parser("deploy-local", help="start a Flower SuperLink and one SuperNode per client on "
                            "127.0.0.1 (TLS with --tls), run the experiment on them with `flwr run`, stop them")
    deploy.add_argument("--workdir", required=True, help="new directory: run/, nodes/<id>/ (private states), "
                        "logs/, app/ (the Flower app), .flwr/")
    deploy.add_argument("--config", type=str, default=None, help="TOML file with config keys")
    deploy.add_argument("--tls", action="store_true", help="TLS between SuperLink, SuperNodes and flwr, with a "
                        "throwaway CA made in WORKDIR/certs")
    deploy.add_argument("--node-auth", action="store_true", help="SuperNode authentication (needs --tls): "
                        "a key pair per SuperNode, registered with the SuperLink")
    add_config_flags(deploy)
    app = sub.add_parser("flower-app", help="write DIR/pyproject.toml: the Flower app of the installed fedslip "
                         "(components, every config key) for `flwr run DIR <connection>`; ships no source")
    app.add_argument("dir", help="the app directory (created; a pyproject.toml there is replaced only if this "
                     "command wrote it)")
    tune = sub.add_parser("tune", help="hyperparameter search on validation rows with Optuna (resumable: the same "
                          "command continues the study); writes OUT/best.toml, study.csv, report.md, plots")
    tune.add_argument("--config", type=str, default=None, help="TOML file with config keys and an optional [tune] "
                      "table (maximize, trials, search, space, pruner_startup_trials, pruner_warmup_rounds)")
    tune.add_argument("--out", required=True, help="study directory (new, or a study to continue)")
    tune.add_argument("--trials", type=int, default=None, help="finished trials the study should hold (default: "
                      "[tune] trials, else 12)")
    tune.add_argument("--maximize", default=None, help="personalized | global | kstep | worst_client, or a weighted "
                      "mix like personalized=0.5,global=0.5 (default: personalized)")
    tune.add_argument("--search", default=None, metavar="KEY,KEY,...", help="config keys to search (default: the "
                      "method's learning rates); ranges from fedslip.tune.KNOWN_RANGES or [tune.space]")
    tune.add_argument("--seeds", type=seed_list, default=None, metavar="S,S,...",
                      help="validation seeds each trial averages (two or more; default: the config's seed alone)")
    tune.add_argument("--rescore", type=int, default=0, metavar="N",
                      help="when the study is finished: run its N best complete trials on --rescore-seeds too and "
                           "recommend the best mean over every seed they ran (rescore.json, best.toml)")
    tune.add_argument("--rescore-seeds", type=seed_list, default=None, metavar="S,S,...",
                      help="the validation seeds --rescore adds (e.g. 1)")
    tune.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                      help="start no new trial after SECONDS (the running one finishes; outputs are written from "
                           "the finished trials; the same command continues the study)")
    tune.add_argument("--quiet", action="store_true", help="no progress bars or log")
    add_config_flags(tune)
    audit = sub.add_parser("audit", help="what an honest-but-curious server infers from the updates of a run made "
                           "with --audit (classifier-bias attack on each client's dominant class; with "
                           "--public-data also the attack learned on shadow clients); writes RUN/audit/audit.json")
    audit.add_argument("run", help="run directory made with --audit")
    audit.add_argument("--public-data", default=None, metavar="CSV",
                       help="public rows (the run's columns) the server trains shadow clients on")
    audit.add_argument("--shadow-per-class", type=int, default=2, help="shadow clients per class and round")
    audit.add_argument("--shadow-skew", type=float, default=0.8,
                       help="share of a shadow client's rows from its dominant class")
    sub.add_parser("config-reference", help="print the config reference table (markdown)")
    return parser


def predict_texts(args: argparse.Namespace) -> list[str]:
    """``predict``'s texts: its arguments, or the lines of ``--file``."""
    from .inference import read_texts

    if bool(args.texts) == bool(args.file):
        raise ValueError("predict: give the texts as arguments or --file PATH|- (one text per line), not both"
                         if args.texts else "predict: no text to classify; give texts as arguments or --file PATH|-")
    if args.file:
        return read_texts(args.file)
    check_texts(args.texts)
    return args.texts


def one_line(text: str) -> str:
    """``text`` on one line of plain ``predict`` output: backslash, tab (the column separator), newlines and other
    characters that are not printable escaped as in Python (``\\n``, ``\\t``, ``\\u2028``)."""
    escaped = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
    return "".join(escaped.get(c) or (c if c.isprintable() else c.encode("unicode_escape").decode("ascii"))
                   for c in text)


def check_texts(texts: Sequence[str]) -> None:
    """``predict`` arguments must be text: bytes that are not UTF-8 reach Python as lone surrogates."""
    for i, text in enumerate(texts, 1):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"predict: text argument {i} is not valid UTF-8") from None


def seed_list(text: str) -> list[int]:
    """``--seeds 0,1,2``; argparse turns the error into one line naming the flag."""
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("expected at least one seed")
    return seeds


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "config-reference":
        print(config_reference())
        return 0
    from . import api  # heavy imports only when needed (flwr's logger sets its level on import: first)
    level = logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    logging.basicConfig(level=level, format=api.LOG_FORMAT, datefmt=api.LOG_DATE_FORMAT)  # timestamps
    flower_log = logging.getLogger("flwr")  # Flower prints its records with its own handler: not twice
    flower_log.propagate = False
    flower_log.setLevel(level)
    if not sys.stderr.isatty():  # no ANSI colour codes in redirected logs
        from flwr.common.logger import update_console_handler

        update_console_handler(colored=False)
    from .health import HealthError
    from .inference import RunModel, check_export_target
    from .launch.deployment import DeploymentError
    from .server import RoundFailed

    try:
        if args.command in ("predict", "export"):
            if args.command == "export":
                check_export_target(args.out)
            else:
                texts = predict_texts(args)
            run_model = RunModel(args.run, args.client, use_private=not args.global_only)
            if args.command == "export":
                print(run_model.export(args.out, format=args.format))
                return 0
            for p in run_model.predict(texts):
                if args.json:
                    print(json.dumps(p.__dict__))
                else:
                    print(f"{p.class_name}\t{max(p.probabilities):.3f}\t{one_line(p.text)}")
            return 0
        if args.command == "flower-app":
            from .launch.app_dir import write_app_dir

            print(write_app_dir(args.dir))
            return 0
        if args.command == "compare":
            from .compare import compare

            method_configs = {}
            for item in args.method_config:
                method, _, path = item.partition("=")
                if not path:
                    raise ConfigError(f"--method-config {item!r}: expected METHOD=PATH")
                method_configs[method.strip()] = path.strip()
            results = compare([m.strip() for m in args.methods.split(",") if m.strip()],
                              args.seeds, args.out,
                              config_overrides(args), args.config, command=_command(argv),
                              progress=not args.quiet, method_configs=method_configs,
                              allow_incomplete=args.allow_incomplete)
            print(f"{args.out}/report.md")
            print(json.dumps({m: {k: v["mean"] for k, v in a.items() if isinstance(v, dict)}
                              for m, a in results["by_method"].items()}, indent=2))
            return 0
        if args.command == "bench":
            from .bench import bench, table

            print(table(bench(args.out, backbone=args.backbone, steps=args.steps, data_dir=args.data_dir)))
            return 0
        if args.command == "bench-engines":
            from .bench_engines import bench_engines
            from .bench_engines import table as engines_table

            print(engines_table(bench_engines(args.out, backbone=args.backbone, rounds=args.rounds,
                                              data_dir=args.data_dir)))
            return 0
        if args.command == "bench-scale":
            from .bench_scale import bench_scale
            from .bench_scale import table as scale_table

            print(scale_table(bench_scale(args.out, tuple(args.backbone.split(",")), tuple(args.engines.split(",")),
                                          args.rows_per_client, data_dir=args.data_dir)))
            return 0
        if args.command == "tune":
            from .tune import tune as run_study

            search = [k.strip() for k in args.search.split(",") if k.strip()] if args.search else None
            result = run_study(args.out, args.trials, args.config, config_overrides(args), maximize=args.maximize,
                               search=search, progress=not args.quiet, command=_command(argv),
                               timeout=args.timeout, seeds=args.seeds, rescore=args.rescore,
                               rescore_seeds=args.rescore_seeds)
            print(f"{args.out}/report.md")
            print(json.dumps(result, indent=2))
            return 0
        if args.command == "audit":
            from .audit import audit as run_audit
            from .audit import table as audit_table

            print(audit_table(run_audit(args.run, args.public_data, args.shadow_per_class, args.shadow_skew)))
            return 0
        if args.command == "kstep":
            if args.match_compute is not None and args.lr is None:  # recorded in the run's summary.json
                print(json.dumps(api.equal_compute_kstep(args.run, args.match_compute), indent=2))
                return 0
            steps = args.steps if args.match_compute is None else api.equal_compute_steps(args.run, args.match_compute)
            print(json.dumps(api.kstep(args.run, steps, args.lr, allow_test=args.allow_test), indent=2))
            return 0
        if args.command == "report":
            from .report import build_report, scan_runs

            if args.out is None and len(args.paths) != 1:
                raise ConfigError("report with several paths needs --out")
            out = args.out or args.paths[0]
            runs, skipped = scan_runs(args.paths)
            for line in skipped:
                print(f"fedslip report: skipped {line}", file=sys.stderr)
            build_report(runs, out, args.made_by, allow_incomplete=args.allow_incomplete, skipped=skipped)
            print(f"{out}/report.md")
            return 0
        if args.command == "deploy-local":
            from .experiment import RunDir, RunDirError
            from .launch.deployment import run_local

            if RunDir(Path(args.workdir) / "run").holds_run():
                raise RunDirError(f"{Path(args.workdir) / 'run'} already holds a run; choose another --workdir")
            if args.node_auth and not args.tls:
                raise ConfigError("--node-auth needs --tls (Flower authenticates SuperNodes over TLS only)")
            summary = run_local(make_config(config_overrides(args), args.config), args.workdir, tls=args.tls,
                                node_auth=args.node_auth)
        elif args.resume:
            if args.out or args.config:
                raise ConfigError("--resume continues a run with its own config.toml; pass no --out or --config "
                                  "(flags of run-only keys, such as --no-strict-health, are taken)")
            summary = api.resume(args.resume, progress=not args.quiet, run_only=config_overrides(args))
        else:
            if not args.out:
                raise ConfigError("fedslip run needs --out DIR (or --resume RUN_DIR)")
            cfg = make_config(config_overrides(args), args.config)
            summary = api.run(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    # ConfigError, DataError, BackboneError, RunDirError, StateFileError, ... are ValueErrors
    except (ValueError, RoundFailed, DeploymentError, FileExistsError, FileNotFoundError) as e:
        print(f"fedslip: error: {e}", file=sys.stderr)
        return 2
    except HealthError as e:
        print(f"fedslip: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        out = getattr(args, "resume", None) or getattr(args, "out", None)
        hint = {"run": f"; continue with `fedslip run --resume {out}`" if out else "",
                "tune": "; the same command continues the study"}.get(args.command, "")
        print(f"fedslip: interrupted{hint}", file=sys.stderr)
        return 130
    keys = ("method", "global_accuracy", "personalized_accuracy", "kstep_accuracy", "comm_mib_per_round",
            "private_bytes_transmitted", "wall_seconds")
    print(json.dumps({k: summary.get(k) for k in keys}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
