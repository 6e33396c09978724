"""``fedslip audit RUN_DIR``: what an honest-but-curious server infers from the updates it receives.

    fedslip run --method fedavg_lora --audit --out runs/audited     # records what the server received
    fedslip audit runs/audited                                      # -> runs/audited/audit/audit.json

A run with ``audit = true`` keeps, per round, every accepted client's change of the global track as
the server received it (``audit/round-<r>.safetensors``). The attack reads only those files; the
partition (each client's true dominant class) is used to score it, never to make a guess.

Attack implemented: **classifier-bias direction**. Under cross-entropy, the gradient of a client's
loss with respect to the classifier bias is sum over its rows of (softmax - onehot(y)): the bias of the
classes a client holds most rises. The guess for a client and round is the class whose classifier-bias
entry grew most in that client's update. It needs the classifier in the update: methods that keep the
head local (fedper, fedrep, fedbabu) send no bias, and the attack reports that it cannot run.

Attack 2, **learned on shadow clients** (``--public-data FILE``): the server simulates clients of its own
from public rows it names (a CSV with the run's columns), ``shadow_per_class`` per class, each with that
class dominant (``shadow_skew`` of its rows, the rest uniform over the other classes, as many rows as a
real client). Each round it trains them exactly as a client would (the run's config and code, fp32 wire,
a fresh private track) from the global track the clients received (``audit/global-<r>.safetensors``), and
takes each class's mean direction of their changes (the whole global track that travels, head or not). The
guess for a real client is the class whose mean direction is closest (cosine) to its change: a nearest-
centroid classifier fit on the shadows. It also runs where the head stays local (fedper, fedrep): the body's
LoRA change is what it reads. The real clients' partition is used to score, never to guess.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import torch

from . import comm
from .client import Client
from .config import ConfigError, ExperimentConfig, load_config
from .data import DataError, TextSplit, encode, read_csv_split
from .experiment import RunDir, RunDirError
from .model import TrackedModel, load_tokenizer
from .partition import Partition, counts_for
from .rounds import AUDIT_DIR
from .storage import load_tensors, run_directory, write_json


def bias_name(names: list[str]) -> str | None:
    """The classifier's bias among the global track's tensor names (the last head module's copy)."""
    candidates = sorted(n for n in names if ".modules_to_save." in n and n.endswith(".bias") and "classifier" in n)
    return candidates[-1] if candidates else None


def audit(run_dir: str | Path, public_data: str | Path | None = None, shadow_per_class: int = 2,
          shadow_skew: float = 0.8) -> dict:
    """Score the bias-direction attack on every recorded round, and with ``public_data`` the shadow-client
    attack (under ``"shadow"``); writes ``<run>/audit/audit.json``."""
    check_shadow_settings(shadow_per_class, shadow_skew)
    result = bias_attack(Path(run_dir))
    if public_data is not None:
        result["shadow"] = shadow_attack(Path(run_dir), Path(public_data), shadow_per_class, shadow_skew)
    return _write(Path(run_dir), result)


def _recorded(run_path: Path) -> tuple[list[Path], list[int], int]:
    """The recorded rounds, each client's true dominant class, and the number of classes."""
    run = RunDir(run_directory(run_path))
    folder = run.path / AUDIT_DIR
    rounds = sorted(folder.glob("round-*.safetensors"))
    if not rounds:
        raise RunDirError(f"{run.path} has no recorded updates ({folder}/round-*.safetensors): run it with "
                          "--audit (config key audit = true)")
    partition = Partition.load(run.path / "partition.json")
    if not partition.clients:
        raise RunDirError(f"{run.path}: the clients brought their own data (partition = 'own'); the audit scores "
                          "its guesses against each client's drawn class proportions, which such a run never has")
    return rounds, [int(np.argmax(c.proportions)) for c in partition.clients], len(partition.clients[0].proportions)


def _round_of(path: Path) -> int:
    """The round of an audit record (``round-<r>.safetensors``)."""
    return int(path.stem.split("-")[1])


def _changes(path: Path) -> dict[int, dict[str, torch.Tensor]]:
    """One round's record: each client's change of the global track, as the server received it."""
    by_client: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in load_tensors(path).items():
        cid, name = key.split("/", 1)
        by_client.setdefault(int(cid), {})[name] = tensor
    return by_client


def _score(guesses_per_round: list[tuple[int, dict[int, int]]], truth: list[int]) -> dict:
    per_round = [{"round": r, "guesses": {str(c): g for c, g in guessed.items()},
                  "accuracy": sum(g == truth[c] for c, g in guessed.items()) / len(guessed)}
                 for r, guessed in guesses_per_round]
    count = sum(len(g) for _, g in guesses_per_round)
    hits = sum(g == truth[c] for _, guessed in guesses_per_round for c, g in guessed.items())
    return {"accuracy": hits / count, "guesses": count, "truth": truth, "rounds": per_round}


def bias_attack(run_path: Path) -> dict:
    rounds, truth, num_classes = _recorded(run_path)
    per_round = []
    for path in rounds:
        by_client = _changes(path)
        bias = bias_name(sorted({n for c in by_client.values() for n in c}))
        if bias is None:
            return {"attack": "classifier_bias", "available": False, "chance": 1 / num_classes,
                    "reason": "the updates carry no classifier bias (the head stays on the clients)", "rounds": []}
        guesses = {cid: int(np.argmax(change[bias].double().numpy())) for cid, change in sorted(by_client.items())}
        per_round.append((_round_of(path), guesses))
    return {"attack": "classifier_bias", "available": True, "tensor": bias, "chance": 1 / num_classes,
            **_score(per_round, truth)}


def _flat(change: dict[str, torch.Tensor]) -> np.ndarray:
    return torch.cat([change[n].double().flatten() for n in sorted(change)]).numpy()


def check_shadow_settings(per_class: int, skew: float) -> None:
    """The shadow attack's settings (``--shadow-per-class``, ``--shadow-skew``), refused before any work."""
    if not per_class >= 1:
        raise ConfigError(f"--shadow-per-class must be >= 1 (shadow clients per class and round), got {per_class!r}")
    if not 0 < skew <= 1:  # NaN fails too
        raise ConfigError(f"--shadow-skew must be in (0, 1] (the share of a shadow client's rows from its dominant "
                          f"class), got {skew!r}")


def read_public(cfg: ExperimentConfig, public_data: Path) -> TextSplit:
    """The public rows, which must hold every class of the run: each class gets shadow clients dominated by it
    (the class count is the run's, never the file's largest label)."""
    public = read_csv_split(public_data, cfg.text_columns, cfg.label_column, cfg.num_labels)
    missing = [k for k in range(cfg.num_labels) if not (public.labels == k).any()]
    if missing:
        names = ", ".join(f"{k} ({cfg.class_names[k]})" for k in missing)
        raise DataError(f"{public_data} has no rows of class{'es' if len(missing) > 1 else ''} {names}; the shadow "
                        f"attack trains shadow clients dominated by each of the run's {cfg.num_labels} classes: "
                        "give public rows of every class")
    return public


def shadow_rows(labels: np.ndarray, num_classes: int, dominant: int, size: int, skew: float,
                rng: np.random.Generator) -> list[int]:
    """``size`` public rows, ``skew`` of them of class ``dominant``, the rest spread evenly over the others."""
    proportions = np.full(num_classes, (1 - skew) / (num_classes - 1))
    proportions[dominant] = skew
    rows = []
    for k, count in enumerate(counts_for(proportions, size)):
        pool = np.flatnonzero(labels == k)
        if len(pool) < count:
            raise RunDirError(f"the public data holds {len(pool)} rows of class {k}; a shadow client needs {count}")
        rows += rng.choice(pool, size=count, replace=False).tolist()
    return rows


def shadow_attack(run_path: Path, public_data: Path, per_class: int = 2, skew: float = 0.8) -> dict:
    """The nearest-centroid attack fit each round on shadow clients trained from that round's global track."""
    check_shadow_settings(per_class, skew)
    rounds, truth, num_classes = _recorded(run_path)
    if not (run_path / AUDIT_DIR / f"global-{_round_of(rounds[0]):04d}.safetensors").is_file():
        raise RunDirError(f"{run_path} recorded no global track per round (audit/global-<r>.safetensors; runs "
                          "audited before the shadow attack existed): run it again with --audit")
    cfg: ExperimentConfig = dataclasses.replace(load_config(run_path / "config.toml"), upload_codec="fp32",
                                                download_codec="fp32", audit=False)
    public = read_public(cfg, public_data)
    tokenizer = load_tokenizer(cfg.backbone)
    model = TrackedModel(cfg, tokenizer)
    rng = np.random.default_rng([cfg.seed, 0x5AD0])
    per_round = []
    with tempfile.TemporaryDirectory(prefix="fedslip-shadow-") as scratch:
        for path in rounds:
            round_idx = _round_of(path)
            start = load_tensors(run_path / AUDIT_DIR / f"global-{round_idx:04d}.safetensors")
            centroids = []
            for k in range(num_classes):
                directions = []
                for j in range(per_class):
                    rows = shadow_rows(public.labels, num_classes, k, cfg.samples_per_client, skew, rng)
                    data = encode(tokenizer, public, rows, cfg.max_seq_len)
                    shadow = Client(1_000_000 + k * per_class + j, cfg, model, tokenizer, data, data,
                                    Path(scratch) / f"round{round_idx}-{k}-{j}")
                    sent = comm.decode(shadow.fit(comm.encode(start), round_idx).payload)
                    v = _flat({n: sent[n] - start[n] for n in start})
                    directions.append(v / (np.linalg.norm(v) or 1.0))
                centroids.append(np.mean(directions, axis=0))
            centroids = np.stack(centroids)
            centroids /= np.linalg.norm(centroids, axis=1, keepdims=True).clip(min=1e-30)
            per_round.append((round_idx, {cid: int(np.argmax(centroids @ _flat(change)))
                                          for cid, change in sorted(_changes(path).items())}))
    return {"attack": "shadow_nearest_centroid", "available": True, "public_data": str(public_data),
            "shadow_per_class": per_class, "shadow_skew": skew, "chance": 1 / num_classes,
            **_score(per_round, truth)}


def _write(run_path: Path, result: dict) -> dict:
    write_json(run_path / AUDIT_DIR / "audit.json", result)
    return result


def table(result: dict) -> str:
    lines = []
    for attack in [result] + ([result["shadow"]] if "shadow" in result else []):
        if not attack["available"]:
            lines.append(f"attack {attack['attack']}: not available ({attack['reason']}); chance "
                         f"{attack['chance']:.2f}")
            continue
        on = f" on {attack['tensor']}" if "tensor" in attack else ""
        lines += [f"attack {attack['attack']}{on}: accuracy {attack['accuracy']:.2f} over {attack['guesses']} "
                  f"guesses (chance {attack['chance']:.2f})", "round  accuracy"]
        lines += [f"{r['round']:>5}  {r['accuracy']:.2f}" for r in attack["rounds"]]
    return "\n".join(lines)

