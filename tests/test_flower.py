"""FedSLIP on Flower: run-config mapping, the private-track guard, and the same federation on the
embedded engine, on Flower's simulation runtime (Ray) and on a real SuperLink/SuperNode deployment."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import signal
import site
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import tomllib
import torch
from conftest import REPO
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from safetensors.torch import load_file

import fedslip
from fedslip import codecs
from fedslip.config import ConfigError
from fedslip.engines.flower import message_bytes, payload_of, payload_records, result_of, result_record
from fedslip.experiment import RunDir
from fedslip.flower_app import (
    PrivateTrackLeak,
    config_from_run_config,
    default_run_config,
    private_guard_mod,
)
from fedslip.health import HealthError
from fedslip.launch.app_dir import app_table, write_app_dir
from fedslip.storage import load_tensors_and_metadata

# numbers that legitimately differ between engines: wall time and the bytes of the carrier's framing
ENGINE_DEPENDENT = {"upload_bytes", "download_bytes", "comm_bytes_per_round", "comm_mib_per_round", "seconds",
                    "wall_seconds"}


def tiny(data_dir, **overrides):
    base = dict(backbone="tiny", data_dir=str(data_dir), rounds=2, num_clients=2, samples_per_client=32,
                test_samples_per_client=16, global_test_samples=64, batch_size=16, kstep=0, precision="fp32")
    return {**base, **overrides}


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b, ignore=()):
    """Same global weights (allclose) and the same metrics, round by round, apart from engine framing (and
    ``ignore``)."""
    ga, gb = load_file(a / "global.safetensors"), load_file(b / "global.safetensors")
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-5, atol=1e-6)
    skip = ENGINE_DEPENDENT | set(ignore)
    for ra, rb in zip(rows(a), rows(b), strict=True):
        assert {k: v for k, v in ra.items() if k not in skip} == {k: v for k, v in rb.items() if k not in skip}
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert {k: v for k, v in sa.items() if k not in skip} == {k: v for k, v in sb.items() if k not in skip}
    assert sb["private_bytes_transmitted"] == 0


# --- run config ------------------------------------------------------------------------------------
def test_pyproject_flower_config_is_in_sync():
    """`python scripts/flower_config.py` regenerates it; every config key is declared (Flower only
    accepts --run-config overrides of declared keys). The checkout's app is the installed package's app
    (`fedslip flower-app`) plus the source it ships."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    app = pyproject["tool"]["flwr"]["app"]
    assert {k: v for k, v in app.items() if k != "fab-include"} == app_table()
    assert app["config"] == default_run_config()
    assert app["fab-include"] == ["fedslip/**/*.py", "pyproject.toml"]


