"""The model card of an export: ``README.md`` at the top of the exported folder.

    fedslip export --run runs/fedslip --client 2 --out exported/client2    # exported/client2/README.md

As the cards of ``transformers``' ``create_model_card`` and peft: YAML metadata the Hugging Face Hub reads
(``base_model`` where the backbone is a hub model, ``library_name``, ``tags``, ``pipeline_tag``), then what
the model is: the base model, the method and its preset's values, the data and partition, the run's metrics
(its ``summary.json``), the bytes per round, whose private track is in the export, how to load it, and the
commands that made the run and the export.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from huggingface_hub import ModelCard, ModelCardData

from .config import PRESET_BASE, PRESET_KEYS, PRESETS, ExperimentConfig
from .data import HUB_DATASET
from .model import EMBEDDED_HUB_ID, hub_id
from .partition import Partition

TAGS = ("fedslip", "federated-learning", "lora", "text-classification")
LIBRARY = {"merged": "transformers", "peft": "peft"}
BACKBONES = {"minilm": f"the packaged all-MiniLM-L6-v2 (`{EMBEDDED_HUB_ID}` on the Hub)",
             "tiny": "a seeded random-init 2-layer BERT for tests (no pretrained weights)"}


@dataclass
class Export:
    """What one export holds: the run it comes from and how it was written."""
    run: Path
    cfg: ExperimentConfig
    summary: dict
    client: int
    personalized: bool  # the client's own model (its private track or local parts); False: the global model
    tracks: tuple[str, ...]
    format: str  # ``inference.EXPORT_FORMATS``
    base_model: str  # the name the exported adapters rebuild the backbone from (merged: the backbone's)
    out: Path
    usage: str  # Python that loads the export
    adapters: dict  # track -> its peft LoraConfig (rank, target modules)

    @property
    def command(self) -> str:
        """The ``fedslip export`` command line that writes this export."""
        flags = ["--run", str(self.run), "--client", str(self.client), "--out", str(self.out)]
        if not self.personalized:
            flags.append("--global")
        return " ".join(["fedslip", "export", *map(shlex.quote, flags), "--format", self.format])


def percent(value: float | None) -> str:
    """An accuracy as the card writes it: ``87.7%``; ``–`` where the run measured none."""
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def spread(values: list[float | None]) -> str:
    """``min / median / max`` of the per-client accuracies a run measured (failed evaluations left out)."""
    present = [v for v in values or [] if v is not None and not math.isnan(v)]
    if not present:
        return "–"
    return " / ".join(percent(v) for v in (min(present), float(np.median(present)), max(present)))


def metrics_rows(export: Export) -> list[tuple[str, str]]:
    """The card's results: (what, value) from the run's ``summary.json``."""
    s, cfg = export.summary, export.cfg
    per_client = s.get("personalized_accuracy_per_client") or []
    scored = sum(v is not None and not math.isnan(v) for v in per_client)
    rows = [("global accuracy (global track, global test set)", percent(s.get("global_accuracy"))),
            ("personalized accuracy, zero-shot (each client's model on its own test rows, mean over clients)",
             percent(s.get("personalized_accuracy")))]
    if s.get("kstep_accuracy") is not None:
        rows.append((f"after K-step ({cfg.kstep} local steps per client at lr {s.get('kstep_lr')}; the fine-tuned "
                     "models are not in this export)", percent(s["kstep_accuracy"])))
    rows.append((f"personalized accuracy per client, min / median / max over {scored} clients", spread(per_client)))
    if export.personalized and export.client < len(per_client):
        rows.append((f"client {export.client}'s personalized accuracy (this model)",
                     percent(per_client[export.client])))
    mib = s.get("comm_mib_per_round")
    rows.append(("MiB per round (upload + download, all clients)", "–" if mib is None else f"{mib:.3f}"))
    return rows


def preset_rows(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """The method fields (``PRESET_KEYS``) the method's preset sets, and any other the run set, with the run's
    values; a value other than the preset's says so."""
    preset = {**PRESET_BASE, **PRESETS.get(cfg.method, {})}
    rows = []
    for key in PRESET_KEYS:
        value = getattr(cfg, key)
        if key in PRESETS.get(cfg.method, {}) or value != preset[key]:
            rows.append((key, f"`{value}`" + ("" if value == preset[key] else f" (the preset: `{preset[key]}`)")))
    return rows


def _counts(values: list[int]) -> str:
    return "–" if not values else str(min(values)) if min(values) == max(values) else f"{min(values)}–{max(values)}"


def data_rows(export: Export) -> list[tuple[str, str]]:
    cfg = export.cfg
    if cfg.partition == "own":
        files = cfg.client_data
        source = (f"each client's own file ({len(files)}: " + ", ".join(f"`{f}`" for f in files[:3])
                  + (", ..." if len(files) > 3 else "") + ")" if files else "each client's own file (on its node)")
        source += f"; the global test set from `{cfg.data_dir}`" if cfg.data_dir else ""
    else:
        source = f"`{cfg.data_dir}`" if cfg.data_dir else f"hub dataset `{HUB_DATASET}`"
    partition = {"dominant": f"`dominant` (dominant fraction {cfg.dominant_fraction})",
                 "dirichlet": f"`dirichlet` (alpha {cfg.dirichlet_alpha})",
                 "natural": f"`natural` (one client per value of the column `{cfg.partition_by}`)"}
    rows = [("data", source), ("text columns / label column", f"{', '.join(cfg.text_columns)} / {cfg.label_column}"),
            ("classes", ", ".join(f"{i}: {n}" for i, n in enumerate(cfg.class_names))),
            ("partition", partition.get(cfg.partition, f"`{cfg.partition}`")), ("clients", str(cfg.num_clients))]
    names = export.summary.get("client_names") or []
    if cfg.partition == "natural" and names:
        rows.append(("client names", ", ".join(f"{i}: {n}" for i, n in enumerate(names))))
    clients = Partition.load(export.run / "partition.json").clients if (export.run / "partition.json").is_file() \
        else []
    if clients:  # the rows each client got (natural and small groups: fewer than configured)
        rows.append(("rows per client (train / validation / test)", " / ".join(
            _counts([len(getattr(c, split)) for c in clients]) for split in ("train", "val", "test"))))
    else:  # own files: the rows stay with the clients
        rows.append(("rows per client (train / validation / test, at most)",
                     f"{cfg.samples_per_client} / {cfg.val_samples_per_client} / {cfg.test_samples_per_client}"))
    rows += [("accuracies measured on", f"the `{cfg.eval_split}` split"),
             ("rounds, seed", f"{cfg.rounds}, {cfg.seed}")]
    return rows


