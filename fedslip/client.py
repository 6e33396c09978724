"""One client: the local training step of every method, evaluation, and its private state.

The method's math, per batch (x, y), with g = global track, p = private track (LoRA, plus the
private head where ``private_head`` is set):

* ``global_only`` (fedavg_lora)::

      L_g = CE(f(x; g), y) + (mu/2) * sum_t ||g_t - g_t^round||^2          -> updates g

* ``joint`` (dual_naive)::

      L = CE(f(x; g + p), y) + (mu/2) * sum_t ||g_t - g_t^round||^2         -> updates g and p

* ``separated`` (fedslip), clean optimization separation::

      L_g = CE(f(x; g), y) + (mu/2) * sum_t ||g_t - g_t^round||^2          -> updates g only
      L_p = CE(f(x; sg[g] + p), y)                                         -> updates p only

  ``sg[.]`` = stop-gradient: the private loss sees the global track as constants (``detach=false``
  lets L_p reach g too, as an ablation). Each track has its own AdamW and learning rate. With
  ``private_every = k`` the private loss is taken on every k-th batch only (a cheaper schedule).
  With ``private_phase = "first"`` each round starts with a private phase (L_p alone, g = the global
  track as received, the one the private track will be combined with), then the global phase (L_g
  alone); ``interleaved`` takes both losses on the same batches (``step_schedule``).

* ``ditto`` (Li et al. 2021): the private track p is a whole personal model of the global track's
  shape (its own LoRA and classifier), used alone at inference::

      L_g = CE(f(x; g), y)                                                  -> updates g
      L_p = CE(f(x; p), y) + (lambda/2) * sum_t ||p_t - g_t^round||^2       -> updates p

  with g^round the global track received this round and lambda = ``ditto_lambda``.

* partial sharing (fedper, fedrep, fedbabu, fedsa_lora): one track g = (s, l), shared parts s and
  local parts l (``local_params``: the head, or the LoRA B matrices) that never leave the client::

      L = CE(f(x; s, l), y)     -> updates s and l (joint) | l, then s (first) | s only (frozen)

Each loss names the tensors it trains (``backward(inputs=...)``), so the gradient a tensor receives
depends only on the losses of this step, never on what an earlier call left behind: FedProx adds
exactly mu * (g_t - g_t^round) to every global tensor's gradient, and nothing to private ones.

K-step (after the last round, the same protocol for every method): exactly ``kstep`` AdamW steps on
the client's own training rows, at one learning rate ``kstep_lr``, no FedProx, on the loss of the
method's inference model (the parameters its zero-shot prediction uses)::

      L_K = CE(f(x; inference tracks), y)     -> updates kstep_parameters (``kstep_params``)

``inference`` trains every tensor of the inference model (fedslip: g and p together on
CE(f(x; g + p)), the mask kept; ditto: the personal model; partial sharing: shared and local parts;
local: the client's whole adapter; feddpa_fixed: g and p on its mix; feddpa: g and p on each row's
instance-wise mix, the weights constants of the inputs), ``head`` only its classifier head (FedBABU's
head-only variant).

* ``local``: partial sharing with every part local (s empty): L = CE(f(x; l), y) -> updates l; nothing is
  averaged or sent, so each client's model is what it trains alone on its own rows.

* FedDPA (Yang et al., NeurIPS 2024; feddpa_fixed, feddpa): the separated objective with the tracks mixed,
  a = ``private_weight``::

      L_g = CE(f(x; g), y)                                 -> updates g
      L_p = CE(f(x; (1 - a) * sg[g] + a * p), y)           -> updates p (a private phase first each round)

  inference: feddpa_fixed f(x; (1 - a) * g + a * p); feddpa f(x; alpha(x) * g + (1 - alpha(x)) * p) with
  alpha(x) = w * mean_j cos(e(x), e(x_j)) over the client's reference rows x_j (``instance_weight`` = w;
  ``model.py`` docstring: the rule of the reference code and its source file).

The private track trains only in rounds ``private_warmup_rounds < r`` and (if set)
``r <= private_freeze_round``; its magnitude-pruning mask (LoRA tensors only, never the private head)
is applied after every step (``masking.py``). It lives in ``<state_dir>/private.safetensors``
(+ ``mask.safetensors``, ``rewind.safetensors``) and is never part of a reply.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm  # the text bar: tqdm.auto wants ipywidgets in a notebook and warns without them

from . import codecs, comm, masking, privacy
from .config import ExperimentConfig
from .data import Encoded, batch_rows, collate, eval_batches, train_batches
from .model import GLOBAL, PRIVATE, TrackedModel, shape_mismatch
from .storage import StateFileError, load_tensors_and_metadata, read_json, read_metadata, save_tensors, write_json
from .views import GLOBAL_TEST_VIEW, SERVER_MODEL_VIEW, View


def proximal_term(params: dict[str, torch.nn.Parameter], reference: dict[str, torch.Tensor],
                  mu: float) -> torch.Tensor:
    """FedProx: (mu/2) * sum over the global track's tensors of ||w - w_round||_2^2."""
    total = sum(((p - reference[n]) ** 2).sum() for n, p in params.items())
    return 0.5 * mu * total


