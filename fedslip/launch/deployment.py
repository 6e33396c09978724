"""A real Flower deployment on this machine: one ``flower-superlink`` and N ``flower-supernode`` processes
on 127.0.0.1, and ``flwr run`` of the FedSLIP app on it. For demos, tests and as the template of a
multi-machine deployment (docs/flower.md has the commands). The app is ``workdir/app``, written by
``app_dir.write_app_dir``: a ``pyproject.toml`` whose components every process imports from the installed
``fedslip`` (a wheel or a checkout alike); ``app_dir=`` runs another app directory, such as a checkout.

``tls=True``: a throwaway CA and a certificate for 127.0.0.1 are made in ``workdir/certs`` (the
``cryptography`` package); the SuperLink serves TLS, SuperNodes and the ``flwr`` CLI trust that CA.
``node_auth=True`` (needs TLS): each SuperNode gets an EC key pair, its public key is registered with
the SuperLink (``flwr supernode register``), and the SuperLink (``--enable-supernode-auth``) refuses
any SuperNode whose key it does not know.

    summary = run_local(make_config({"method": "fedslip"}), "runs/deploy")   # fedslip deploy-local

    with LocalDeployment(Path("runs/deploy"), num_nodes=4) as fed:        # or step by step
        summary = fed.run({"method": "fedslip", "out": "/abs/run/dir"})

Every process is started here, tracked by PID and stopped on exit (also when something fails). Each
SuperNode gets ``--node-config "partition-id=<i> state-dir=<workdir>/nodes/<i>"``: its private track
lives there and nowhere else; with ``node_data`` also ``data-path=<its file>``: its rows, and no other
node's (``partition = "own"``). Flower's home (``FLWR_HOME``) and all logs stay inside ``workdir``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..config import ExperimentConfig
from ..data import check_own_file
from ..flower_app import as_run_config
from ..storage import read_json
from .app_dir import write_app_dir
from .environment import flower_environment, ray_temp_dir

log = logging.getLogger("fedslip")
CONNECTION = "fedslip-local"


class DeploymentError(RuntimeError):
    """A Flower process failed to start, or the run failed."""


@dataclasses.dataclass(frozen=True)
class Certificates:
    ca: Path
    cert: Path
    key: Path


def _pem_private(key, fmt) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def make_certificates(folder: Path, days: int = 7) -> Certificates:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost signed by it (for loopback
    deployments and tests; a real deployment uses its own PKI)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, public_key, issuer: x509.Name, signer, extension, critical: bool):
        return (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                .issuer_name(issuer).public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days))
                .add_extension(extension, critical=critical).sign(signer, hashes.SHA256()))

    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedslip-local-ca")])
    ca = certificate("fedslip-local-ca", ca_key.public_key(), ca_name, ca_key,
                     x509.BasicConstraints(ca=True, path_length=None), True)
    names = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    server = certificate("localhost", server_key.public_key(), ca_name, ca_key, names, False)
    certs = Certificates(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    certs.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    certs.cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    certs.key.write_bytes(_pem_private(server_key, serialization.PrivateFormat.PKCS8))
    return certs


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """An EC key pair in OpenSSH format (what ``flower-supernode --auth-supernode-private-key`` and
    ``flwr supernode register`` read): (private key, public key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    private.write_bytes(_pem_private(key, serialization.PrivateFormat.OpenSSH))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str, log_path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeploymentError(f"{what} exited with code {proc.returncode}; see {log_path}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise DeploymentError(f"{what} did not open port {port} within {timeout:.0f}s; see {log_path}")


def _wait_connected(proc: subprocess.Popen, what: str, log_path: Path, offset: int = 0,
                    timeout: float = 60.0) -> None:
    """Wait until a SuperNode is accepted by the SuperLink (Flower logs its node id), or fail with the
    reason Flower gives when the process ends instead (TLS handshake, unknown node key, ...)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_bytes()[offset:].decode(errors="replace") if log_path.is_file() else ""
        if "SuperNode ID:" in text:
            return
        if proc.poll() is not None:
            reason = [ln for ln in _plain(text).splitlines() if ln.strip() and not ln.startswith(("INFO", "WARNING"))]
            raise DeploymentError(f"{what} was refused or failed (exit code {proc.returncode}): "
                                  f"{' '.join(reason[-4:])}; see {log_path}")
        time.sleep(0.2)
    raise DeploymentError(f"{what} did not connect to the SuperLink within {timeout:.0f}s; see {log_path}")


def _plain(text: str) -> str:
    """Log text without ANSI colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _bin(name: str) -> str:
    """A Flower executable next to this Python (the venv), else on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def run_config_args(values: dict[str, Any]) -> str:
    """``--run-config`` string (TOML values) for ``flwr run``."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


class LocalDeployment:
    """SuperLink + SuperNodes as local processes; ``run`` submits the app with ``flwr run`` and waits."""

    def __init__(self, workdir: Path, num_nodes: int, app_dir: Path | None = None, simulation: bool = False,
                 client_cpus: int = 1, tls: bool = False, node_auth: bool = False,
                 node_data: dict[int, Path] | None = None):
        """``simulation=True``: a ``flower-superlink --simulation`` whose Ray runtime plays the
        ``num_nodes`` SuperNodes (``client_cpus`` cores each); no SuperNode processes. ``tls`` /
        ``node_auth``: see the module docstring. ``node_data``: each SuperNode's own data file (node
        config ``data-path``, for runs with ``partition = "own"``). ``app_dir``: the Flower app to run
        (default: ``workdir/app``, written on ``start``)."""
        if node_data and simulation:
            raise DeploymentError("node_data names SuperNodes' files; the simulation has no SuperNodes "
                                  "(use client_data in the run config)")
        if node_auth and not tls:
            raise DeploymentError("node_auth needs tls (Flower authenticates SuperNodes over TLS only)")
        self.tls, self.node_auth = tls, node_auth
        self.certs: Certificates | None = None
        self.workdir = Path(workdir).resolve()
        self.num_nodes, self.app_dir = num_nodes, Path(app_dir or self.workdir / "app")
        self._write_app = app_dir is None
        self.simulation, self.client_cpus = simulation, client_cpus
        # the SuperLink and SuperNodes start flower-superexec / flwr-serverapp / flwr-clientapp from PATH
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.env = {**os.environ, **flower_environment(self.workdir), "PATH": path}
        if self.env.get("FEDSLIP_DATA_DIR"):  # Flower's processes run in workdir
            self.env["FEDSLIP_DATA_DIR"] = str(Path(self.env["FEDSLIP_DATA_DIR"]).resolve())
        self._cleanup = contextlib.ExitStack()
        self.port = _free_port()  # the SuperLink serves its Fleet, Control and Runtime APIs on one HTTP port
        self.superlink: subprocess.Popen | None = None
        self.nodes: dict[int, subprocess.Popen] = {}
        self.node_ports = {i: _free_port() for i in range(num_nodes)}
        self.node_data = {cid: Path(path).resolve() for cid, path in (node_data or {}).items()}

    def state_dir(self, cid: int) -> Path:
        return self.workdir / "nodes" / str(cid)

    # --- processes ----------------------------------------------------------------------------
    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        log_path = self.workdir / "logs" / log_name
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir,
                                    start_new_session=True)

    def start(self, nodes: list[int] | None = None) -> LocalDeployment:
        """Start the SuperLink, then the SuperNodes ``nodes`` (default: all)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._write_app:
            write_app_dir(self.app_dir)
        if self.simulation:  # Ray's temp dir inside the workdir (Ray reads RAY_TMPDIR)
            self.env["RAY_TMPDIR"] = self._cleanup.enter_context(ray_temp_dir(self.workdir / ".ray"))
        if self.tls:
            self.certs = make_certificates(self.workdir / "certs")
            security = ["--ssl-ca-certfile", str(self.certs.ca), "--ssl-certfile", str(self.certs.cert),
                        "--ssl-keyfile", str(self.certs.key), *(["--enable-supernode-auth"] if self.node_auth else [])]
        else:
            security = ["--insecure"]
        self._write_flower_config()
        self.superlink = self._spawn([_bin("flower-superlink"), *security, "--host", "127.0.0.1",
                                      "--port", str(self.port), "--disable-runtime-dependency-installation",
                                      *(["--simulation"] if self.simulation else [])], "superlink.log")
        _wait_port(self.port, self.superlink, "flower-superlink", self.workdir / "logs" / "superlink.log")
        if not self.simulation:
            for cid in range(self.num_nodes) if nodes is None else nodes:
                self.start_node(cid)
        return self

    def start_node(self, cid: int, register: bool = True, trust_ca: bool = True) -> None:
        """Start (or restart) the SuperNode of client ``cid`` with its state directory, and wait until
        the SuperLink accepted it. With node authentication its key pair is made (once) and, unless
        ``register=False``, registered. ``register=False`` / ``trust_ca=False`` start a node the
        SuperLink must refuse (to check that it does): ``DeploymentError`` with Flower's reason."""
        self.state_dir(cid).mkdir(parents=True, exist_ok=True)
        node_config = f'partition-id={cid} num-partitions={self.num_nodes} state-dir="{self.state_dir(cid)}"'
        if cid in self.node_data:
            node_config += f' data-path="{self.node_data[cid]}"'
        security = ["--insecure"]
        if self.tls:
            security = ["--root-certificates", str(self.certs.ca)] if trust_ca else []
        if self.node_auth:
            private = self.workdir / "keys" / f"supernode-{cid}.key"
            if not private.is_file():
                private, public = make_node_key(self.workdir / "keys", f"supernode-{cid}")
                if register:
                    self._flwr(["supernode", "register", str(public), CONNECTION], "register the key of "
                               f"SuperNode {cid}")
            security += ["--auth-supernode-private-key", str(private)]
        log_path = self.workdir / "logs" / f"supernode-{cid}.log"
        offset = log_path.stat().st_size if log_path.is_file() else 0  # a restart appends to the same log
        self.nodes[cid] = self._spawn([_bin("flower-supernode"), *security, "--superlink", f"127.0.0.1:{self.port}",
                                       "--port", str(self.node_ports[cid]), "--node-config", node_config],
                                      log_path.name)
        _wait_connected(self.nodes[cid], f"flower-supernode {cid}", log_path, offset)

    def _flwr(self, args: list[str], what: str) -> str:
        done = subprocess.run([_bin("flwr"), *args], env=self.env, cwd=self.workdir, capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise DeploymentError(f"could not {what}: flwr {' '.join(args)} exited with {done.returncode}: "
                                  f"{done.stdout}{done.stderr}")
        return done.stdout

    def stop_node(self, cid: int, sig: int = signal.SIGTERM) -> None:
        _stop(self.nodes.pop(cid), sig)

    def close(self) -> None:
        for cid in list(self.nodes):
            self.stop_node(cid)
        if self.superlink is not None:
            _stop(self.superlink, signal.SIGTERM)
            self.superlink = None
        self._cleanup.close()

    def __enter__(self) -> LocalDeployment:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    # --- runs ----------------------------------------------------------------------------------
    def _write_flower_config(self) -> None:
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        security = f'root-certificates = "{self.certs.ca}"' if self.tls else "insecure = true"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\n{security}\n')

    def submit(self, run_config: dict[str, Any]) -> int:
        """``flwr run <app> fedslip-local --run-config ...``; returns the run id."""
        args = [_bin("flwr"), "run", str(self.app_dir), CONNECTION, "--format", "json"]
        if run_config:
            args += ["--run-config", run_config_args(run_config)]
        if self.simulation:
            args += ["--federation-config", f"num-supernodes={self.num_nodes} "
                     f"client-resources-num-cpus={self.client_cpus}"]
        done = subprocess.run(args, env=self.env, cwd=self.workdir, capture_output=True, text=True, timeout=120)
        try:
            return int(json.loads(done.stdout)["run-id"])
        except (ValueError, KeyError, TypeError):
            raise DeploymentError(f"flwr run failed (code {done.returncode}): {done.stdout}{done.stderr}") from None

    def status(self, run_id: int) -> str:
        done = subprocess.run([_bin("flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
                              env=self.env, cwd=self.workdir, capture_output=True, text=True, timeout=60)
        try:
            return str(json.loads(done.stdout)["runs"][0]["status"])
        except (ValueError, KeyError, IndexError, TypeError):
            return "unknown"

    def run(self, run_config: dict[str, Any], timeout: float = 1800.0, poll_s: float = 2.0) -> dict:
        """Submit the FedSLIP app and wait for ``<out>/summary.json``; returns the summary."""
        out = Path(run_config.get("out", "runs/flower"))
        out = out if out.is_absolute() else self.workdir / out
        run_config = {**run_config, "out": str(out)}
        run_id = self.submit(run_config)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (out / "summary.json").is_file():
                self.save_run_log(run_id)
                return read_json(out / "summary.json")
            status = self.status(run_id)
            if status.startswith("finished") and not (out / "summary.json").is_file():
                log_path = self.save_run_log(run_id)
                raise DeploymentError(f"run {run_id} ended ({status}) without {out / 'summary.json'}; "
                                      f"the ServerApp's log is {log_path}")
            time.sleep(poll_s)
        log_path = self.save_run_log(run_id)
        raise DeploymentError(f"run {run_id} did not finish within {timeout:.0f}s; the ServerApp's log is {log_path}")

    def save_run_log(self, run_id: int) -> Path:
        """The run's ServerApp log (``flwr log --show``) into ``logs/run-<id>.log``."""
        done = subprocess.run([_bin("flwr"), "log", str(run_id), CONNECTION, "--show"], env=self.env,
                              cwd=self.workdir, capture_output=True, text=True, timeout=60)
        path = self.workdir / "logs" / f"run-{run_id}.log"
        path.write_text(done.stdout + done.stderr)
        return path


def flower_run_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """A resolved config as Flower run-config values (lists comma-separated; the data directory absolute,
    since Flower's processes run in other directories)."""
    values = as_run_config(cfg.to_dict())
    if cfg.resolved_data_dir():
        values["data_dir"] = str(Path(cfg.resolved_data_dir()).resolve())
    return values


def run_local(cfg: ExperimentConfig, workdir: str | Path, timeout: float = 24 * 3600.0, tls: bool = False,
              node_auth: bool = False) -> dict:
    """Run ``cfg`` on a SuperLink and ``cfg.num_clients`` SuperNodes started on 127.0.0.1 for this call
    (``fedslip deploy-local [--tls] [--node-auth]``). The run directory is ``workdir/run``; node states
    ``workdir/nodes/<id>``; logs ``workdir/logs``; the Flower app ``workdir/app``; certificates and keys
    ``workdir/certs``, ``workdir/keys``. With ``partition = "own"``, SuperNode i gets ``client_data[i]`` as its
    ``data-path`` and the server's run config names no client file. Every process is stopped before this returns."""
    workdir = Path(workdir).resolve()
    node_data = dict(enumerate(cfg.resolved_client_data()))
    for path in node_data.values():  # before any process starts (each SuperNode reads only its own)
        check_own_file(path)
    with LocalDeployment(workdir, cfg.num_clients, tls=tls, node_auth=node_auth, node_data=node_data) as fed:
        run_config = {**flower_run_config(dataclasses.replace(cfg, client_data=[])), "out": str(workdir / "run")}
        return fed.run(run_config, timeout=timeout)


def _stop(proc: subprocess.Popen, sig: int, grace_s: float = 15.0) -> None:
    """Stop a process this module started (by its PID), escalating to SIGKILL after ``grace_s``."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
