"""Using a finished run: a client's personalized predictions, and export for plain transformers / peft.

    fedslip predict --run runs/fedslip --client 2 "Stocks rally as rates fall"
    fedslip predict --run runs/fedslip --client 2 --file texts.jsonl            # or texts.txt, or - (stdin)
    fedslip export  --run runs/fedslip --client 2 --out exported/client2                 # merged
    fedslip export  --run runs/fedslip --client 2 --out exported/client2 --format peft   # adapters

``--format merged`` folds the global track (LoRA + head) and the client's private track into the backbone's
weights, so ``AutoModelForSequenceClassification.from_pretrained(out)`` needs neither peft nor FedSLIP.
``--format peft`` keeps the tracks as the peft adapters they are in training (``global``: LoRA + the classifier
head as ``modules_to_save``; ``private``: LoRA) on an unchanged backbone; ``save_adapters`` writes the same
adapters into every finished run directory.

Where an adapter's ``base_model_name_or_path`` points: the name ``from_pretrained`` rebuilds the frozen backbone
from, i.e. the hub id, or the absolute path of a local backbone directory or of the packaged MiniLM files. When
a fresh load of that name does not give the backbone's weights back (``tiny``, whose weights are seeded random
numbers, or a checkpoint missing weights that then load at random), the backbone is saved to ``base/`` next to
the adapters and the name is that folder's absolute path.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import ModelCard
from peft.utils import ModulesToSaveWrapper

from .client import PrivateStore
from .config import ExperimentConfig, load_config
from .data import Encoded, eval_batches
from .experiment import ADAPTER_DIR, BASE_DIR, RunDir
from .model import GLOBAL, PRIVATE, TrackedModel, load_backbone, load_tokenizer, resolve_backbone
from .model_card import Export, model_card
from .storage import StateFileError, finished_run, load_tensors, read_json, set_plain_mode, write_json

EXPORT_FORMATS = ("merged", "peft")
EXPORT_META = "fedslip_export.json"


class ExportError(ValueError):
    """The run cannot be written in the requested format; the message says why and what works instead."""


@dataclass
class Prediction:
    text: str
    label: int
    class_name: str
    probabilities: list[float]


def read_texts(path: str | Path) -> list[str]:
    """Texts to classify from a UTF-8 file: one per line, or, where the name ends in ``.jsonl``, one JSON
    object per line whose ``"text"`` field is the text (a text that holds newlines); ``"-"``: standard
    input, one per line. Blank lines are skipped.

        fedslip predict --run runs/fedslip --client 2 --file texts.jsonl
        RunModel("runs/fedslip", 2).predict(read_texts("texts.jsonl"))
    """
    if str(path) == "-":
        name, stdin = "standard input", sys.stdin
        data = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode("utf-8", "surrogateescape")
    else:
        name, path = str(path), Path(path)
        if path.is_dir():
            raise ValueError(f"{path} is a directory; --file names a text file (one text per line) or a .jsonl file")
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        data = path.read_bytes()
    try:
        content = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name} is not UTF-8 text (byte {e.start})") from None
    lines = [(i, line.removesuffix("\r")) for i, line in enumerate(content.split("\n"), 1)]
    lines = [(i, line) for i, line in lines if line.strip()]
    if not name.endswith(".jsonl"):
        texts = [line for _, line in lines]
    else:
        texts = []
        for i, line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'{name} line {i}: expected a JSON object with a "text" string, got {line[:60]!r}')
            texts.append(record["text"])
    if not texts:
        raise ValueError(f"{name} holds no text to classify")
    return texts


def check_export_target(out: str | Path) -> Path:
    """``export --out``: a new or empty directory (checked before the model loads)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; export needs a new or empty directory")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; export needs a new or empty directory")
    return out