def private_trains(cfg: ExperimentConfig, round_idx: int) -> bool:
    """Private schedule: frozen during warmup rounds and after the freeze round."""
    if not cfg.private_track or round_idx <= cfg.private_warmup_rounds:
        return False
    return cfg.private_freeze_round == 0 or round_idx <= cfg.private_freeze_round


def local_steps(cfg: ExperimentConfig, num_examples: int) -> int:
    if cfg.local_steps:
        return cfg.local_steps
    return cfg.local_epochs * -(-num_examples // cfg.batch_size)


def run_seed(*parts: int) -> int:
    """A seed for one (run seed, round, client, purpose) tuple, stable across processes."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


@dataclass
class TrainResult:
    steps: int  # batches (local optimizer steps; a batch that trains both tracks counts once)
    loss: float  # mean CE of the global-track objective (global-only logits; combined for joint)
    private_loss: float | None  # mean CE of the private objective (separated only)
    sample_passes: int = 0  # forward/backward passes x rows: a batch whose two losses train is counted twice


def reference_passes(data: Encoded, cfg: ExperimentConfig, seed: int) -> int:
    """What one round of fedavg_lora costs this client: the rows of ``local_steps`` batches, each with one
    forward/backward pass (the same batch stream ``train_local`` draws). The unit of "training passes vs
    fedavg_lora" (``rounds._summary``)."""
    generator = torch.Generator().manual_seed(seed)
    return sum(map(len, batch_rows(data, cfg.batch_size, generator, local_steps(cfg, len(data)), cfg.group_by_length)))


def backward_step(model: TrackedModel, batch: dict[str, torch.Tensor], cfg: ExperimentConfig,
                  train_private: bool, prox_reference: dict | None, mu: float,
                  train_global: bool = True, train_local_parts: bool = False) -> tuple[float | None, float | None]:
    """Compute the configured objective on one batch and accumulate its gradients (module docstring).

    Returns (CE that trains the global track or None, CE that trains the private track or None).
    ``train_global=False`` (the separated objective's private phase) takes the private loss alone.
    ``train_local_parts``: the global adapter's local parts (partial sharing) learn from the same
    global-only loss; FedProx never covers them (they are not averaged).
    """
    labels = batch["labels"].to(model.device)
    if cfg.objective == "ditto":
        return ditto_step(model, batch, cfg, train_private, prox_reference, train_global)
    g_params = ((list(model.global_params.values()) if train_global else [])
                + (list(model.local_params.values()) if train_local_parts else []))
    p_params = list(model.private_params.values()) if train_private else []
    prox = proximal_term(model.global_params, prox_reference, mu) if mu and train_global else 0.0
    if cfg.objective == "joint":
        ce = F.cross_entropy(model.logits(batch, model.inference_tracks()), labels)
        (ce + prox).backward(inputs=g_params + p_params)
        return ce.item(), None
    ce = None
    if g_params:  # global_only and separated: the global track learns from global-only logits
        ce = F.cross_entropy(model.logits(batch, (GLOBAL,)), labels)
        (ce + prox).backward(inputs=g_params)
    global_loss = ce.item() if ce is not None else None
    if cfg.objective != "separated" or not train_private:
        return global_loss, None
    # private: combined logits; with detach the global track is a constant here (sg[g])
    ce_p = F.cross_entropy(model.logits(batch, (GLOBAL, PRIVATE)), labels)
    ce_p.backward(inputs=p_params if cfg.detach or not train_global else g_params + p_params)
    return global_loss, ce_p.item()


class Step(NamedTuple):
    """Which tensors one local batch trains."""

    shared: bool  # the global track (what travels)
    private: bool  # the private track
    local: bool = False  # the global adapter's local parts (partial sharing)


def ditto_step(model: TrackedModel, batch: dict[str, torch.Tensor], cfg: ExperimentConfig, train_private: bool,
               received: dict | None, train_global: bool) -> tuple[float | None, float | None]:
    """Ditto on one batch: plain CE for the global track (FedAvg; FedProx if configured), and for the
    personal model CE on its own logits plus (lambda/2) * ||p - g_round||^2, g_round the global track
    received this round (``received``; None in K-step: no proximal term)."""
    labels = batch["labels"].to(model.device)
    global_loss = private_loss = None
    if train_global:
        ce = F.cross_entropy(model.logits(batch, (GLOBAL,)), labels)
        prox = proximal_term(model.global_params, received, cfg.fedprox_mu) if cfg.fedprox_mu and received else 0.0
        (ce + prox).backward(inputs=list(model.global_params.values()))
        global_loss = ce.item()
    if train_private:
        ce_p = F.cross_entropy(model.logits(batch, (PRIVATE,)), labels)
        toward = 0.0
        if received is not None and cfg.ditto_lambda:
            reference = {n: received[model.global_name(n)] for n in model.private_params}
            toward = proximal_term(model.private_params, reference, cfg.ditto_lambda)
        (ce_p + toward).backward(inputs=list(model.private_params.values()))
        private_loss = ce_p.item()
    return global_loss, private_loss


def step_schedule(cfg: ExperimentConfig, steps: int, train_private: bool) -> list[Step]:
    """What each local batch of a round trains.

    ``interleaved``: every batch trains the global track, every ``private_every``-th also the private
    one. ``first``: a private phase of ``private_local_steps`` batches (0 = ceil(steps / private_every))
    against the global track as received this round (sg[g_round]), then ``steps`` global-only batches.
    Local parts (``local_params``) train with the global track (``local_phase = "joint"``: FedPer,
    FedSA-LoRA), in a phase of their own first (``"first"``: FedRep's head phase, body frozen, then the
    body with the head frozen), or not at all during federation (``"frozen"``: FedBABU; K-step trains
    them, ``kstep_train``).
    """
    local = bool(cfg.local_params)
    if local and cfg.local_phase == "frozen":
        return [Step(True, False, False)] * steps
    if local and cfg.local_phase == "first":
        return [Step(False, False, True)] * (cfg.local_first_steps or steps) + [Step(True, False, False)] * steps
    if train_private and cfg.private_phase == "first":
        private_steps = cfg.private_local_steps or -(-steps // cfg.private_every)
        return [Step(False, True)] * private_steps + [Step(True, False)] * steps
    return [Step(True, train_private and i % cfg.private_every == 0, local) for i in range(steps)]


def train_local(model: TrackedModel, tokenizer, data: Encoded, cfg: ExperimentConfig, steps: int,
                train_private: bool, mask: masking.Mask | None, prox_reference: dict | None,
                seed: int, desc: str = "local", lr: float | None = None) -> TrainResult:
    """Run the round's local optimizer steps (``step_schedule``) of the configured objective, each track
    with its own AdamW (the global track's, with its local parts, at ``lr``, default ``cfg.lr``)."""
    torch.manual_seed(seed)  # dropout
    generator = torch.Generator().manual_seed(seed)
    g_params, p_params = model.global_params, model.private_params
    opt_g = torch.optim.AdamW([*g_params.values(), *model.local_params.values()], lr=lr or cfg.lr,
                              weight_decay=cfg.weight_decay)
    opt_p = (torch.optim.AdamW(p_params.values(), lr=cfg.private_lr, weight_decay=cfg.weight_decay)
             if train_private else None)
    mu = cfg.fedprox_mu if prox_reference is not None else 0.0
    if mu or (cfg.objective == "ditto" and prox_reference is not None):  # ditto pulls p toward it
        prox_reference = {n: t.to(model.device) for n, t in prox_reference.items()}
    losses, private_losses, passes = [], [], 0
    model.model.train()
    schedule = step_schedule(cfg, steps, train_private)
    batches = train_batches(tokenizer, data, cfg.batch_size, generator, len(schedule), cfg.group_by_length)
    for (global_now, private_now, local_now), batch in zip(schedule, tqdm(batches, total=len(schedule), desc=desc,
                                                                           leave=False, disable=None)):
        opt_g.zero_grad(set_to_none=True)
        if opt_p:
            opt_p.zero_grad(set_to_none=True)
        loss, private_loss = backward_step(model, batch, cfg, private_now, prox_reference, mu, global_now, local_now)
        if loss is not None:
            losses.append(loss)
        if private_loss is not None:
            private_losses.append(private_loss)
        passes += len(batch["labels"]) * ((loss is not None) + (private_loss is not None))
        if global_now or local_now:
            opt_g.step()
        if private_now:
            if mask is not None:
                masking.mask_gradients(p_params, mask)
            opt_p.step()
            if mask is not None:
                masking.apply_mask(p_params, mask)
    return TrainResult(steps=len(schedule), loss=float(np.mean(losses)) if losses else float("nan"),
                       private_loss=float(np.mean(private_losses)) if private_losses else None, sample_passes=passes)


HEAD_MARKS = (".modules_to_save.", f"head.{PRIVATE}.")  # peft's copy of the head modules; the private head


def kstep_parameters(model: TrackedModel, cfg: ExperimentConfig) -> dict[str, torch.nn.Parameter]:
    """What K-step fine-tunes: every trainable tensor of the inference model (``kstep_params =
    "inference"``: the global track with its local parts where it runs, the private track where it
    runs), or only its classifier head (``"head"``)."""
    tracks = model.inference_tracks()
    params = {**(model.global_params if GLOBAL in tracks else {}), **(model.local_params if GLOBAL in tracks else {}),
              **(model.private_params if PRIVATE in tracks else {})}
    if cfg.kstep_params == "head":
        params = {n: p for n, p in params.items() if any(mark in n for mark in HEAD_MARKS)}
    return params


def kstep_train(model: TrackedModel, tokenizer, data: Encoded, cfg: ExperimentConfig, steps: int,
                mask: masking.Mask | None, seed: int, desc: str = "k-step",
                reference: dict[str, torch.Tensor] | None = None) -> TrainResult:
    """K-step (module docstring): ``steps`` AdamW steps at ``kstep_lr`` (0 = ``lr``) on the inference
    model's CE, training ``kstep_parameters`` together; the private mask stays applied. ``reference``: the
    client's reference rows (feddpa's instance-wise weight, ``Client.reference``)."""
    torch.manual_seed(seed)  # dropout
    generator = torch.Generator().manual_seed(seed)
    params = kstep_parameters(model, cfg)
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.kstep_lr or cfg.lr, weight_decay=cfg.weight_decay)
    tracks = model.inference_tracks()
    losses, passes = [], 0
    model.model.train()
    batches = train_batches(tokenizer, data, cfg.batch_size, generator, steps, cfg.group_by_length)
    for batch in tqdm(batches, total=steps, desc=desc, leave=False, disable=None):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model.logits(batch, tracks, reference), batch["labels"].to(model.device))
        loss.backward(inputs=list(params.values()))
        if mask is not None:
            masking.mask_gradients(model.private_params, mask)
        optimizer.step()
        if mask is not None:
            masking.apply_mask(model.private_params, mask)
        losses.append(loss.item())
        passes += len(batch["labels"])
    return TrainResult(steps=steps, loss=float(np.mean(losses)) if losses else float("nan"), private_loss=None,
                       sample_passes=passes)