@pytest.mark.flower  # Flower's app builder and loader
def test_flower_app_directory_of_the_installed_package(tmp_path):
    """`fedslip flower-app DIR`: a pyproject.toml that Flower validates, whose components import from the
    installed fedslip, declaring every config key at its default; its FAB holds that file and no source."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import load_and_validate

    out = subprocess.run([sys.executable, "-m", "fedslip.cli", "flower-app", str(tmp_path / "app")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    path = tmp_path / "app" / "pyproject.toml"
    assert out.stdout.strip() == str(path)
    pyproject = tomllib.loads(path.read_text())
    assert pyproject["project"]["dependencies"] == [f"fedslip=={fedslip.__version__}"]
    assert pyproject["tool"]["flwr"]["app"] == app_table()
    cfg, options = config_from_run_config(pyproject["tool"]["flwr"]["app"]["config"])
    assert cfg == fedslip.make_config() and options == {"out": "runs/flower", "overwrite": False, "resume": False}
    load_and_validate(path, check_module=True)  # what `flwr run` checks: both components are importable
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(tmp_path / "app"))) as fab:
        assert sorted(fab.namelist()) == [".info/CONTENT", "pyproject.toml"]
    assert write_app_dir(tmp_path / "app") == path  # rewriting its own file is fine
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "mine"\n')
    for other in (REPO, tmp_path):  # a checkout's pyproject.toml, any other project's
        before = (other / "pyproject.toml").read_text()
        with pytest.raises(FileExistsError, match="not a FedSLIP app directory"):
            write_app_dir(other)
        assert (other / "pyproject.toml").read_text() == before


def test_a_venv_in_the_project_breaks_flwr_run_unless_gitignore_names_it(tmp_path):
    """Flower 1.42 checks the depth of every .py/.toml/.md/... file under the app directory that its root
    .gitignore does not name (`.venv/` it skips itself), before fab-include narrows anything: a virtualenv
    named `venv/` or `env/`, or kept inside `.git/`, breaks `flwr run .` unless .gitignore names it."""
    from flwr.cli.build import build_fab_from_disk

    site_packages = Path("lib/python3.11/site-packages/torch/ao/nn/intrinsic/quantized/dynamic/modules")  # depth 11
    for venv in (".venv", "venv", "env", ".git/venv"):
        app = tmp_path / venv.replace("/", "-")
        (app / "fedslip").mkdir(parents=True)
        (app / "fedslip" / "__init__.py").write_text("")
        (app / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
        (app / venv / site_packages).mkdir(parents=True)
        (app / venv / site_packages / "__init__.py").write_text("")
        if venv != ".venv":
            with pytest.raises(ValueError, match=f"'{venv}/lib/.*exceeds the maximum directory depth"):
                build_fab_from_disk(app)
            (app / ".gitignore").write_text((REPO / ".gitignore").read_text())
        with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))) as fab:
            assert sorted(fab.namelist()) == [".info/CONTENT", "fedslip/__init__.py", "pyproject.toml"]


def test_run_config_maps_onto_the_config_dataclass():
    cfg, options = config_from_run_config(default_run_config())
    # one default method: the Flower app's, the CLI's and the config's are the same
    assert cfg == fedslip.make_config() and cfg.method == "fedslip"  # "preset" leaves the preset's values
    makefile = (REPO / "Makefile").read_text()
    assert "METHOD ?= fedslip" in makefile
    assert options == {"out": "runs/flower", "overwrite": False, "resume": False}
    cfg, _ = config_from_run_config({**default_run_config(), "method": "fedavg_lora", "fedprox-mu": 0.1,
                                     "lora_targets": "query,key"})
    assert (cfg.private_track, cfg.fedprox_mu, cfg.lora_targets) == (False, 0.1, ["query", "key"])
    with pytest.raises(ConfigError, match="unknown config key.*bogus"):
        config_from_run_config({"bogus": 1})
    with pytest.raises(ConfigError, match="rounds"):
        config_from_run_config({"rounds": "many"})


# --- messages --------------------------------------------------------------------------------------
@pytest.fixture
def in_a_run(monkeypatch):
    """Flower creates messages only inside a run (it stamps them with the task's identity)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def test_message_codec_round_trips_and_counts_bytes(in_a_run):
    tensors = {"a.lora_A.global.weight": torch.randn(3, 4), "classifier.weight": torch.randn(2, 4)}
    content = RecordDict({**payload_records(fedslip.comm.encode(tensors)),
                          "result": result_record({"loss": 0.5, "none": None, "flag": True})})
    back = fedslip.comm.decode(payload_of(content))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    packed = codecs.pack(codecs.Codec("topk+int4"), tensors, 2, 3)  # a compressed payload
    (wire, meta), (sent, sent_meta) = fedslip.comm.read(payload_of(RecordDict(payload_records(packed)))), \
        fedslip.comm.read(packed)
    assert meta == sent_meta and wire.keys() == sent.keys()  # tensors and metadata arrive intact
    assert all(wire[k].dtype == sent[k].dtype and torch.equal(wire[k], sent[k]) for k in sent)
    assert result_of(content) == {"loss": 0.5, "none": None, "flag": True}
    message = Message(content, dst_node_id=1, message_type="train")
    payload = fedslip.comm.encode(tensors)  # what the embedded engine counts for the same tensors
    assert len(payload) < message_bytes(message) <= len(payload) + 1024  # the tensors plus Flower's framing


def test_private_guard_refuses_replies_with_private_tensors(in_a_run):
    msg = Message(RecordDict({"config": ConfigRecord({"op": "x"})}), dst_node_id=1, message_type="query")

    def reply_with(names):
        return lambda m, ctx: Message(RecordDict({"arrays": ArrayRecord({n: torch.zeros(2) for n in names})}),
                                      reply_to=m)

    ok = private_guard_mod(msg, None, reply_with(["x.lora_A.global.weight"]))
    assert "arrays" in ok.content.array_records
    with pytest.raises(PrivateTrackLeak, match="lora_A.private"):
        private_guard_mod(msg, None, reply_with(["x.lora_A.global.weight", "x.lora_A.private.weight"]))
    # partial sharing: a local part of the global adapter is refused too
    head = "classifier.modules_to_save.global.weight"
    assert "arrays" in private_guard_mod(msg, None, reply_with([head]), ()).content.array_records
    with pytest.raises(PrivateTrackLeak, match="modules_to_save"):
        private_guard_mod(msg, None, reply_with(["x.lora_A.global.weight", head]), ["head"])
    with pytest.raises(PrivateTrackLeak, match="lora_B"):
        private_guard_mod(msg, None, reply_with(["x.lora_B.global.weight"]), ["lora_B"])


# --- simulation ------------------------------------------------------------------------------------
@pytest.mark.flower
@pytest.mark.parametrize("method, codecs_used", [
    ("fedavg_lora", {}), ("fedslip", {}), ("fedslip", {"upload_codec": "topk+int8", "download_codec": "int4"}),
    ("fedper", {}), ("fedrep", {}), ("fedbabu", {}), ("fedsa_lora", {}), ("ditto", {}), ("feddpa_fixed", {})],
    ids=["fedavg_lora", "fedslip", "fedslip-compressed", "fedper", "fedrep", "fedbabu", "fedsa_lora", "ditto",
         "feddpa_fixed"])
def test_flower_simulation_equals_embedded_engine(tmp_path, data_dir, method, codecs_used):
    cfg = tiny(data_dir, method=method, kstep=2, **codecs_used)
    fedslip.run(fedslip.make_config(cfg), tmp_path / "embedded", progress=False)
    summary = fedslip.run(fedslip.make_config({**cfg, "engine": "flower-sim"}), tmp_path / "sim", progress=False)
    assert_same_run(tmp_path / "embedded", tmp_path / "sim")
    assert summary["kstep_accuracy"] is not None
    # Ray's temp dir (its session logs and sockets) is inside the run directory
    assert list((tmp_path / "sim" / ".ray").glob("**/session_*/logs"))
    # bytes come from Flower's messages: the payloads' tensors plus Flower's framing around each message
    # (names, dtypes and shapes of its arrays, the config or result record: measured 200-820 bytes on the tiny
    # backbone, more than the payload's own safetensors header), so more than the embedded count, never less
    emb, sim = rows(tmp_path / "embedded"), rows(tmp_path / "sim")
    for e, s in zip(emb, sim, strict=True):
        framing = 1024 * len(e["participants"])
        assert e["upload_bytes"] < s["upload_bytes"] <= e["upload_bytes"] + framing
        assert e["download_bytes"] < s["download_bytes"] <= e["download_bytes"] + framing



@pytest.mark.flower
def test_a_stopped_run_resumes_on_flower_simulation(tmp_path, data_dir, monkeypatch):
    """`fedslip.resume` of a run whose config says engine = "flower-sim" continues it on Flower (the ServerApp
    restores the checkpoint, the ClientApps the clients' private tracks) and ends equal to an uninterrupted run."""
    from fedslip.client import Client
    from fedslip.server import RoundFailed

    cfg = tiny(data_dir, method="fedslip", rounds=3, min_fit_clients=2)
    reference = embedded_reference(tmp_path, cfg)
    original = Client.fit

    def fit(self, payload, round_idx):  # a client fails in round 2: the round is not applied, the run stops
        if round_idx == 2 and self.cid == 1:
            raise RuntimeError("transient failure")
        return original(self, payload, round_idx)

    monkeypatch.setattr(Client, "fit", fit)
    out = tmp_path / "run"
    with pytest.raises(RoundFailed):
        fedslip.run(fedslip.make_config(cfg), out, progress=False)
    monkeypatch.setattr(Client, "fit", original)
    assert [r["round"] for r in rows(out)] == [1]
    fedslip.make_config({**cfg, "engine": "flower-sim"}).save(out / "config.toml")  # continue on Flower
    summary = fedslip.resume(out, progress=False)
    assert summary["rounds"] == 3 and [r["round"] for r in rows(out)] == [1, 2, 3]
    assert list((out / ".ray").glob("**/session_*/logs"))  # rounds 2 and 3 ran on Flower's simulation runtime
    assert_same_run(reference, out)


# --- deployment --------------------------------------------------------------------------------------
def embedded_reference(tmp_path, cfg):
    out = tmp_path / "embedded"
    fedslip.run(fedslip.make_config(cfg), out, progress=False)
    return out


def check_private_state_only_on_nodes(fed, out, num_clients, rounds):
    assert not (out / "clients").exists()  # the server side never held private state
    for cid in range(num_clients):
        weights, meta = load_tensors_and_metadata(fed.state_dir(cid) / "private.safetensors")
        assert int(meta["round"]) == rounds and all(".private." in n for n in weights)


@pytest.mark.flower
def test_deployment_superlink_and_supernodes(tmp_path, data_dir):
    from fedslip.launch.deployment import LocalDeployment

    cfg = tiny(data_dir, method="fedslip")
    reference = embedded_reference(tmp_path, cfg)
    fed = LocalDeployment(tmp_path / "deploy", num_nodes=2)
    with fed:
        summary = fed.run({**cfg, "out": str(tmp_path / "deploy" / "run")}, timeout=900)
        processes = [fed.superlink, *fed.nodes.values()]
    assert all(p.poll() is not None for p in processes)  # every process we started has ended
    out = tmp_path / "deploy" / "run"
    assert summary["rounds"] == 2 and summary["private_bytes_transmitted"] == 0
    assert_same_run(reference, out)
    check_private_state_only_on_nodes(fed, out, 2, 2)
    # the private weights on the nodes are exactly the embedded run's
    for cid in range(2):
        node = load_file(fed.state_dir(cid) / "private.safetensors")
        local = load_file(reference / "clients" / str(cid) / "private.safetensors")
        for name in local:
            torch.testing.assert_close(node[name], local[name], rtol=1e-5, atol=1e-6)


@pytest.mark.flower
def test_deployment_with_tls_and_node_auth_equals_the_embedded_run(tmp_path, data_dir):
    from fedslip.launch.deployment import LocalDeployment

    cfg = tiny(data_dir, method="fedslip")
    reference = embedded_reference(tmp_path, cfg)
    with LocalDeployment(tmp_path / "deploy", num_nodes=2, tls=True, node_auth=True) as fed:
        fed.run({**cfg, "out": str(tmp_path / "deploy" / "run")}, timeout=900)
    logs = tmp_path / "deploy" / "logs"
    assert "Uvicorn running on https://" in (logs / "superlink.log").read_text()
    assert sorted(p.name for p in (tmp_path / "deploy" / "keys").iterdir()) == [
        "supernode-0.key", "supernode-0.pub", "supernode-1.key", "supernode-1.pub"]
    assert_same_run(reference, tmp_path / "deploy" / "run")


@pytest.mark.flower
def test_node_auth_refuses_an_unregistered_supernode_and_the_run_goes_on_without_it(tmp_path, data_dir):
    from fedslip.launch.deployment import DeploymentError, LocalDeployment

    cfg = tiny(data_dir, method="fedslip", min_fit_clients=1, rejoin_timeout=5.0)
    fed = LocalDeployment(tmp_path / "deploy", num_nodes=2, tls=True, node_auth=True)
    try:
        fed.start(nodes=[0])
        with pytest.raises(DeploymentError, match="Failed to activate SuperNode"):
            fed.start_node(1, register=False)  # TLS fine, key unknown to the SuperLink
        with pytest.raises(DeploymentError, match="CERTIFICATE_VERIFY_FAILED"):
            fed.start_node(1, trust_ca=False)  # a client that does not trust the deployment's CA
        summary = fed.run({**cfg, "out": str(tmp_path / "deploy" / "run")}, timeout=900)
    finally:
        fed.close()
    assert summary["personalized_accuracy_per_client"][0] is not None
    assert summary["personalized_accuracy_per_client"][1] is None and summary["complete"] is False
    assert {(f["round"], f["client"], f["stage"]) for f in summary["client_failures"]} == {
        (r, 1, stage) for r in (1, 2) for stage in ("fit", "evaluate")}


@pytest.mark.flower
def test_flwr_run_on_a_simulation_superlink(tmp_path, data_dir):
    """`flwr run . <connection> --federation-config "num-supernodes=2 ..."` on `flower-superlink --simulation`,
    from a checkout: its pyproject.toml's app, whose FAB ships the source."""
    from fedslip.launch.deployment import LocalDeployment

    cfg = tiny(data_dir, method="fedslip", kstep=2, eval_fraction=0.5)  # one client evaluated after round 1
    reference = embedded_reference(tmp_path, cfg)
    with LocalDeployment(tmp_path / "sim", num_nodes=2, simulation=True, app_dir=REPO) as fed:
        fed.run({**cfg, "out": str(tmp_path / "sim" / "run")}, timeout=900)
        assert fed.nodes == {}  # Ray played the SuperNodes
    assert_same_run(reference, tmp_path / "sim" / "run")
    assert list((tmp_path / "sim" / ".ray").glob("**/session_*/logs"))


@pytest.mark.flower
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_supernode_restart_between_rounds_keeps_private_track(tmp_path, data_dir, how):
    """SIGTERM: the SuperNode deregisters; SIGKILL: it vanishes and the SuperLink keeps listing its old node id
    until Flower's heartbeat patience runs out. Either way the restarted node is found by its partition-id."""
    from fedslip.launch.deployment import LocalDeployment

    cfg = tiny(data_dir, method="fedslip", rounds=3)
    reference = embedded_reference(tmp_path, cfg)
    out = tmp_path / "deploy" / "run"
    stop, restarts = threading.Event(), []
    fed = LocalDeployment(tmp_path / "deploy", num_nodes=2)

    def restart_after_round_one():
        while not stop.is_set():
            if (out / "metrics.jsonl").is_file() and rows(out):
                old = fed.nodes[1].pid
                fed.stop_node(1, getattr(signal, how))
                fed.start_node(1)
                restarts.append((old, fed.nodes[1].pid, len(rows(out))))
                return
            time.sleep(0.2)

    with fed:
        watcher = threading.Thread(target=restart_after_round_one, daemon=True)
        watcher.start()
        try:
            summary = fed.run({**cfg, "out": str(out)}, timeout=900)
        finally:
            stop.set()
            watcher.join(60)
    assert len(restarts) == 1 and restarts[0][0] != restarts[0][1] and restarts[0][2] < 3  # between rounds
    assert summary["rounds"] == 3 and len(rows(out)) == 3
    assert_same_run(reference, out)  # the restarted client's private track carried on intact
    check_private_state_only_on_nodes(fed, out, 2, 3)


# --- from an installed wheel ---------------------------------------------------------------------------
def login_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh login, not this process's: earlier tests and Ray may have extended it (a
    PYTHONPATH reaching the checkout makes pip take the checkout's fedslip as already installed)."""
    return {**{k: os.environ[k] for k in ("HOME", "LANG", "TMPDIR", "USER", "PATH") if k in os.environ}, **extra}


def build_wheel(dist):
    """The package's wheel, built offline from a copy of its sources (the checkout gets no build/ or egg-info)."""
    src = dist.parent / "src"
    shutil.copytree(REPO / "fedslip", src / "fedslip", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", *isolation, "-q", "-w",
                    str(dist), str(src)], check=True, env=login_env())
    return next(dist.glob("fedslip-*.whl"))


