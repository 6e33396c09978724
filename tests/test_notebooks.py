"""The example notebooks (examples/*.ipynb) run top to bottom on the tiny backbone and show real results.

Each notebook is executed with nbclient in a kernel of this interpreter (the venv's, whatever Jupyter
kernels the machine has), with cwd = examples/ as in Jupyter, on the real AG News copy when there is one
(else a synthetic set of conftest's shape), its runs in a temporary directory. A cell that raises fails the
test.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import nbformat
import pytest
from conftest import REPO, real_data_dir, write_agnews_like
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

EXAMPLES = REPO / "examples"
NOTEBOOK_METHODS = {  # notebook -> the methods whose runs it leaves behind
    "01_baseline_fedavg_lora.ipynb": ["fedavg_lora"],
    "02_naive_dual_track.ipynb": ["dual_naive"],
    "03_fedslip.ipynb": ["fedavg_lora", "fedslip"],
}
ACCURACIES = ("global_accuracy", "personalized_accuracy", "kstep_accuracy", "worst_client_personalized_accuracy",
              "personalized_global_test_accuracy")
CELL_TIMEOUT_S = 300  # each notebook takes well under a minute on one free core


def execute(notebook: Path, env: dict[str, str], kernels: Path) -> nbformat.NotebookNode:
    """Run every cell in a kernel of this interpreter; raises CellExecutionError when a cell raises."""
    write_kernel_spec(kernels / "fedslip-test")  # argv = this sys.executable
    km = KernelManager(kernel_name="fedslip-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
    nb = nbformat.read(notebook, as_version=4)
    try:
        NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S,
                       resources={"metadata": {"path": str(EXAMPLES)}}).execute(env=env)
    finally:  # nbclient stops only the kernels it started itself
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    return nb


@pytest.fixture(scope="module")
def notebook_data_dir(tmp_path_factory) -> Path:
    """Real AG News, else synthetic rows: enough test rows per class for 4 x 64 client rows + 256 global ones."""
    return real_data_dir() or write_agnews_like(tmp_path_factory.mktemp("agnews"), train_per_class=200,
                                                test_per_class=160)


def is_accuracy(value) -> bool:
    return isinstance(value, float) and not math.isnan(value) and 0.0 <= value <= 1.0


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(NOTEBOOK_METHODS))
def test_notebook_runs_on_the_tiny_backbone_and_shows_its_results(name, notebook_data_dir, tmp_path):
    runs = tmp_path / "runs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FEDSLIP_EXAMPLES_RUNS": str(runs),
           "FEDSLIP_DATA_DIR": str(notebook_data_dir)}
    nb = execute(EXAMPLES / name, env, tmp_path / "kernels")

    finished = {path.parent.name: json.loads(path.read_text()) for path in runs.glob("*/summary.json")}
    assert sorted(s["method"] for s in finished.values()) == sorted(NOTEBOOK_METHODS[name])
    for run, summary in finished.items():
        assert summary["backbone"] == "tiny" and summary["complete"], "the committed switch must say FULL = False"
        for key in ACCURACIES:
            assert is_accuracy(summary[key]), f"{run}: {key} = {summary[key]!r}"
        assert summary["private_bytes_transmitted"] == 0
        assert len((runs / run / "metrics.jsonl").read_text().splitlines()) == summary["rounds"]

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    figures = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(figures) == 1, "one inline figure: accuracy per round and the final accuracies"
    tables = [out["data"]["text/html"] for out in outputs if "text/html" in out.get("data", {})]
    assert any("after K-step" in table for table in tables), "the summary table is displayed"


@pytest.mark.parametrize("name", sorted(NOTEBOOK_METHODS))
def test_notebook_is_committed_without_outputs_and_on_the_tiny_backbone(name):
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    switches = [line for cell in code for line in cell.source.splitlines() if line.startswith("FULL =")]
    assert switches == ["FULL = False"], "one switch, committed as FULL = False"
