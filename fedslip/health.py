"""Run health: the symptoms of a run that is learning nothing, flagged after every round.

A federated run that diverged or never left its prior still ends with exit code 0 and a normal-looking
log; on a new data set the AG News defaults (learning rates above all) are a trap. ``check_round`` looks
at the metrics history after each round and returns what a user must not miss:

- ``global_at_chance``: the global track's accuracy within ``CHANCE_MARGIN`` of chance (the share of the
  most frequent class in the global evaluation set: what a constant prediction gets);
- ``personalized_at_floor``: mean personalized accuracy at or below the clients' mean majority-class
  floor (each client's floor comes from the class counts of its own evaluation, which the client
  reports: the server never reads client labels);
- ``loss_not_finite``: a training loss that is NaN or infinite;
- ``loss_rising``: the mean training loss rose in each of the last two rounds, by ``RISE_FACTOR`` overall;
  when those rounds trained different clients (``fraction_fit`` < 1) their training losses are means over
  different data, so the global test loss (the same rows every round) is compared instead;
- ``client_behind``: a client's personalized accuracy more than ``CLIENT_GAP`` below the median of the
  clients (three or more clients evaluated);
- ``client_failed``: a client failed this round (training raised, its update was rejected, or its
  evaluation failed: the row's ``rejected`` and ``failed_evaluations``); from round 1, without waiting for
  a second round: the round's means then cover the clients that answered only, and a run built on them
  must not pass for a complete one (``fedslip report`` marks it and keeps it out of its verdict).

The three accuracy symptoms are flagged when they held in this round and the one before and the
accuracy did not improve by more than ``STUCK_GAIN`` in between; the global one from round 2 on, the
personalized ones from round 3 on (``FIRST_ROUND``): FedAvg on skewed clients often sits below its
clients' floors, or swings, in rounds 1-2 (measured on the committed runs in docs/results) and climbs
past them; a run that learns nothing stays.

Each entry names the round, the symptom, the numbers and the usual cause and fix; ``fedslip.rounds`` logs
it as a warning, adds the round's entries to ``metrics.jsonl`` (``health``) and all of them to
``summary.json``; ``strict_health`` stops the run after the round's checkpoint (``HealthError``, exit
code 3 in the CLI).
"""

from __future__ import annotations

import math

import numpy as np

CHANCE_MARGIN = 0.02  # "within 2 points of chance"
CLIENT_GAP = 0.15  # a client this far below the median of the clients is flagged
RISE_FACTOR = 1.1  # a rise that batch-to-batch noise of a stuck model does not reach
STUCK_GAIN = 0.01  # an accuracy that rose more than this between two rounds is still learning
FIRST_ROUND = {"global_at_chance": 2, "personalized_at_floor": 3, "client_behind": 3}

TUNE_HINT = "tune the learning rates on validation rows: `fedslip tune --config X.toml --method M`"
ADVICE = {
    "global_at_chance": "the global track learned nothing beyond a constant prediction: usually a learning "
                        f"rate too high (diverged) or too low (stuck at the prior) for this data; {TUNE_HINT}",
    "personalized_at_floor": "the clients' models do no better than always predicting each client's most "
                             f"frequent class: nothing was learned beyond the clients' priors; {TUNE_HINT}",
    "loss_not_finite": "training diverged (the loss is NaN/inf): lower `lr` / `private_lr`, or use "
                       "`precision = \"fp32\"`",
    "loss_rising": "the training loss rose for two rounds in a row: the learning rate is probably too high "
                   f"for this data; {TUNE_HINT}",
    "client_behind": "one client's accuracy is far below the others': check its data (labels, size, "
                     "language) and its entries in client_failures",
    "client_failed": "the round's accuracies and update average over the clients that answered only, so the run "
                     "is not comparable with a complete one; the reason names the cause (client_failures in "
                     "summary.json lists every failure): fix it and run again",
}


class HealthError(RuntimeError):
    """Raised after a round's checkpoint when ``strict_health`` is set and the round has health entries."""

    @classmethod
    def of(cls, row: dict, run_path) -> HealthError:
        return cls(f"round {row['round']} failed its health checks (strict_health): "
                   f"{'; '.join(e['symptom'] + ': ' + e['detail'] for e in row['health'])}. "
                   f"The checkpoint of round {row['round']} is kept in {run_path}")


def majority_floor(total_per_class: list[int]) -> float | None:
    """Accuracy of always predicting the most frequent class of an evaluation (from its class counts)."""
    n = sum(total_per_class)
    return max(total_per_class) / n if n else None


def _entry(round_idx: int, symptom: str, detail: str, **values) -> dict:
    return {"round": round_idx, "symptom": symptom, "detail": detail, "advice": ADVICE[symptom], **values}