def _targets(modules: str | set[str] | list[str]) -> str:
    return modules if isinstance(modules, str) else ", ".join(sorted(modules))  # a str: peft's regex


def _table(rows: list[tuple[str, str]], header: tuple[str, str]) -> list[str]:
    return [f"| {header[0]} | {header[1]} |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)]


def run_command(run: Path) -> str:
    """The command that made ``run`` where a report beside it recorded one (``fedslip compare`` writes its
    command into ``results.json`` next to its runs); "" otherwise."""
    results = run.parent / "results.json"
    try:
        recorded = json.loads(results.read_text()) if results.is_file() else {}
    except ValueError:
        return ""
    listed = any(Path(r.get("dir", "")).name == run.name for r in recorded.get("runs", []))
    return recorded.get("command", "") if listed else ""


def model_card(export: Export, peft_cards: Sequence[ModelCard] = ()) -> ModelCard:
    """The export's card; the metadata of the cards peft wrote while saving the adapters (``peft_cards``: its
    ``library_name`` and ``tags``) is kept in it, and its ``base_model`` is the name the export loads from."""
    cfg, s = export.cfg, export.summary
    whose = f"client {export.client}'s personalized model" if export.personalized else "the global model"
    tags = set(TAGS) | {cfg.method, "transformers"}
    for card in peft_cards:  # peft names the base model its own way: the card's base_model is ours
        tags |= {t for t in card.data.tags or [] if not t.startswith("base_model:")}
    carried = Path(export.base_model).parent == export.out.resolve()  # the export holds its own backbone (base/)
    data = ModelCardData(base_model=None if carried else hub_id(cfg.backbone), library_name=LIBRARY[export.format],
                         pipeline_tag="text-classification", tags=sorted(tags))
    shared = "its shared parts" if cfg.local_params else "LoRA + classifier head"
    tracks = {"global": f"the global track ({shared} averaged by the server each round)",
              "private": f"client {export.client}'s private track (trained on its rows only; it never left the "
                         "client)"}
    holds = " and ".join(tracks[t] for t in export.tracks)
    if export.personalized and "private" not in export.tracks:  # partial sharing: the client's local parts
        holds += f", with client {export.client}'s own local parts ({', '.join(cfg.local_params)})"
    layout = ("one transformers model, merged into the backbone's weights" if export.format == "merged"
              else "peft adapters " + ", ".join(f"`{t}/`" for t in export.tracks) + " on the unchanged backbone")
    included = (f"client {export.client}'s private track" if "private" in export.tracks else
                f"client {export.client}'s local parts, no private track" if export.personalized else
                "the global track only, no client's private track")
    backbone = f"`{export.base_model}`" + ("" if export.base_model == cfg.backbone else
                                            f" (the run's backbone: `{cfg.backbone}`)")
    backbone += f", {BACKBONES[cfg.backbone]}" if cfg.backbone in BACKBONES else ""
    made_by = run_command(export.run)
    lines = [
        f"# FedSLIP `{cfg.method}`: {whose}", "",
        f"A text classifier from a federated run of `{cfg.method}` (FedSLIP, {cfg.num_clients} clients, "
        f"{cfg.rounds} rounds): {holds}; {layout}. Included: {included}.", "",
        "## Base model", "",
        f"{backbone}; " + "; ".join(f"{track} track: LoRA rank {lora.r} on {_targets(lora.target_modules)}"
                                    for track, lora in export.adapters.items())
        + f"; inputs truncated at {cfg.max_seq_len} tokens.", "",
        f"## Method: `{cfg.method}`", "",
        f"The method fields (`PRESET_KEYS` in `fedslip/config.py`) the `{cfg.method}` preset sets, with the run's "
        "values (a value the run set otherwise is shown next to the preset's):", "",
        *_table(preset_rows(cfg), ("key", "value")), "",
        "## Data and partition", "",
        *_table(data_rows(export), ("setting", "value")), "",
        "## Results", "",
        f"From the run's `summary.json`, on the `{cfg.eval_split}` split"
        + ("" if s.get("complete", True) else "; the run lost clients, so its means cover the clients that "
           "answered only") + ":", "",
        *_table(metrics_rows(export), ("metric", "value")), "",
        "## Use", "", "```python", export.usage, "```", "",
        "## How it was made", "",
        f"- the run: `{export.run}`" + (f", made by `{made_by}`" if made_by else "")
        + f"; its resolved config (below) runs it again: `fedslip run --config "
        f"{shlex.quote(str(export.run / 'config.toml'))} --out runs/again`",
        f"- this export: `{export.command}`", "",
        "<details><summary>config.toml</summary>", "", "```toml", cfg.to_toml().strip(), "```", "", "</details>", "",
        "### Framework versions", "",
        *(f"- {name} {version}" for name, version in (s.get("versions") or {}).items()), "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
