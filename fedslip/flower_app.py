"""FedSLIP as a Flower app: the ``ServerApp`` and ``ClientApp`` that ``pyproject.toml``'s
``[tool.flwr.app.components]`` name, so ``flwr run .`` runs the same experiment as ``fedslip run``.

- ``server_app`` builds the config from the run config (``[tool.flwr.app.config]``: the keys of
  ``ExperimentConfig``, plus ``out`` / ``overwrite`` / ``resume``) and runs ``fedslip.rounds``' round loop
  with a ``FlowerEngine`` on the grid it is given; each round's valid replies are aggregated by a Flower
  strategy (``fedslip.server.make_strategy``: FedAvg, FedMedian or FedTrimmedAvg).
- ``client_app`` answers ``train`` / ``evaluate`` / ``query`` messages by calling ``fedslip.client.Client``
  (the embedded engine's client code). A node's client id is its ``partition-id`` (node config); with
  ``partition = "own"`` its rows are the file its ``data-path`` (node config) names, nothing else; its
  private track lives in ``state-dir`` (node config; default ``<out>/clients/<partition-id>``) and
  never enters a message: ``private_guard_mod`` refuses to send any reply that carries a private tensor.

A run-config value of ``"preset"`` means "let the method preset decide", exactly like leaving the key
out of a TOML config (Flower only accepts overrides of keys the app declares, so every key is declared).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from . import rounds
from .client import Client
from .config import FIELDS, PRESET_KEYS, ConfigError, ExperimentConfig, make_config
from .data import read_own_file
from .engines.flower import (
    CONFIG,
    IDENTIFY,
    KSTEP,
    RESULT,
    FlowerEngine,
    decode_views,
    payload_of,
    payload_records,
    result_record,
)
from .experiment import ClientData, Setup, clients_global_test, own_client_data, prepare
from .model import PRIVATE, local_part
from .tracking import Callback

log = logging.getLogger("fedslip")
PRESET = "preset"
APP_KEYS = {"out": "runs/flower", "overwrite": False, "resume": False}


class PrivateTrackLeak(RuntimeError):
    """A reply about to leave a client carries private-track tensors."""


# --- run config <-> ExperimentConfig -----------------------------------------------------------------
def as_run_config(values: dict[str, Any]) -> dict[str, Any]:
    """Config values as Flower run-config values: scalars only, so lists become comma-separated strings
    (``config_from_run_config`` splits them again)."""
    return {k: ",".join(v) if isinstance(v, list) else v for k, v in values.items()}


def default_run_config() -> dict[str, Any]:
    """``[tool.flwr.app.config]`` as shipped: every config key at its default, the method-preset keys as
    ``"preset"``, then the app keys."""
    defaults = ExperimentConfig().to_dict()
    values = as_run_config({name: PRESET if name in PRESET_KEYS else defaults[name] for name in FIELDS})
    return {**values, **APP_KEYS}


def config_from_run_config(run_config: dict[str, Any]) -> tuple[ExperimentConfig, dict[str, Any]]:
    """The experiment config and the app options (``out``, ``overwrite``, ``resume``) of a Flower run
    config. Keys may use ``-`` or ``_``; unknown keys are an error that names them."""
    values, options = {}, dict(APP_KEYS)
    for key, value in run_config.items():
        name = key.replace("-", "_")
        if name in APP_KEYS:
            options[name] = value
        elif value != PRESET:
            values[name] = value
    for name in ("overwrite", "resume"):
        if not isinstance(options[name], bool):
            raise ConfigError(f"run config {name} must be true or false, got {options[name]!r}")
    return make_config(values), options


# --- ClientApp -------------------------------------------------------------------------------------
_SETUP: dict[str, Setup] = {}  # one prepared backbone (+ shared data) per process: a Ray actor serves many messages
_OWN: dict[tuple[int, str], ClientData] = {}  # partition="own": the clients' own files this process has read


def _setup(cfg: ExperimentConfig) -> Setup:
    key = json.dumps(cfg.to_dict(), sort_keys=True)
    if key not in _SETUP:
        _SETUP.clear()
        _OWN.clear()
        _SETUP[key] = prepare(cfg, side="client")
    return _SETUP[key]


def client_rows(cfg: ExperimentConfig, cid: int, node_config: dict) -> tuple[Setup, ClientData]:
    """Client ``cid``'s backbone and data. With ``partition = "own"`` its rows come from its node's
    ``data-path`` (a deployment: the node's own file, and no other is opened), else from the config's
    ``client_data[cid]`` (the simulation plays every client); with a shared dataset, its partition."""
    setup = _setup(cfg)
    if cfg.partition != "own":
        if "data-path" in node_config:
            raise ConfigError("this SuperNode has a data-path but the run's partition is "
                              f"{cfg.partition!r}: set partition = \"own\" to train on the nodes' own files")
        return setup, setup.clients[cid]
    if "data-path" in node_config:
        path = str(node_config["data-path"])
    elif cfg.client_data:
        path = cfg.client_data[cid]
    else:
        raise ConfigError(f"partition='own': the SuperNode of client {cid} has no data-path; start it with "
                          "--node-config 'partition-id=<client id> data-path=<its CSV file> state-dir=<dir>'")
    if (cid, path) not in _OWN:
        _OWN[(cid, path)] = own_client_data(cfg, setup.tokenizer, cid, read_own_file(cfg, path))
    return setup, _OWN[(cid, path)]


def private_guard_mod(msg: Message, context: Context, call_next, local_params: Sequence[str] = ()) -> Message:
    """Client mod: no reply carrying a private-track tensor, or a local part of the global adapter
    (``local_params``, partial sharing), leaves the node (it becomes an error reply)."""
    reply = call_next(msg, context)
    if not reply.has_error():
        leaked = [n for record in reply.content.array_records.values() for n in record
                  if f".{PRIVATE}." in n or local_part(n, local_params)]
        if leaked:
            raise PrivateTrackLeak(f"refusing to send private-track tensors: {', '.join(leaked[:3])}")
    return reply


def make_client_app(cfg: ExperimentConfig | None = None, state_root: Path | None = None) -> ClientApp:
    """The ClientApp; ``cfg`` / ``state_root`` given (``fedslip run --engine flower-sim``) or read from
    the run config and node config (``flwr run``)."""
    def guard(msg: Message, context: Context, call_next) -> Message:
        run_cfg = cfg if cfg is not None else config_from_run_config(context.run_config)[0]
        return private_guard_mod(msg, context, call_next, run_cfg.local_params)

    app = ClientApp(mods=[guard])

    def partition_id(context: Context) -> int:
        if "partition-id" not in context.node_config:
            raise ConfigError("this SuperNode has no partition-id; start it with "
                              "--node-config 'partition-id=<client id> state-dir=<dir>'")
        return int(context.node_config["partition-id"])

    def client(msg: Message, context: Context) -> Client:
        run_cfg, options = (cfg, None) if cfg is not None else config_from_run_config(context.run_config)
        cid = partition_id(context)
        asked = int(msg.content[CONFIG]["client-id"])
        if asked != cid:
            raise ValueError(f"message for client {asked} reached the node of client {cid}")
        if not 0 <= cid < run_cfg.num_clients:
            raise ConfigError(f"partition-id={cid} is outside 0..{run_cfg.num_clients - 1} (num_clients)")
        if "state-dir" in context.node_config:
            state_dir = Path(str(context.node_config["state-dir"]))
        else:
            state_dir = (state_root or Path(options["out"]) / "clients") / str(cid)
        setup, data = client_rows(run_cfg, cid, context.node_config)
        secret = context.node_config.get("dp-secret")  # local DP: noise the server cannot redraw
        return Client(cid, run_cfg, setup.model, setup.tokenizer, data.train, data.test, state_dir,
                      clients_global_test(setup), noise_secret=str(secret) if secret is not None else None)

    def config(msg: Message) -> dict:
        return dict(msg.content[CONFIG])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = client(msg, context).fit(payload_of(msg.content), int(config(msg)["round"]))
        result = {"num_examples": reply.num_examples, "metrics": reply.metrics}
        return Message(RecordDict({**payload_records(reply.payload), RESULT: result_record(result)}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        conf = config(msg)
        result = client(msg, context).evaluate(payload_of(msg.content), decode_views(str(conf["views"])),
                                               int(conf["round"]))
        return Message(RecordDict({RESULT: result_record(result)}), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        conf = config(msg)
        if conf["op"] == IDENTIFY:
            result = {"partition-id": partition_id(context)}
        elif conf["op"] == KSTEP:
            result = client(msg, context).kstep(payload_of(msg.content), int(conf["steps"]))
        else:
            raise ValueError(f"unknown query op {conf['op']!r}")
        return Message(RecordDict({RESULT: result_record(result)}), reply_to=msg)

    return app


# --- ServerApp -------------------------------------------------------------------------------------
def make_server_app(cfg: ExperimentConfig | None = None, out: Path | None = None, overwrite: bool = False,
                    resume: bool = False, progress: bool = False, callbacks: Iterable[Callback] = ()) -> ServerApp:
    """The ServerApp: ``fedslip.rounds``' rounds with a FlowerEngine on the run's grid. ``callbacks`` (per-round
    rows, ``fedslip.run``) reach it in the simulation, where the ServerApp runs in the caller's process."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg, run_out, run_overwrite, run_resume = cfg, out, overwrite, resume
        if run_cfg is None:
            run_cfg, options = config_from_run_config(context.run_config)
            run_out, run_overwrite, run_resume = Path(options["out"]).resolve(), options["overwrite"], \
                options["resume"]
            if not log.handlers:  # a flwr-serverapp process: round logs go to the run's log stream
                log.addHandler(logging.StreamHandler())
                log.setLevel(logging.INFO)
            log.info("FedSLIP ServerApp: %s into %s", run_cfg.method, run_out)

        def make_engine(setup: Setup, run_dir) -> FlowerEngine:
            return FlowerEngine(grid, setup.cfg)

        if run_resume:
            rounds.start_resumed(run_out, progress, make_engine, callbacks, side="server")
        else:
            rounds.start(run_cfg, run_out, run_overwrite, progress, make_engine, callbacks, side="server")

    return app


server_app = make_server_app()
client_app = make_client_app()