def _comparable_loss(rows: list[dict]) -> tuple[str, str]:
    """The loss whose rise over ``rows`` means the run is going wrong: the clients' mean training loss when
    the same clients trained in each row, else the global test loss (sampled clients: a round of clients
    with harder data is not a rising loss)."""
    participants = [tuple(h["participants"]) for h in rows if "participants" in h]
    if len(set(participants)) > 1:
        return "global_loss", "global test loss"
    return "train_loss", "mean training loss"


def check_round(history: list[dict]) -> list[dict]:
    """Health entries for the last row of ``history`` (metrics rows as in ``metrics.jsonl``, which carry
    ``global_chance`` and ``majority_floor_per_client``)."""
    row = history[-1]
    r = row["round"]
    found = _client_failed(row)
    loss = row.get("train_loss")
    if loss is not None and not math.isfinite(loss):
        found.append(_entry(r, "loss_not_finite", f"mean training loss {loss}", train_loss=loss))
    key, name = _comparable_loss(history[-3:])
    losses = [h.get(key) for h in history[-3:]]
    if (len(losses) == 3 and all(v is not None and math.isfinite(v) for v in losses)
            and losses[0] < losses[1] < losses[2] and losses[2] > RISE_FACTOR * losses[0]):
        found.append(_entry(r, "loss_rising", f"{name} " + " -> ".join(f"{v:.4f}" for v in losses),
                            **{key: losses}))
    if len(history) < 2:
        return found
    pair = history[-2:]
    if r >= FIRST_ROUND["global_at_chance"] and stuck(pair, _global_at_chance):
        glob, chance = _global_at_chance(row)
        found.append(_entry(r, "global_at_chance", f"global accuracy {100 * glob:.1f}% vs chance "
                            f"{100 * chance:.1f}%", accuracy=glob, chance=chance))
    if r >= FIRST_ROUND["personalized_at_floor"] and stuck(pair, _personalized_at_floor):
        personal, floor = _personalized_at_floor(row)
        found.append(_entry(r, "personalized_at_floor", f"personalized accuracy {100 * personal:.1f}% vs the "
                            f"clients' majority-class floor {100 * floor:.1f}%", accuracy=personal, floor=floor))
    for cid in range(len(row.get("personalized_accuracy_per_client") or []) if r >= FIRST_ROUND["client_behind"]
                     else 0):
        behind = lambda h, c=cid: _client_behind(h, c)  # noqa: E731
        if stuck(pair, behind):
            acc, median = behind(row)
            found.append(_entry(r, "client_behind", f"client {cid}: personalized accuracy {100 * acc:.1f}% "
                                f"vs the clients' median {100 * median:.1f}%", client=cid, accuracy=acc,
                                median=median))
    return found


def _client_failed(row: dict) -> list[dict]:
    """One entry naming every client that failed in this row's round, at any stage."""
    failures = [{"client": int(cid), "stage": stage, "reason": why}
                for stage, key in (("fit", "rejected"), ("evaluate", "failed_evaluations"))
                for cid, why in sorted((row.get(key) or {}).items(), key=lambda item: int(item[0]))]
    if not failures:
        return []
    detail = "; ".join(f"client {f['client']} ({f['stage']}): {f['reason']}" for f in failures)
    return [_entry(row["round"], "client_failed", detail, failures=failures)]


def stuck(pair: list[dict], symptom) -> bool:
    """``symptom(row)`` gives (accuracy, threshold) where the row shows it, else None: it must show in both
    rows, and the accuracy must not have risen by more than ``STUCK_GAIN`` from the first to the second."""
    found = [symptom(row) for row in pair]
    return all(f is not None for f in found) and found[1][0] - found[0][0] <= STUCK_GAIN


def _global_at_chance(row: dict) -> tuple[float, float] | None:
    glob, chance = row.get("global_accuracy"), row.get("global_chance")
    if glob is None or chance is None or glob > chance + CHANCE_MARGIN:
        return None
    return glob, chance


def _personalized_at_floor(row: dict) -> tuple[float, float] | None:
    floors = [f for f in row.get("majority_floor_per_client") or [] if f is not None]
    personal = row.get("personalized_accuracy")
    if personal is None or not floors or personal > float(np.mean(floors)):
        return None
    return personal, float(np.mean(floors))


def _client_behind(row: dict, cid: int) -> tuple[float, float] | None:
    per_client = row.get("personalized_accuracy_per_client") or []
    present = [a for a in per_client if a is not None]
    if len(present) < 3 or cid >= len(per_client) or per_client[cid] is None:
        return None
    median = float(np.median(present))
    return (per_client[cid], median) if per_client[cid] < median - CLIENT_GAP else None


def check_history(history: list[dict]) -> list[dict]:
    """Every round's entries of a whole metrics history (``metrics.jsonl`` rows), as the run would have
    logged them with these rules."""
    return [entry for r in range(1, len(history) + 1) for entry in check_round(history[:r])]


def message(entry: dict) -> str:
    """The warning line of one entry."""
    return f"health: round {entry['round']}: {entry['symptom']}: {entry['detail']}. {entry['advice']}"
