"""Bad inputs, one line each (issue 19): every case is a CLI call that must end with exit code 2 and one
``error:`` line naming the problem, before anything is written — a finished run already in ``--out``
stays byte-identical even with ``--overwrite``.

A new case is one row in ``CASES``: (id, argv after ``fedslip``, text the error line must contain).
``{out}``, ``{data}``, ``{tmp}`` are filled in per test (``{tmp}`` in the text too); ``--backbone tiny`` keeps the
model loads fast.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from fedslip import make_config
from fedslip.cli import main
from fedslip.model import embedded_model_dir

TINY = "--backbone tiny --rounds 1 --num-clients 2 --samples-per-client 32 --test-samples-per-client 16 --kstep 0"
RUN = f"run --out {{out}} --overwrite --data-dir {{data}} {TINY}"

CASES = [
    ("weight-decay-nan", f"{RUN} --weight-decay nan", "weight_decay must be finite"),
    ("lora-alpha-inf", f"{RUN} --lora-alpha inf", "lora_alpha must be finite"),
    ("lora-dropout-nan", f"{RUN} --lora-dropout nan", "lora_dropout must be finite"),
    ("private-prune-rate-nan", f"{RUN} --method fedslip --private-prune-rate nan", "private_prune_rate must be finite"),
    ("max-seq-len-over-positions", f"{RUN} --max-seq-len 4096", "max_seq_len=4096 exceeds"),
    ("config-is-a-directory", f"{RUN} --config {{tmp}}", "is a directory"),
    ("config-not-utf8", f"{RUN} --config {{tmp}}/latin1.toml", "latin1.toml is not UTF-8"),
    ("corrupt-backbone-weights", f"{RUN.replace('--backbone tiny ', '')} --backbone {{tmp}}/broken_backbone",
     "could not load backbone"),
    ("private-local-steps-interleaved", f"{RUN} --method fedslip --private-phase interleaved "
     "--private-local-steps 4", "private_local_steps needs private_phase='first'"),
    ("out-below-a-file", RUN.replace("{out}", "{tmp}/latin1.toml/run"), "is a file, not a directory"),
    ("export-out-is-a-file", "export --run {out} --client 0 --out {tmp}/latin1.toml", "latin1.toml is a file"),
    ("predict-text-not-utf8", "predict --run {out} --client 0 caf\udce9", "text argument 1 is not valid UTF-8"),
    ("flower-sim-refuses-before-ray", f"{RUN} --engine flower-sim --max-seq-len 4096", "max_seq_len=4096 exceeds"),
    ("private-targets-no-such-module", f"{RUN} --method fedslip --private-targets nosuch",
     "linear modules are: classifier, dense, key, query, value"),
    ("method-not-a-preset", "run --out {out} --method fedsl1p", "invalid choice: 'fedsl1p' (choose from"),
    ("compare-seeds-not-integers", "compare --seeds 0,abc --out {out}", "argument --seeds"),
    ("data-dir-gz-damaged", RUN.replace("{data}", "{tmp}/damaged_data"),
     "train.csv.gz is a damaged gzip file"),
    ("own-file-gz-damaged", f"{RUN} --partition own --client-data {{tmp}}/damaged.csv.gz,{{tmp}}/damaged.csv.gz",
     "damaged.csv.gz is a damaged gzip file"),
    ("kstep-on-a-test-split-run", "kstep --run {out} --steps 5", "was evaluated on the test split"),
    ("resume-with-an-experiment-key", "run --resume {out} --lr 0.1",
     "--resume continues the run's experiment: lr cannot change"),
    ("own-file-is-a-directory", f"{RUN} --partition own --client-data {{tmp}}/damaged_data,{{tmp}}/damaged_data",
     "damaged_data is a directory"),
    ("own-file-label-too-large", f"{RUN} --partition own --client-data {{tmp}}/huge_label.csv,{{tmp}}/huge_label.csv",
     "label 1e300 in data row 2 is outside 0..3"),
    ("own-file-all-texts-empty", f"{RUN} --partition own --client-data {{tmp}}/no_text.csv,{{tmp}}/no_text.csv",
     "every row's text (title, description) is empty"),
    ("tune-trials-not-an-integer", "tune --config {tmp}/tune_trials.toml --out {tmp}/study",
     "[tune] trials must be an integer >= 1, got 'x'"),
    ("tune-seeds-not-a-list", "tune --config {tmp}/tune_seeds.toml --out {tmp}/study",
     "[tune] seeds must be a list of integers"),
    ("tune-search-not-a-key", "tune --search foo --out {tmp}/study", "'foo' is not a config key; searchable keys: lr,"),
    ("tune-space-not-a-key", "tune --config {tmp}/tune_space.toml --out {tmp}/study",
     "'foo' is not a config key; searchable keys: lr,"),
    ("audit-missing-path", "audit {tmp}/missing", "missing is not a run directory: it does not exist (a run directory"),
    ("audit-a-file", "audit {tmp}/latin1.toml", "latin1.toml is not a run directory: it is a file"),
    ("audit-unrelated-directory", "audit {tmp}/damaged_data", "damaged_data is not a run directory: it holds no "
     "config.toml"),
    ("run-audit-on-own-data", f"{RUN} --audit --partition own --client-data {{tmp}}/a.csv,{{tmp}}/b.csv",
     "with partition='own' the clients bring their own data"),
    ("export-unfinished-run", "export --run {tmp}/unfinished --client 0 --out {tmp}/exported",
     "run not finished in {tmp}/unfinished (no global.safetensors); continue with fedslip run --resume "
     "{tmp}/unfinished"),
    ("predict-unfinished-run", "predict --run {tmp}/unfinished --client 0 hello",
     "run not finished in {tmp}/unfinished (no global.safetensors); continue with fedslip run --resume "
     "{tmp}/unfinished"),
    ("predict-file-missing", "predict --run {out} --client 0 --file {tmp}/texts.txt", "no such file: "),
    ("predict-file-and-texts", "predict --run {out} --client 0 --file {tmp}/latin1.toml hello", "not both"),
    ("predict-jsonl-without-text", "predict --run {out} --client 0 --file {tmp}/notext.jsonl",
     'notext.jsonl line 2: expected a JSON object with a "text" string'),
    ("report-missing-path", "report {tmp}/missing", "no such run directory: {tmp}/missing"),
    ("report-unfinished-run-named", "report {tmp}/unfinished --out {tmp}/report",
     "run not finished in {tmp}/unfinished (no summary.json); continue with fedslip run --resume {tmp}/unfinished"),
    ("upload-codec-not-a-codec", f"{RUN} --upload-codec int3", "argument --upload-codec: invalid choice: 'int3'"),
]


def damage_gzip(csv: Path, target: Path) -> Path:
    """``csv`` gzipped with its deflate stream damaged right after the gzip header: the header is valid, the
    decompressor fails inside the stream (``zlib.error``, not the ``EOFError`` of a truncated file)."""
    packed = bytearray(gzip.compress(csv.read_bytes(), mtime=0))
    for i in range(30, 38):
        packed[i] ^= 0xFF
    target.write_bytes(bytes(packed))
    return target


@pytest.fixture
def inputs(tmp_path, data_dir):
    """A finished-looking run in ``out`` (must survive), a Latin-1 TOML file, a backbone directory whose
    ``model.safetensors`` is garbage."""
    out = tmp_path / "out"
    out.mkdir()
    keep = {"config.toml": "method = 'fedavg_lora'\n", "summary.json": '{"global_accuracy": 0.9}\n',
            "notes.txt": "the user's own file\n"}
    for name, text in keep.items():
        (out / name).write_text(text)
    (tmp_path / "latin1.toml").write_bytes("# caf\xe9\nrounds = 1\n".encode("latin-1"))
    broken = tmp_path / "broken_backbone"
    shutil.copytree(embedded_model_dir(), broken, ignore=shutil.ignore_patterns("model.safetensors", "1_Pooling"))
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "damaged_data").mkdir()
    damage_gzip(data_dir / "train.csv", tmp_path / "damaged_data" / "train.csv.gz")
    shutil.copy(data_dir / "test.csv", tmp_path / "damaged_data" / "test.csv")
    damage_gzip(data_dir / "train.csv", tmp_path / "damaged.csv.gz")
    rows = pd.read_csv(data_dir / "train.csv", keep_default_na=False).head(80)
    rows.assign(label=rows["label"].astype(str).where(rows.index != rows.index[1], "1e300")).to_csv(
        tmp_path / "huge_label.csv", index=False)
    rows.assign(title="", description="").to_csv(tmp_path / "no_text.csv", index=False)
    for name, table in (("trials", '[tune]\ntrials = "x"'), ("seeds", '[tune]\nseeds = "0,1"'),
                        ("space", "[tune.space]\nfoo = [1, 2]")):
        (tmp_path / f"tune_{name}.toml").write_text(f"backbone = 'tiny'\n{table}\n")
    (tmp_path / "notext.jsonl").write_text('{"text": "fine"}\n{"title": "no text field"}\n')
    unfinished = tmp_path / "unfinished"  # an interrupted run: its config and checkpoint, no summary.json
    (unfinished / "checkpoint").mkdir(parents=True)
    make_config(dict(backbone="tiny", num_clients=2, data_dir=str(data_dir))).save(unfinished / "config.toml")
    (unfinished / "metrics.jsonl").write_text('{"round": 1}\n')
    return {"out": out, "data": data_dir, "tmp": tmp_path, "keep": keep}


@pytest.mark.parametrize("argv, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error_and_nothing_is_lost(inputs, capsys, argv, needle):
    args = argv.format(out=inputs["out"], data=inputs["data"], tmp=inputs["tmp"]).split()
    needle = needle.format(tmp=inputs["tmp"])
    try:
        rc = main(args)
    except SystemExit as e:  # argparse's own errors (a flag's value it cannot parse)
        rc = e.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert rc == 2, err
    assert len(errors) == 1 and needle in errors[0], err
    assert "Traceback" not in err
    assert sorted(p.name for p in inputs["out"].iterdir()) == sorted(inputs["keep"])
    for name, text in inputs["keep"].items():
        assert (inputs["out"] / name).read_text() == text


def test_ctrl_c_is_one_line_with_the_resume_command(inputs, capsys, monkeypatch):
    import fedslip.api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fedslip.api, "run", interrupted)
    try:
        rc = main(RUN.format(out=inputs["tmp"] / "new", data=inputs["data"]).split())
    except KeyboardInterrupt:  # escaping, it would stop the whole test session instead of failing here
        pytest.fail("KeyboardInterrupt escaped fedslip.cli.main")
    err = capsys.readouterr().err.strip()
    assert rc == 130 and err == f"fedslip: interrupted; continue with `fedslip run --resume {inputs['tmp'] / 'new'}`"


@pytest.mark.parametrize("argv, prog", [("run --out x --upload-codec int3", "fedslip run"),
                                         ("runn --out x", "fedslip")])
def test_a_flag_argparse_refuses_is_its_error_and_a_help_hint_not_the_usage(capsys, argv, prog):
    """argparse printed the command's whole usage (some 60 lines for ``fedslip run``) above its error line."""
    with pytest.raises(SystemExit) as stop:
        main(argv.split())
    err = capsys.readouterr().err.splitlines()
    assert stop.value.code == 2 and len(err) == 2, err
    assert err[0].startswith(f"{prog}: error: argument ") and "invalid choice" in err[0]
    assert err[1] == f"see {prog} --help"


