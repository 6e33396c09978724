"""Everything a run needs before round 1, and the run directory's files.

``prepare`` does all the work that can fail on bad input (data files, partition sizes, backbone,
LoRA targets) before ``RunDir.create`` writes anything, so a bad config never leaves a half-made run
or touches an existing one.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .client import Client, PrivateStore
from .config import ConfigError, ExperimentConfig
from .data import Encoded, TextSplit, encode, has_local_split, load_split, load_splits, read_own_file
from .model import TrackedModel, load_tokenizer
from .partition import ClientRows, Partition, own_partition, own_rows, partition_splits
from .storage import RunDirError, StateFileError, atomic_write_bytes, load_tensors, read_json, save_tensors, write_json

log = logging.getLogger("fedslip")

RUN_FILES = ("config.toml", "partition.json", "metrics.jsonl", "metrics.csv", "summary.json", "global.safetensors")
RUN_DIRS = ("clients", "checkpoint")
ADAPTER_DIR = "adapter"  # <run>/adapter (global track), <run>/clients/<id>/adapter (private track): peft adapters
BASE_DIR = "base"  # the backbone beside the adapters, where its name alone cannot rebuild it (inference.py)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
BASE_FILES = ("config.json", "model.safetensors")


@dataclass
class ClientData:
    train: Encoded
    test: Encoded  # the rows accuracy is measured on: test rows, or validation rows when eval_split=val
    majority_floor: float  # accuracy of always predicting this client's most frequent eval class


@dataclass
class Setup:
    cfg: ExperimentConfig
    tokenizer: object
    model: TrackedModel
    partition: Partition | None  # None on a client's side of partition="own" (it knows its own rows only)
    clients: list[ClientData]  # the clients this process plays (none on the server side)
    global_eval: Encoded | None  # None where it is not needed: a client's side of partition="own"


SIDES = ("all", "server", "client")


def prepare(cfg: ExperimentConfig, side: str = "all") -> Setup:
    """Backbone, tokenizer and data of one process's part of a run.

    - ``all`` (the embedded engines: one process plays server and clients): everything.
    - ``server`` (a Flower ServerApp): the global test set and the partition's row indices; no client's
      rows are tokenized. With ``partition = "own"`` the server reads nothing but its own test split.
    - ``client`` (a ClientApp): with a shared dataset, every client's rows (a Ray worker plays several
      clients) and the global test set (a client's own model is also scored on it); with
      ``partition = "own"`` no data at all: each client loads its own file (``own_client_data``)."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    if cfg.partition == "own":
        return _prepare_own(cfg, side)
    train_split, test_split = load_splits(cfg)
    partition = partition_splits(cfg, train_split, test_split)
    tokenizer = load_tokenizer(cfg.backbone)
    model = TrackedModel(cfg, tokenizer)
    clients = [] if side == "server" else [
        client_data(cfg, tokenizer, train_split, test_split, rows) for rows in partition.clients]
    if cfg.eval_split == "val":  # the global validation set: the union of the clients' validation rows
        global_eval = Encoded.union([c.test for c in clients] if clients else  # the server side tokenizes them here
                             [encode(tokenizer, train_split, rows.val, cfg.max_seq_len) for rows in partition.clients])
    else:
        global_eval = encode(tokenizer, test_split, partition.global_test, cfg.max_seq_len)
    return Setup(cfg, tokenizer, model, partition, clients, global_eval)


def _prepare_own(cfg: ExperimentConfig, side: str) -> Setup:
    if side == "all" and not cfg.client_data:
        raise ConfigError("partition='own' on the embedded engine needs client_data: one file per client")
    global_split = own_global_split(cfg) if side != "client" else None
    files = [read_own_file(cfg, path) for path in cfg.client_data] if side == "all" else []  # bad files first
    tokenizer = load_tokenizer(cfg.backbone)
    model = TrackedModel(cfg, tokenizer)
    if side == "client":
        return Setup(cfg, tokenizer, model, None, [], None)
    partition = own_partition(cfg, global_split.labels)
    clients = [own_client_data(cfg, tokenizer, cid, own) for cid, own in enumerate(files)]
    return Setup(cfg, tokenizer, model, partition, clients,
                 encode(tokenizer, global_split, partition.global_test, cfg.max_seq_len))


def own_global_split(cfg: ExperimentConfig) -> TextSplit:
    """The server's global evaluation rows when the clients bring their own data: its test split, or with
    ``eval_split = "val"`` its own validation split (``val.csv[.gz]`` in data_dir). The clients' validation
    rows never reach it, so without that file there is no global validation set (no rows: the global
    accuracy is null), and the test split is not read at all."""
    if cfg.eval_split == "test":
        return load_split(cfg, "test")
    if has_local_split(cfg, "val"):
        return load_split(cfg, "val")
    return TextSplit(texts=[], labels=np.zeros(0, dtype=np.int64), source="none")


def client_data(cfg: ExperimentConfig, tokenizer, train_split: TextSplit, test_split: TextSplit,
                rows: ClientRows) -> ClientData:
    """One client's tokenized rows; its floor from its own evaluation labels."""
    eval_split, eval_rows = (train_split, rows.val) if cfg.eval_split == "val" else (test_split, rows.test)
    test = encode(tokenizer, eval_split, eval_rows, cfg.max_seq_len)
    counts = np.bincount(test.labels.numpy(), minlength=cfg.num_labels)
    return ClientData(train=encode(tokenizer, train_split, rows.train, cfg.max_seq_len), test=test,
                      majority_floor=float(counts.max() / counts.sum()))


def own_client_data(cfg: ExperimentConfig, tokenizer, cid: int, own: TextSplit) -> ClientData:
    """Client ``cid``'s data from its own file (``partition = "own"``), split by the client itself. Test rows
    that repeat a training row verbatim (a file with duplicated rows) are warned about: on those rows the
    personalized accuracy measures memorization, not generalization."""
    rows = own_rows(cfg, cid, len(own), own.source)
    seen = {own.texts[r] for r in rows.train}
    repeated = sum(own.texts[r] in seen for r in rows.test)
    if repeated:
        log.warning("%s: %d of client %d's %d test rows repeat one of its training rows verbatim (duplicated rows "
                    "in the file?); its accuracy on them measures memorization", own.source, repeated, cid,
                    len(rows.test))
    return client_data(cfg, tokenizer, own, own, rows)


@dataclass
class Checkpoint:
    round: int
    global_state: dict[str, torch.Tensor]
    history: list[dict]
    elapsed: float
    config: dict | None = None  # ExperimentConfig.experiment_dict() of the run (None in older checkpoints)
    reference: dict[str, torch.Tensor] | None = None  # lossy download codec: what the clients hold
    download: bytes | None = None  # lossy download codec: the last download sent (resent on resume)
    held: dict[int, int] | None = None  # lossy download codec: the reference round each client holds


def build_clients(setup: Setup, run_dir: RunDir) -> list[Client]:
    return [Client(cid, setup.cfg, setup.model, setup.tokenizer, data.train, data.test, run_dir.client_dir(cid),
                   clients_global_test(setup)) for cid, data in enumerate(setup.clients)]


def clients_global_test(setup: Setup) -> Encoded | None:
    """The global test set as the clients hold it (to score their own models on it): a shared dataset's;
    none with ``partition = "own"``, where it is the server's alone."""
    return None if setup.cfg.partition == "own" else setup.global_eval


def build_pooled_trainer(setup: Setup, run_dir: RunDir) -> Client:
    """The ``centralized`` reference's trainer: one client (id ``num_clients``) holding the union of all
    clients' training rows, in client order."""
    union = Encoded.union([c.train for c in setup.clients])
    cid = setup.cfg.num_clients
    return Client(cid, setup.cfg, setup.model, setup.tokenizer, union, union, run_dir.client_dir(cid))


class RunDir:
    """The files of one run: ``config.toml``, ``partition.json``, ``metrics.jsonl`` (one line per round),
    ``summary.json``, ``global.safetensors`` and ``clients/<id>/`` (each client's private state)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def holds_run(self) -> bool:
        return any((self.path / f).exists() for f in RUN_FILES + RUN_DIRS + (ADAPTER_DIR, BASE_DIR))

    def check_writable(self, overwrite: bool) -> None:
        """Refuse an output path that cannot take a run, before minutes of loading."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"output path {self.path} exists and is not a directory")
        ancestor = next(p for p in (self.path, *self.path.parents) if p.exists())
        if not ancestor.is_dir():
            raise RunDirError(f"output path {self.path}: {ancestor} is a file, not a directory")
        if not os.access(ancestor, os.W_OK):
            raise RunDirError(f"output path {self.path}: {ancestor} is not writable")
        if self.holds_run() and not overwrite:
            raise RunDirError(f"{self.path} already holds a run; choose another --out or pass --overwrite")
        if self.holds_run() and not (self.path / "config.toml").is_file():
            raise RunDirError(f"{self.path} holds run files but no config.toml (not a directory FedSLIP ran in); "
                              "refusing to --overwrite it, nothing deleted")

    def written_files(self) -> list[Path]:
        """Every file a run writes here: what ``--overwrite`` deletes. A user's own files, also inside
        ``clients/`` or ``checkpoint/``, are not among them."""
        files = [self.path / f for f in RUN_FILES]
        files += [self.path / "checkpoint" / "state.json", *self._checkpoint_tensor_files()]
        files += (self.path / "kstep").glob("steps*-lr*.json")
        files += (self.path / "tensorboard").glob("events.out.tfevents.*")
        files += [self.path / ADAPTER_DIR / f for f in ADAPTER_FILES] + [self.path / BASE_DIR / f for f in BASE_FILES]
        for client in (self.path / "clients").glob("*"):
            if client.name.isdigit():
                store = PrivateStore(client)
                files += [store.path(kind, previous) for kind in store.KINDS for previous in (False, True)]
                files.append(store.rows_path)
                files += [client / ADAPTER_DIR / f for f in ADAPTER_FILES]
        return [f for f in files if f.is_file()]

    def create(self, overwrite: bool) -> None:
        self.check_writable(overwrite)
        if overwrite:
            for f in self.written_files():
                f.unlink()
            folders = [*(self.path / "clients").glob(f"*/{ADAPTER_DIR}"), *(self.path / "clients").glob("*"),
                       *(self.path / d for d in (*RUN_DIRS, "kstep", "tensorboard", ADAPTER_DIR, BASE_DIR))]
            for folder in folders:  # emptied folders go; one holding a user's file stays
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
        self.path.mkdir(parents=True, exist_ok=True)

    def client_dir(self, cid: int) -> Path:
        return self.path / "clients" / str(cid)

    def append_metrics(self, row: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def rewrite_metrics(self, rows: list[dict]) -> None:
        atomic_write_bytes(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())

    # --- checkpoint: the commit point of a round ------------------------------------------------
    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        """``checkpoint/global-<round>.safetensors``, then ``checkpoint/state.json`` naming it (the commit
        point), then the older tensors go. A crash at any point leaves a consistent last checkpoint."""
        folder = self.path / "checkpoint"
        name = f"global-{checkpoint.round:05d}.safetensors"
        save_tensors(folder / name, checkpoint.global_state)
        wire = {}  # lossy download codec: the clients' reference and the download they were last sent
        if checkpoint.reference is not None:
            wire = {"reference": f"reference-{checkpoint.round:05d}.safetensors",
                    "download": f"download-{checkpoint.round:05d}.safetensors"}
            save_tensors(folder / wire["reference"], checkpoint.reference)
            atomic_write_bytes(folder / wire["download"], checkpoint.download)
        held = {} if checkpoint.held is None else {"held": {str(c): r for c, r in sorted(checkpoint.held.items())}}
        write_json(folder / "state.json", {"round": checkpoint.round, "global": name, "history": checkpoint.history,
                                           "elapsed": checkpoint.elapsed, "config": checkpoint.config, **wire,
                                           **held})
        for old in self._checkpoint_tensor_files():
            if old.name not in (name, *wire.values()):
                old.unlink()

    def _checkpoint_tensor_files(self) -> list[Path]:
        return [f for kind in ("global", "reference", "download")
                for f in (self.path / "checkpoint").glob(f"{kind}-*.safetensors")]

    def load_checkpoint(self) -> Checkpoint | None:
        """The last completed round, or None if no round completed."""
        state_path = self.path / "checkpoint" / "state.json"
        if not state_path.exists():
            return None
        meta = read_json(state_path)
        if not isinstance(meta, dict) or {"round", "global", "history", "elapsed"} - set(meta):
            raise StateFileError(f"{state_path} lacks round/global/history/elapsed")
        kinds = {"round": int, "global": str, "history": list, "elapsed": (int, float), "config": (dict, type(None))}
        for key, kind in kinds.items():
            value = meta.get(key)
            if not isinstance(value, kind) or isinstance(value, bool) or (key == "round" and value < 0):
                raise StateFileError(f"{state_path}: {key!r} is {value!r}, not a valid {key}")
        if not all(isinstance(row, dict) for row in meta["history"]):
            raise StateFileError(f"{state_path}: 'history' must list round rows")

        def named_file(key: str) -> Path:
            """A file state.json names: a plain name in the checkpoint folder, never a path elsewhere."""
            if not isinstance(meta[key], str) or Path(meta[key]).name != meta[key]:
                raise StateFileError(f"{state_path}: {key!r} must name a file there")
            return state_path.parent / meta[key]

        tensors = load_tensors(named_file("global"))
        # a lossy download codec: the clients' reference and the download they were last sent
        reference = load_tensors(named_file("reference")) if "reference" in meta else None
        download = None
        if "download" in meta:
            if not named_file("download").is_file():
                raise StateFileError(f"{named_file('download')} does not exist")
            download = named_file("download").read_bytes()
        held = meta.get("held")
        if held is not None:
            try:
                held = {int(c): int(r) for c, r in held.items()}
            except (AttributeError, TypeError, ValueError):
                raise StateFileError(f"{state_path}: 'held' must map client ids to rounds") from None
        return Checkpoint(round=meta["round"], global_state=tensors, history=meta["history"],
                          elapsed=float(meta["elapsed"]), config=meta.get("config"), reference=reference,
                          download=download, held=held)

    def write_summary(self, summary: dict) -> None:
        write_json(self.path / "summary.json", summary)

    def save_global(self, state: dict[str, torch.Tensor]) -> None:
        save_tensors(self.path / "global.safetensors", state)
