"""Shared fixtures: a small synthetic AG-News-shaped data set and tiny-backbone configs."""

from __future__ import annotations

import io
import os
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from subprocess import CompletedProcess

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedslip import make_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEYWORDS = [["war", "minister", "election"], ["match", "team", "coach"], ["stocks", "profit", "market"],
            ["software", "internet", "chip"]]


def write_agnews_like(root: Path, train_per_class: int = 150, test_per_class: int = 60, seed: int = 0) -> Path:
    """Header-format CSVs (``label,title,description``) whose texts carry class keywords."""
    rng = np.random.default_rng(seed)
    filler = ["the", "a", "report", "today", "new", "says", "after", "year", "people", "plan"]
    root.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        rows = []
        for label, words in enumerate(KEYWORDS):
            for _ in range(per_class):
                body = list(rng.choice(filler, 6)) + list(rng.choice(words, 2))
                rng.shuffle(body)
                rows.append((label, f"{rng.choice(words)} news", " ".join(body)))
        frame = pd.DataFrame(rows, columns=["label", "title", "description"]).sample(frac=1, random_state=seed)
        frame.to_csv(root / f"{split}.csv", index=False)
    return root


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return write_agnews_like(tmp_path_factory.mktemp("agnews"))


@pytest.fixture
def tiny_cfg(data_dir):
    """Factory for a fast tiny-backbone config on the synthetic data."""
    def make(**overrides):
        base = dict(method="fedavg_lora", backbone="tiny", data_dir=str(data_dir), rounds=2, samples_per_client=32,
                    test_samples_per_client=16, global_test_samples=64, batch_size=16, kstep=0,
                    precision="fp32")
        return make_config({**base, **overrides})
    return make


def real_data_dir() -> Path | None:
    env = os.environ.get("FEDSLIP_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data" / "ag_news")
    return next((p for p in candidates if (p / "train.csv.gz").is_file() or (p / "train.csv").is_file()), None)


def run_cli(*args) -> CompletedProcess:
    """``fedslip ARGS`` in this process, with its exit code, stdout and stderr as ``subprocess.run`` gives them:
    the CLI's own code path without the interpreter start (seconds per call on this machine). The console
    script itself, and what it logs, is tested by ``test_cli_run_and_errors`` in a real process."""
    from fedslip.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse: --help, usage errors
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
    return CompletedProcess(["fedslip", *map(str, args)], code, out.getvalue(), err.getvalue())


def pytest_collection_modifyitems(items):
    """``slow`` = what needs the real backbone, notebooks, Flower processes or other Python processes (a
    SIGKILL mid-round, a plain script), and the benchmarks: ``make test-fast`` leaves these out, ``make test``
    (CI) runs everything."""
    for item in items:
        if any(item.get_closest_marker(m) for m in ("integration", "flower", "process")):
            item.add_marker(pytest.mark.slow)