def test_a_read_only_output_directory_is_refused_before_loading(inputs, capsys, monkeypatch):
    """Root ignores permission bits and a read-only file system cannot be mounted in a test, so the
    kernel's answer (access(W_OK) fails: EACCES / EROFS) is simulated for that directory only."""
    import fedslip.experiment
    import fedslip.rounds

    locked = inputs["tmp"] / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(fedslip.experiment.os, "access",
                        lambda path, mode: False if Path(path) == locked else real_access(path, mode))
    monkeypatch.setattr(fedslip.rounds, "prepare", lambda cfg: pytest.fail("loaded data for a refused --out"))
    rc = main(RUN.format(out=locked / "run", data=inputs["data"]).split())
    assert rc == 2 and f"{locked} is not writable" in capsys.readouterr().err
    assert list(locked.iterdir()) == []


def test_config_toml_records_the_data_directory_it_read(tiny_cfg, data_dir, tmp_path, monkeypatch):
    """Data found through FEDSLIP_DATA_DIR is recorded as that path, so a later --resume without the
    variable reads the same files (it once recorded "" and went to the hub)."""
    import fedslip

    monkeypatch.setenv("FEDSLIP_DATA_DIR", str(data_dir))
    cfg = tiny_cfg(rounds=1, data_dir="", num_clients=2)
    fedslip.run(cfg, tmp_path / "run", progress=False)
    monkeypatch.delenv("FEDSLIP_DATA_DIR")
    assert fedslip.load_config(tmp_path / "run" / "config.toml").data_dir == str(data_dir)