def fresh_venv(root, wheel):
    """A venv without system site-packages with the wheel pip-installed. Its dependencies: with
    FEDSLIP_WHEELHOUSE=DIR (`pip download -d DIR <wheel>`, ~600 MB) pip installs them from DIR (about 4
    minutes); otherwise this environment's site-packages are appended to the venv's sys.path by a .pth file,
    which imports no editable fedslip (a path in a .pth is not scanned for further .pth files), and Flower's
    console scripts are written into the venv's bin/ with its own python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, env=login_env())
    python = root / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index"]
    wheelhouse = os.environ.get("FEDSLIP_WHEELHOUSE")
    if wheelhouse:
        subprocess.run([*pip, "--find-links", wheelhouse, str(wheel)], check=True, env=login_env())
        return python
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True, env=login_env())
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    for ep in importlib.metadata.distribution("flwr").entry_points.select(group="console_scripts"):
        script = python.parent / ep.name  # what pip writes for a console script
        script.write_text(f"#!{python}\nimport sys\nfrom {ep.module} import {ep.attr.split('.')[0]}\n"
                          f"sys.exit({ep.attr}())\n")
        script.chmod(0o755)
    return python


@pytest.mark.flower
def test_deploy_local_from_a_wheel_installed_in_a_fresh_venv(tmp_path, data_dir):
    """`pip install fedslip-*.whl` in a venv that cannot see the checkout, then `fedslip deploy-local` from a
    directory outside it: SuperLink, SuperNodes, ServerApp and ClientApps all run the wheel's fedslip, the FAB
    carries no source, and the run equals the embedded engine's."""
    python = fresh_venv(tmp_path / "venv", build_wheel(tmp_path / "dist"))
    bin_dir = python.parent
    env = login_env()
    env.update(PATH=os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"]), HF_HUB_OFFLINE="1",
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_HOME=str(tmp_path / ".flwr"))
    work = tmp_path / "work"
    work.mkdir()
    found = subprocess.run([str(python), "-c", "import fedslip.flower_app; print(fedslip.__file__)"], env=env,
                           cwd=work, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    where = found.stdout.strip()
    assert Path(where).is_relative_to(tmp_path / "venv") and not Path(where).is_relative_to(REPO)
    for name in ("fedslip", "flwr", "flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp",
                 "flwr-clientapp"):  # what deploy-local and Flower start: the venv's, with the venv's python
        assert shutil.which(name, path=env["PATH"]) == str(bin_dir / name)
        assert (bin_dir / name).read_text().splitlines()[0] == f"#!{python}"

    cfg = tiny(data_dir, method="fedslip", rounds=1)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items()]
    done = subprocess.run([str(bin_dir / "fedslip"), "deploy-local", "--workdir", "deploy", *flags], env=env,
                          cwd=work, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["method"] == "fedslip"
    deploy = work / "deploy"
    installed = list((deploy / ".flwr" / "apps").iterdir())  # the FAB as the SuperNodes and ServerApp unpacked it
    assert installed and all(sorted(p.name for p in app.iterdir()) == ["pyproject.toml"] for app in installed)
    # a wheelhouse may hold other releases of the dependencies than this environment (recorded in "versions")
    assert_same_run(embedded_reference(tmp_path, cfg), deploy / "run",
                    ignore={"versions"} if os.environ.get("FEDSLIP_WHEELHOUSE") else ())


@pytest.mark.flower
def test_bench_engines_runs_and_writes_well_formed_output(tmp_path, data_dir):
    from fedslip.bench_engines import bench_engines, table

    results = bench_engines(tmp_path, rounds=2, data_dir=str(data_dir), engines=("flower-sim",))
    saved = json.loads((tmp_path / "bench_engines.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert list(saved["engines"]) == ["embedded", "flower-sim"]
    for r in saved["engines"].values():
        assert len(r["round_seconds"]) == 2 and r["total_seconds_incl_startup"] > 0 and r["bytes_per_round"] > 0
    assert saved["engines"]["embedded"]["overhead_vs_embedded_seconds"] == 0
    assert saved["engines"]["embedded"]["global_accuracy"] == saved["engines"]["flower-sim"]["global_accuracy"]
    assert "| flower-sim |" in table(results)


def test_flower_sim_refuses_bad_data_before_starting_ray(tmp_path, data_dir):
    from fedslip.data import DataError

    cfg = fedslip.make_config({**tiny(data_dir), "engine": "flower-sim", "data_dir": str(tmp_path / "missing")})
    with pytest.raises(DataError, match="missing"):
        fedslip.run(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.flower
def test_strict_health_stops_a_flower_simulation_with_the_health_error(tmp_path, data_dir):
    cfg = fedslip.make_config({**tiny(data_dir, method="fedavg_lora"), "engine": "flower-sim", "lr": 1e-9,
                               "strict_health": True})
    with pytest.raises(HealthError, match=r"round 2 failed its health checks \(strict_health\): global_at_chance"):
        fedslip.run(cfg, tmp_path / "sim", progress=False)
    assert RunDir(tmp_path / "sim").load_checkpoint().round == 2