@torch.inference_mode()
def evaluate(model: TrackedModel, tokenizer, data: Encoded, tracks: tuple[str, ...], batch_size: int,
             num_labels: int, reference: dict[str, torch.Tensor] | None = None) -> dict:
    """Accuracy, mean CE and per-class correct/total counts of ``tracks`` on ``data`` (``reference``: as
    ``TrackedModel.logits``)."""
    correct = torch.zeros(num_labels, dtype=torch.long)
    total = torch.zeros(num_labels, dtype=torch.long)
    loss_sum = 0.0
    with model.eval_mode():
        for _, batch in eval_batches(tokenizer, data, batch_size):
            logits = model.logits(batch, tracks, reference).cpu()
            labels = batch["labels"]
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            hit = logits.argmax(-1) == labels
            total += torch.bincount(labels, minlength=num_labels)
            correct += torch.bincount(labels[hit], minlength=num_labels)
    n = int(total.sum())
    return {"accuracy": float(correct.sum()) / n if n else None,  # no rows (no global validation set): null
            "loss": loss_sum / n if n else None,
            "correct_per_class": correct.tolist(), "total_per_class": total.tolist()}


class PrivateStore:
    """A client's private state directory: private track, magnitude-pruning mask, rewind point, and with
    lossy codecs the global track it holds (``reference``) and its error-feedback ``residual``.

    ``private.safetensors`` and ``mask.safetensors`` carry the round they were written after (in the
    safetensors metadata); the previous generation is kept as ``*.prev.safetensors``. Loading "before
    round r" takes the newest generation written after a round < r, so a client whose round r was
    interrupted (or not committed by the server's checkpoint) resumes from exactly round r-1. Saving
    round r again (a retried round) replaces only the current generation, so the last committed one
    survives any number of retries. Every load is validated (finite weights, a 0/1 mask, the model's
    names and shapes); a file that fails is an error naming it, never silently replaced.
    """

    KINDS = ("private", "mask", "rewind", "reference", "residual")

    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir)

    def path(self, what: str, previous: bool = False) -> Path:
        assert what in self.KINDS, what
        return self.dir / f"{what}{'.prev' if previous else ''}.safetensors"

    @property
    def rows_path(self) -> Path:
        """``rows.json``: the fingerprint of the rows this client's state was made with (``Client.check_rows``)."""
        return self.dir / "rows.json"

    def exists(self, what: str) -> bool:
        return self.path(what).is_file()

    @staticmethod
    def _round(path: Path, meta: dict[str, str]) -> int:
        """The round a generation was written after (its safetensors metadata)."""
        try:
            return int(meta.get("round", 0))
        except ValueError:
            raise StateFileError(f"{path}: metadata round {meta.get('round')!r} is not a round number") from None

    def load(self, what: str, before_round: float = float("inf"),
             expected: dict[str, torch.Size] | None = None) -> dict[str, torch.Tensor] | None:
        """Newest generation of ``what`` written after a round < ``before_round``: None if this client
        never wrote one. ``expected``: the names and shapes it must have."""
        for previous in (False, True):  # the current generation is always the newer one
            path = self.path(what, previous)
            if path.is_file():
                tensors, meta = load_tensors_and_metadata(path)
                if self._round(path, meta) < before_round:
                    check_state(path, tensors, what, expected)
                    return {n: t.bool() for n, t in tensors.items()} if what == "mask" else tensors
        if any(self.path(what, previous).is_file() for previous in (False, True)):
            raise StateFileError(f"{self.dir}: no {what} state written before round {before_round} (only later "
                                 "generations); refusing to start the private track over silently")
        return None

    def load_round(self, what: str, round_idx: int, expected: dict[str, torch.Size]) -> dict[str, torch.Tensor] | None:
        """The generation of ``what`` written after exactly ``round_idx``, or None if neither is."""
        for previous in (False, True):
            path = self.path(what, previous)
            if path.is_file() and self._round(path, read_metadata(path)) == round_idx:
                tensors, _ = load_tensors_and_metadata(path)
                check_state(path, tensors, what, expected)
                return tensors
        return None

    def save(self, what: str, tensors: dict[str, torch.Tensor], round_idx: int) -> None:
        """Write a new generation; the current one becomes ``*.prev`` unless it is an earlier attempt of
        this same round (atomic renames and writes)."""
        if what == "mask":
            tensors = {n: t.to(torch.uint8) for n, t in tensors.items()}
        current = self.path(what)
        if what != "rewind" and current.is_file() and self._round(current, read_metadata(current)) < round_idx:
            os.replace(current, self.path(what, previous=True))
        save_tensors(current, tensors, metadata={"round": str(round_idx)})