def test_a_relative_data_directory_is_recorded_as_an_absolute_path(tiny_cfg, data_dir, tmp_path, monkeypatch):
    """A run started with data_dir relative to the working directory resumes from anywhere."""
    import fedslip

    monkeypatch.chdir(data_dir.parent)
    fedslip.run(tiny_cfg(rounds=1, data_dir=data_dir.name, num_clients=2), tmp_path / "run", progress=False)
    monkeypatch.chdir(tmp_path)
    assert fedslip.load_config(tmp_path / "run" / "config.toml").data_dir == str(data_dir.resolve())


@pytest.fixture(scope="module")
def audited(tmp_path_factory, data_dir):
    """A finished one-round run recorded for ``fedslip audit`` (4 classes), and public files for its shadow
    attack: a damaged .csv.gz, one lacking class 3 (classes 0-2 only), one of class 0 alone."""
    import fedslip

    root = tmp_path_factory.mktemp("audited")
    cfg = fedslip.make_config(dict(method="fedavg_lora", backbone="tiny", data_dir=str(data_dir), rounds=1,
                                   num_clients=2, samples_per_client=32, test_samples_per_client=16,
                                   global_test_samples=64, batch_size=16, kstep=0, precision="fp32", audit=True))
    fedslip.run(cfg, root / "run", progress=False, log=False)
    train = pd.read_csv(data_dir / "train.csv", keep_default_na=False)
    train[train.label < 3].to_csv(root / "classes012.csv", index=False)
    train[train.label == 0].to_csv(root / "class0.csv", index=False)
    damage_gzip(data_dir / "train.csv", root / "damaged.csv.gz")
    return root