def same_backbone(a: torch.nn.Module, b: torch.nn.Module, heads: Sequence[str]) -> bool:
    """Whether two models hold the same tensors outside the ``heads`` modules (which an adapter replaces)."""
    def outside(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: t for n, t in state.items() if not any(n == h or n.startswith(h + ".") for h in heads)}

    sa, sb = outside(a.state_dict()), outside(b.state_dict())
    return sa.keys() == sb.keys() and all(torch.equal(sa[n].cpu(), sb[n].cpu()) for n in sa)


class RunModel:
    """The inference model of one client of a finished run (global track, plus its private track)."""

    def __init__(self, run_dir: str | Path, client: int, use_private: bool = True):
        self.run = RunDir(finished_run(run_dir, "global.safetensors"))  # the run's final global track
        self.cfg: ExperimentConfig = load_config(self.run.path / "config.toml")
        if not 0 <= client < self.cfg.num_clients:
            raise ValueError(f"client {client} does not exist; this run has clients 0..{self.cfg.num_clients - 1}")
        self.client = client
        self.tokenizer = load_tokenizer(self.cfg.backbone)
        # what training truncated to: an exported tokenizer called with truncation=True does the same
        self.tokenizer.model_max_length = self.cfg.max_seq_len
        self.model = TrackedModel(self.cfg, self.tokenizer)
        self.model.load_global_state(load_tensors(self.run.path / "global.safetensors"))
        self.tracks: tuple[str, ...] = (GLOBAL,)
        self.personalized = use_private and self.model.has_client_state  # the client's own model
        if self.personalized and self.cfg.instance_weight:
            raise ExportError("this run's client models mix the tracks with a weight computed for each input from "
                              "the client's training rows (instance_weight, feddpa), which neither a merged model "
                              "nor peft adapters express; use --global for the global track alone")
        if self.personalized:  # a private track and/or local parts (partial sharing)
            private = self._private_state(client)
            if private is None:
                raise StateFileError(f"{self.run.client_dir(client)} holds no private state for client {client}")
            self.model.load_private_state(private)
            self.tracks = self.model.inference_tracks()

    def _private_state(self, client: int) -> dict[str, torch.Tensor] | None:
        return PrivateStore(self.run.client_dir(client)).load("private", expected=self.model.private_shapes())

    @torch.inference_mode()
    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.cfg.max_seq_len)["input_ids"]
        data = Encoded(input_ids=ids, labels=torch.zeros(len(ids), dtype=torch.long))
        out = torch.empty(len(ids), self.cfg.num_labels)
        with self.model.eval_mode():
            for idx, batch in eval_batches(self.tokenizer, data, self.cfg.eval_batch_size):
                out[idx] = self.model.logits(batch, self.tracks).cpu()
        return out

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        probs = self.logits(texts).softmax(-1)
        return [Prediction(t, int(p.argmax()), self.cfg.class_names[int(p.argmax())], p.tolist())
                for t, p in zip(texts, probs)]

    def export(self, out: str | Path, format: str = "merged") -> Path:
        """Save the active tracks to ``out`` (a new or empty directory) with the tokenizer.

        ``merged``: one plain transformers model directory. ``peft``: the adapters ``out/global`` (and
        ``out/private``) plus ``fedslip_export.json``. Both: ``README.md``, the model card (``model_card``: what
        the model is, the run's metrics, how to load it). Every refusal comes before anything is written."""
        if format not in EXPORT_FORMATS:
            raise ExportError(f"export format {format!r} is not one of {', '.join(EXPORT_FORMATS)}")
        if format == "peft":
            self.check_peft_format()
        out = check_export_target(out)
        peft_cards: list[ModelCard] = []
        if format == "merged":
            base_model, usage = self._export_merged(out)
        else:
            base_model, usage = self._export_peft(out, peft_cards)
        self.tokenizer.save_pretrained(out)
        summary = self.run.path / "summary.json"
        export = Export(run=self.run.path, cfg=self.cfg, summary=read_json(summary) if summary.is_file() else {},
                        client=self.client, personalized=self.personalized, tracks=self.tracks, format=format,
                        base_model=base_model, out=out, usage=usage,
                        adapters={t: self.model.model.peft_config[t] for t in self.tracks})
        model_card(export, peft_cards).save(out / "README.md")
        set_plain_mode([f for f in out.rglob("*") if f.is_file()])
        return out

    def check_peft_format(self) -> None:
        """A private head (``private_head`` = bias/classifier) adds a per-client term to the output of the
        classifier, which the global adapter owns as ``modules_to_save``. peft can neither put a LoRA layer on
        a modules_to_save module nor run two adapters' copies of one module at once, so a private track with a
        head is no peft adapter; the merged format folds the head into the classifier instead."""
        if PRIVATE in self.tracks and self.cfg.private_head != "none":
            raise ExportError(f"--format peft cannot express this run's private head (private_head="
                              f"{self.cfg.private_head!r}): it corrects the classifier that the global adapter "
                              "holds as modules_to_save, and peft runs one adapter's copy of such a module at a "
                              "time; use --format merged (or --global for the global track alone)")
        if PRIVATE in self.tracks and self.cfg.private_weight:
            raise ExportError(f"--format peft cannot express this run's weighting of the tracks (private_weight="
                              f"{self.cfg.private_weight}): a peft adapter runs at its own scale; use --format "
                              "merged (or --global for the global track alone)")

    def _export_merged(self, out: Path) -> tuple[str, str]:
        """The tracks merged into the backbone, saved to ``out``; returns the backbone's name and the Python
        that loads the model."""
        self.model.run_through(self.tracks)
        head = self.model.merged_head(self.tracks)  # the private head folds into the classifier layer
        merged = self.model.model.merge_and_unload(adapter_names=list(self.tracks))
        if head is not None:
            with torch.no_grad():
                classifier = merged.get_submodule(self.model.head[-1])
                classifier.weight.copy_(head["weight"])
                classifier.bias.copy_(head["bias"])
        merged.config.id2label = dict(enumerate(self.cfg.class_names))
        merged.config.label2id = {n: i for i, n in enumerate(self.cfg.class_names)}
        merged.save_pretrained(out)
        return self._backbone_name() if self.cfg.backbone != "tiny" else "tiny", "\n".join([
            "from transformers import pipeline", "",
            f"classify = pipeline('text-classification', model={str(out.resolve())!r}, truncation=True)  "
            f"# cuts at {self.cfg.max_seq_len} tokens, as in training",
            "classify(['a text to classify'])"])

    def _backbone_name(self) -> str:
        """The name ``from_pretrained`` loads the run's backbone by: its hub id or the absolute path of its files."""
        source, local_only = resolve_backbone(self.cfg.backbone)
        return str(Path(source).resolve()) if local_only else source

    def _export_peft(self, out: Path, peft_cards: list[ModelCard]) -> tuple[str, str]:
        """The tracks as peft adapters in ``out`` (and the backbone in ``out/base`` where its name cannot
        rebuild it); returns the name the adapters load the backbone from and the Python that loads them. The
        cards peft writes beside the adapters it saves are added to ``peft_cards``."""
        base_model, _ = self._save_base(out / BASE_DIR)
        for track in self.tracks:
            self._save_adapter(track, out / track, base_model, peft_cards)
        id2label = dict(enumerate(self.cfg.class_names))
        write_json(out / EXPORT_META, {
            "format": "peft", "base_model": base_model, "num_labels": self.cfg.num_labels, "id2label": id2label,
            "adapters": list(self.tracks), "max_seq_len": self.cfg.max_seq_len,
            "run": str(self.run.path.resolve()), "client": self.client if self.personalized else None})
        where = out.resolve()
        first, *more = self.tracks
        lines = ["from peft import PeftModel",
                 "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
                 "",
                 f"base = AutoModelForSequenceClassification.from_pretrained({base_model!r}, "
                 f"num_labels={self.cfg.num_labels}, id2label={id2label!r})",
                 f"model = PeftModel.from_pretrained(base, {str(where / first)!r}, adapter_name={first!r})"]
        for track in more:
            lines += [f"model.load_adapter({str(where / track)!r}, adapter_name={track!r})",
                      f"model.base_model.set_adapter({list(self.tracks)!r})  # both adapters run"]
        lines += ["model.eval()", f"tokenizer = AutoTokenizer.from_pretrained({str(where)!r})  "
                  f"# truncation=True cuts at {self.cfg.max_seq_len} tokens, as in training"]
        return base_model, "\n".join(lines)

    def _save_base(self, folder: Path) -> tuple[str, list[Path]]:
        """The name ``from_pretrained`` rebuilds this run's frozen backbone from, and the files written for it:
        the backbone's own name when a fresh load gives every weight outside the head back (the global adapter
        brings the head), else the backbone saved to ``folder`` and that folder's absolute path."""
        backbone = copy.deepcopy(self.model.model).unload()  # this run's frozen backbone, without peft's layers
        heads = [n for n, m in self.model.model.get_base_model().named_modules() if isinstance(m, ModulesToSaveWrapper)]
        if self.cfg.backbone != "tiny":  # tiny has no files: seeded random weights
            with torch.random.fork_rng(devices=[]):  # weights missing from a checkpoint load at random
                fresh = load_backbone(self.cfg.backbone, self.cfg.num_labels, len(self.tokenizer))
            if same_backbone(fresh, backbone, heads):
                return self._backbone_name(), []
        backbone.save_pretrained(folder)
        return str(folder.resolve()), sorted(folder.iterdir())

    def _save_adapter(self, track: str, folder: Path, base_model: str,
                      peft_cards: list[ModelCard] | None = None) -> list[Path]:
        """peft's ``save_pretrained`` of one adapter: ``adapter_config.json`` and ``adapter_model.safetensors`` in
        ``folder``. peft puts a named adapter in a subfolder of its target, next to a generated model card, so
        it saves into a temporary folder beside ``folder`` and the adapter's files move in; the card goes to
        ``peft_cards`` when given (an export's own card keeps its metadata)."""
        self.model.model.peft_config[track].base_model_name_or_path = base_model
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-") as tmp:
            self.model.model.save_pretrained(tmp, selected_adapters=[track], safe_serialization=True)
            if peft_cards is not None and (Path(tmp) / "README.md").is_file():
                peft_cards.append(ModelCard.load(Path(tmp) / "README.md"))
            written = []
            for file in sorted((Path(tmp) / track).iterdir()):
                os.replace(file, folder / file.name)
                written.append(folder / file.name)
        return written