def check_state(path: Path, tensors: dict[str, torch.Tensor], what: str,
                expected: dict[str, torch.Size] | None) -> None:
    """A private state file as the model needs it: the expected names and shapes, finite weights, and a
    mask of 0s and 1s. Tampered or damaged state is refused here, naming the file, before it is used."""
    problem = shape_mismatch(tensors, expected) if expected is not None else None
    if problem:
        raise StateFileError(f"{path}{problem}")
    for n, t in tensors.items():
        if what == "mask" and not bool(((t == 0) | (t == 1)).all()):
            raise StateFileError(f"{path}: mask {n} holds values other than 0 and 1")
        if what != "mask" and not bool(torch.isfinite(t).all()):
            raise StateFileError(f"{path}: {n} holds NaN or Inf")


class TrainingDiverged(RuntimeError):
    """Local training produced NaN or Inf weights (usually a learning rate too high): nothing is saved or
    sent, so the client's state stays as of its last good round and the server never sees the update."""


def check_finite(tensors: dict[str, torch.Tensor], round_idx: int) -> None:
    bad = next((n for n, t in tensors.items() if not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise TrainingDiverged(f"local training diverged in round {round_idx}: {bad} holds NaN or Inf (a learning "
                               "rate too high?); nothing of this round is saved or sent")


@dataclass
class FitReply:
    payload: bytes
    num_examples: int
    metrics: dict
    wire_bytes: int  # size of the reply as the engine carried it (the payload, or the Flower message)


class ClientRowsChanged(ValueError):
    """A client's rows differ from those it started the run with (a changed data file or data-path)."""


class Client:
    """A federated client. ``fit`` and ``evaluate`` take and return serialized payloads only, so any
    engine (in-process or Flower) can carry the messages."""

    def __init__(self, cid: int, cfg: ExperimentConfig, model: TrackedModel, tokenizer, train: Encoded,
                 test: Encoded, state_dir: Path, global_test: Encoded | None = None, noise_secret: str | None = None):
        self.cid, self.cfg, self.model, self.tokenizer = cid, cfg, model, tokenizer
        self.noise_secret = noise_secret  # local DP: mixed into the seed of this client's noise
        self.train, self.test, self.global_test = train, test, global_test
        self.store = PrivateStore(state_dir)
        self.uses_mask = cfg.private_track and cfg.private_target_sparsity > 0
        self.upload, self.download = codecs.of(cfg, "upload"), codecs.of(cfg, "download")
        self._rows_checked = False

    def check_rows(self) -> None:
        """Refuse to go on with rows other than those this client started the run with. The first call of a
        run records their fingerprint in the state directory (``rows.json``); a resumed run, a later
        ``fedslip kstep`` or a restarted SuperNode compares against it. With ``partition = "own"`` only the
        client sees its file, so only the client can tell that it changed between a run and its resume."""
        if self._rows_checked:
            return
        record = {"train_rows": len(self.train), "eval_rows": len(self.test),
                  "sha256": hashlib.sha256((self.train.digest() + self.test.digest()).encode()).hexdigest()}
        path = self.store.rows_path
        if path.is_file():
            held = read_json(path)
            if held != record:
                held = held if isinstance(held, dict) else {}
                raise ClientRowsChanged(
                    f"client {self.cid}: its rows are not the ones it started this run with ({path}: "
                    f"{held.get('train_rows')} training / {held.get('eval_rows')} evaluation rows then, "
                    f"{record['train_rows']} / {record['eval_rows']} now, or the same counts with other "
                    "contents): its data file or data-path changed; restore it, or start a new run")
        else:
            write_json(path, record)
        self._rows_checked = True

    @property
    def reference(self) -> dict[str, torch.Tensor] | None:
        """FedDPA's reference rows (``instance_weight``): ``instance_reference_rows`` of this client's training
        rows, one seeded draw per client and run, collated as a batch; None for every other method."""
        if not self.cfg.instance_weight:
            return None
        generator = torch.Generator().manual_seed(run_seed(self.cfg.seed, 0, self.cid, 11))
        rows = sorted(torch.randperm(len(self.train), generator=generator)[:self.cfg.instance_reference_rows].tolist())
        return collate(self.tokenizer, self.train, rows)

    # --- private state --------------------------------------------------------------------
    def _load_private(self, before_round: float) -> masking.Mask | None:
        """Load this client's private track as of the end of the last round < ``before_round`` into the
        shared model (initializing it on first use). Returns its mask (None without one)."""
        if not self.model.has_client_state:
            return None
        weights = self.store.load("private", before_round, self.model.private_shapes())
        if weights is None:
            weights = self.model.fresh_private_state(run_seed(self.cfg.seed, 0, self.cid, 7))
            self.store.save("private", weights, 0)
            if self.uses_mask:
                self.store.save("mask", masking.full_mask(weights, self.model.private_lora), 0)
            if self.cfg.private_rewind_round == 0:
                self.store.save("rewind", weights, 0)
        self.model.load_private_state(weights)
        return self.store.load("mask", before_round, self.model.private_shapes(masked_only=True)) \
            if self.uses_mask else None

    def _end_of_round_private(self, round_idx: int, mask: masking.Mask | None, trained: bool) -> float:
        """Prune (if scheduled), rewind (if configured), persist. Returns the private sparsity."""
        weights = self.model.private_state()
        if self.cfg.private_rewind_round == round_idx and round_idx > 0:
            self.store.save("rewind", weights, round_idx)
        if mask is not None and trained and round_idx >= self.cfg.private_prune_start_round:
            rate = masking.step_rate(masking.sparsity(mask), self.cfg.private_target_sparsity,
                                     self.cfg.private_prune_rate)
            if rate > 0:
                mask = masking.prune(weights, mask, rate, self.cfg.private_prune_scope)
                if self.cfg.private_rewind_round >= 0 and self.store.exists("rewind"):
                    weights = self.store.load("rewind", expected=self.model.private_shapes())
                weights = {n: w * mask[n] if n in mask else w for n, w in weights.items()}
        if mask is not None:
            self.store.save("mask", mask, round_idx)
        self.store.save("private", weights, round_idx)
        return masking.sparsity(mask) if mask is not None else 0.0

    # --- the global track on the wire (codecs.py) -------------------------------------------------
    def receive(self, payload: bytes) -> tuple[dict[str, torch.Tensor], int | None]:
        """The global track a download carries, and the round it belongs to (None for fp32 weights,
        which say nothing about it). A compressed download is a change to the global track this client
        holds (its ``reference``); the sum is its new reference. A full-state download (the server's
        answer to a client that missed one) is decoded alone. Receiving the same download again (a
        retry, or evaluation then training on one round's global track) gives the same tensors."""
        tensors, meta = comm.read(payload)
        if "codec" not in meta:
            return tensors, None
        layout = self.model.global_shapes()
        if codecs.is_full(payload):  # it missed a download: the whole state, nothing to add it to
            return codecs.unpack_full(payload, self.download, layout), codecs.payload_rounds(payload)[1]
        change, base, round_idx = codecs.unpack(payload, self.download, layout)
        held = self.store.load_round("reference", round_idx, layout)
        if held is not None:  # applied before (a resumed server resends it): the sum it gave then
            return held, round_idx
        if base < 0:
            reference = {n: torch.zeros(shape) for n, shape in layout.items()}
        else:
            reference = self.store.load_round("reference", base, layout)
            if reference is None:
                raise comm.PayloadError(f"client {self.cid} holds no global track of round {base} to apply this "
                                        "download to (it missed a download)")
        state = codecs.apply(reference, change)
        self.store.save("reference", state, round_idx)
        return state, round_idx

    def reply_payload(self, received: dict[str, torch.Tensor], base_round: int, round_idx: int) -> bytes:
        """This client's global track as its upload: the weights (fp32), or the change from ``received``
        (the global track of ``base_round``) plus the error-feedback residual, whose unsent part becomes
        the next residual."""
        weights = self.model.global_state()
        if privacy.local(self.cfg):  # local DP: what leaves the client is already clipped and noised
            weights = privacy.privatize(weights, received, self.cfg, round_idx, self.cid, self.noise_secret)
        if self.upload.lossless:
            return comm.encode(weights)
        update = {n: weights[n] - received[n] for n in weights}
        if self.cfg.error_feedback:
            carried = self.store.load("residual", before_round=round_idx, expected=self.model.global_shapes())
            update = codecs.apply(update, carried) if carried is not None else update
        payload = codecs.pack(self.upload, update, base_round, round_idx)
        if self.cfg.error_feedback:
            sent, _, _ = codecs.unpack(payload, self.upload, self.model.global_shapes())
            self.store.save("residual", codecs.residual(update, sent), round_idx)
        return payload

    # --- federated API -----------------------------------------------------------------------
    def fit(self, payload: bytes, round_idx: int) -> FitReply:
        self.check_rows()
        global_state, received_round = self.receive(payload)
        self.model.load_global_state(global_state)
        mask = self._load_private(before_round=round_idx)
        trains_private = private_trains(self.cfg, round_idx)
        seed = run_seed(self.cfg.seed, round_idx, self.cid)
        result = train_local(self.model, self.tokenizer, self.train, self.cfg,
                             local_steps(self.cfg, len(self.train)), trains_private, mask,
                             global_state, seed, desc=f"round {round_idx} client {self.cid}")
        metrics = {"train_loss": result.loss, "private_train_loss": result.private_loss,
                   "steps": result.steps, "private_trained": trains_private, "sample_passes": result.sample_passes,
                   "reference_passes": reference_passes(self.train, self.cfg, seed)}
        check_finite({**self.model.global_state(), **self.model.private_state()}, round_idx)
        if self.model.has_client_state:
            sparsity = self._end_of_round_private(round_idx, mask, trains_private)
            if self.model.has_private:
                metrics["private_sparsity"] = sparsity
        base = round_idx - 1 if received_round is None else received_round
        payload = self.reply_payload(global_state, base, round_idx)
        return FitReply(payload, len(self.train), metrics, wire_bytes=len(payload))

    def evaluate(self, payload: bytes, views: Sequence[View] = (None,),
                 after_round: float = float("inf")) -> list[dict]:
        """Accuracy on this client's own test rows of each view: ``None`` = its inference model (global
        + its private track as of ``after_round``), the tracks named (``("global",)``), or
        ``GLOBAL_TEST_VIEW`` = its inference model on the balanced global test set, ``SERVER_MODEL_VIEW``
        = the global adapter with its local parts at their initial values (partial sharing). One call for
        all views, so a networked engine sends one message per client, not one per view."""
        self.check_rows()
        self.model.load_global_state(self.receive(payload)[0])
        self._load_private(before_round=after_round + 1)
        results = []
        for view in views:
            data, own_parts = self.test, None
            if view == GLOBAL_TEST_VIEW:
                if self.global_test is None:
                    raise ValueError(f"client {self.cid} holds no global test set")
                view, data = None, self.global_test
            elif view == SERVER_MODEL_VIEW:
                own_parts = self.model.private_state()
                self.model.reset_local()
                view = (GLOBAL,)
            results.append(evaluate(self.model, self.tokenizer, data, view or self.model.inference_tracks(),
                                    self.cfg.eval_batch_size, self.cfg.num_labels, self.reference))
            if own_parts is not None:
                self.model.load_private_state(own_parts)
        return results

    def kstep(self, payload: bytes, steps: int) -> dict:
        """Fine-tune the final inference model for ``steps`` steps (``kstep_train``), evaluate it; persists
        nothing. The result carries the K-step's ``sample_passes``."""
        self.check_rows()
        self.model.load_global_state(self.receive(payload)[0])
        mask = self._load_private(before_round=self.cfg.rounds + 1)
        result = kstep_train(self.model, self.tokenizer, self.train, self.cfg, steps, mask,
                             run_seed(self.cfg.seed, self.cfg.rounds + 1, self.cid), desc=f"k-step client {self.cid}",
                             reference=self.reference)
        return {**evaluate(self.model, self.tokenizer, self.test, self.model.inference_tracks(),
                           self.cfg.eval_batch_size, self.cfg.num_labels, self.reference),
                "sample_passes": result.sample_passes}