AUDIT_CASES = [
    ("public-gz-damaged", "--public-data {root}/damaged.csv.gz", "damaged.csv.gz is a damaged gzip file"),
    ("public-lacks-class-3", "--public-data {root}/classes012.csv", "has no rows of class 3 (Sci/Tech)"),
    ("public-class-0-only", "--public-data {root}/class0.csv", "has no rows of classes 1 (Sports), 2 (Business), "
     "3 (Sci/Tech)"),
    ("shadow-skew-above-1", "--public-data {root}/classes012.csv --shadow-skew 1.5", "--shadow-skew must be in (0, 1]"),
    ("shadow-skew-negative", "--public-data {root}/classes012.csv --shadow-skew -1", "--shadow-skew must be in (0, 1]"),
    ("shadow-per-class-0", "--public-data {root}/classes012.csv --shadow-per-class 0",
     "--shadow-per-class must be >= 1"),
]


@pytest.mark.parametrize("flags, needle", [c[1:] for c in AUDIT_CASES], ids=[c[0] for c in AUDIT_CASES])
def test_bad_audit_input_is_one_clear_error_and_the_run_is_untouched(audited, capsys, flags, needle):
    run = audited / "run"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    rc = main(["audit", str(run), *flags.format(root=audited).split()])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert rc == 2, err
    assert len(errors) == 1 and needle in errors[0], err
    assert "Traceback" not in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # no audit.json either


def test_compare_method_and_seed_are_its_methods_and_seeds():
    """``compare --method X`` (singular) once set the config key ``method``, which compare replaces with each
    of its methods: the three default methods ran. It is ``--methods X``; ``--seed 3`` is ``--seeds 3``."""
    from fedslip.cli import build_parser, config_overrides

    args = build_parser().parse_args(["compare", "--method", "fedper", "--seed", "3", "--out", "x"])
    assert (args.methods, args.seeds) == ("fedper", [3])
    assert "method" not in config_overrides(args) and "seed" not in config_overrides(args)


def _stopped_by_health(root: Path, data_dir: Path, command: str) -> list[str]:
    """``fedslip run`` (or ``compare``) at lr 1e-9 with --strict-health: round 2 fails its health checks (the
    global track at chance) and the run stops after its checkpoint, exit code 3."""
    args = [command, "--method" if command == "run" else "--methods", "fedavg_lora", "--backbone", "tiny",
            "--data-dir", str(data_dir), "--rounds", "3", "--num-clients", "2", "--samples-per-client", "32",
            "--test-samples-per-client", "16", "--global-test-samples", "64", "--batch-size", "16", "--kstep", "0",
            "--precision", "fp32", "--lr", "1e-9", "--out", str(root), "--quiet"]
    args += ["--seeds", "0"] if command == "compare" else []
    assert main([*args, "--strict-health"]) == 3
    return args


def test_run_only_keys_change_on_resume(tmp_path, data_dir, capsys):
    """``run --resume DIR --no-strict-health`` finishes a run that --strict-health stopped; config.toml then
    records the run-only keys it continued with. Experiment keys are refused (case resume-with-an-experiment-
    key above)."""
    import fedslip

    out = tmp_path / "run"
    _stopped_by_health(out, data_dir, "run")
    assert main(["run", "--resume", str(out), "--no-strict-health", "--quiet"]) == 0, capsys.readouterr().err
    assert fedslip.load_config(out / "config.toml").strict_health is False
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3 and (out / "summary.json").is_file()


def test_compare_resumes_its_runs_with_the_run_only_keys_given(tmp_path, data_dir, capsys):
    """A comparison stopped by --strict-health continues with --no-strict-health (it once resumed with strict
    health on and stopped again, exit code 3)."""
    args = _stopped_by_health(tmp_path / "cmp", data_dir, "compare")
    assert main([*args, "--no-strict-health"]) == 0, capsys.readouterr().err
    assert (tmp_path / "cmp" / "fedavg_lora-seed0" / "summary.json").is_file()