def save_adapters(run_dir: str | Path) -> list[Path]:
    """Write a finished run's tracks as peft adapters (what ``export --format peft`` writes, for every client):
    ``<run>/adapter/`` the global track (LoRA + classifier head; with partial sharing the server's model: local
    parts at their initial values), ``<run>/clients/<id>/adapter/`` each client's private track (with partial
    sharing: its whole global adapter, local parts included), and ``<run>/base/`` where the backbone's name
    cannot rebuild it (``tiny``). Private adapters are written for dual-track runs without a private head
    (which no peft adapter can express, see ``RunModel.check_peft_format``), for the clients whose private
    state is in the run directory (on a Flower deployment it is in each SuperNode's state dir). Returns the
    files written."""
    run_model = RunModel(run_dir, client=0, use_private=False)
    run = run_model.run
    base_model, written = run_model._save_base(run.path / BASE_DIR)
    written += run_model._save_adapter(GLOBAL, run.path / ADAPTER_DIR, base_model)
    # partial sharing: a client's model is the global adapter with its own local parts
    track = PRIVATE if run_model.model.has_private else GLOBAL
    expressible = run_model.cfg.private_head == "none" and not run_model.cfg.private_weight  # check_peft_format
    if (run_model.model.has_private and expressible) or run_model.model.local_params:
        for cid in range(run_model.cfg.num_clients):
            private = run_model._private_state(cid)
            if private is not None:
                run_model.model.load_private_state(private)
                written += run_model._save_adapter(track, run.client_dir(cid) / ADAPTER_DIR, base_model)
    return set_plain_mode(written)
