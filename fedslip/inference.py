"""Using a finished run: a client's personalized predictions, and export to a plain transformers model.

    fedslip predict --run runs/fedslip --client 2 "Stocks rally as rates fall"
    fedslip export  --run runs/fedslip --client 2 --out exported/client2

``export`` merges the global track (LoRA + head) and the client's private track into the backbone's
weights, so ``AutoModelForSequenceClassification.from_pretrained(out)`` needs neither peft nor FedSLIP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .client import PrivateStore
from .config import ExperimentConfig, load_config
from .data import Encoded, eval_batches
from .experiment import RunDir
from .model import GLOBAL, PRIVATE, TrackedModel, load_tokenizer
from .storage import StateFileError, load_tensors


@dataclass
class Prediction:
    text: str
    label: int
    class_name: str
    probabilities: list[float]


def check_export_target(out: str | Path) -> Path:
    """``export --out``: a new or empty directory (checked before the model loads)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; export needs a new or empty directory")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; export needs a new or empty directory")
    return out


class RunModel:
    """The inference model of one client of a finished run (global track, plus its private track)."""

    def __init__(self, run_dir: str | Path, client: int, use_private: bool = True):
        run = RunDir(Path(run_dir))
        if not (run.path / "config.toml").is_file():
            raise StateFileError(f"{run.path} is not a run directory (no config.toml)")
        self.cfg: ExperimentConfig = load_config(run.path / "config.toml")
        if not 0 <= client < self.cfg.num_clients:
            raise ValueError(f"client {client} does not exist; this run has clients 0..{self.cfg.num_clients - 1}")
        self.tokenizer = load_tokenizer(self.cfg.backbone)
        self.model = TrackedModel(self.cfg, self.tokenizer)
        self.model.load_global_state(load_tensors(run.path / "global.safetensors"))
        self.tracks: tuple[str, ...] = (GLOBAL,)
        if use_private and self.model.has_private:
            private = PrivateStore(run.client_dir(client)).load("private", expected=self.model.private_shapes())
            if private is None:
                raise StateFileError(f"{run.client_dir(client)} holds no private state for client {client}")
            self.model.load_private_state(private)
            self.tracks = (GLOBAL, PRIVATE)

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

    def export(self, out: str | Path) -> Path:
        """Merge the active tracks into the backbone and save a plain transformers model directory."""
        out = check_export_target(out)
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
        self.tokenizer.save_pretrained(out)
        return out
