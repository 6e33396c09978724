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

Not implemented yet (issue 16): the learned attack on shadow clients the server simulates from public
data, and the measurements across methods and noise levels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .experiment import RunDir, RunDirError
from .partition import Partition
from .rounds import AUDIT_DIR
from .storage import load_tensors, write_json


def bias_name(names: list[str]) -> str | None:
    """The classifier's bias among the global track's tensor names (the last head module's copy)."""
    candidates = sorted(n for n in names if ".modules_to_save." in n and n.endswith(".bias") and "classifier" in n)
    return candidates[-1] if candidates else None


def audit(run_dir: str | Path) -> dict:
    """Score the bias-direction attack on every recorded round; writes ``<run>/audit/audit.json``."""
    run = RunDir(Path(run_dir))
    folder = run.path / AUDIT_DIR
    rounds = sorted(folder.glob("round-*.safetensors"))
    if not rounds:
        raise RunDirError(f"{run.path} has no recorded updates ({folder}/round-*.safetensors): run it with "
                          "--audit (config key audit = true)")
    partition = Partition.load(run.path / "partition.json")
    truth = [int(np.argmax(c.proportions)) for c in partition.clients]
    num_classes = len(partition.clients[0].proportions)
    per_round, hits, guesses = [], 0, 0
    bias = None
    for path in rounds:
        changes = load_tensors(path)
        by_client: dict[int, dict] = {}
        for key, tensor in changes.items():
            cid, name = key.split("/", 1)
            by_client.setdefault(int(cid), {})[name] = tensor
        names = sorted({n for c in by_client.values() for n in c})
        bias = bias_name(names)
        if bias is None:
            return _write(run.path, {"attack": "classifier_bias", "available": False, "chance": 1 / num_classes,
                                     "reason": "the updates carry no classifier bias (the head stays on the "
                                               "clients)", "rounds": []})
        guessed = {cid: int(np.argmax(change[bias].double().numpy())) for cid, change in sorted(by_client.items())}
        correct = sum(guessed[c] == truth[c] for c in guessed)
        hits, guesses = hits + correct, guesses + len(guessed)
        per_round.append({"round": int(path.stem.split("-")[1]), "guesses": {str(c): g for c, g in guessed.items()},
                          "accuracy": correct / len(guessed)})
    return _write(run.path, {"attack": "classifier_bias", "available": True, "tensor": bias,
                             "chance": 1 / num_classes, "accuracy": hits / guesses, "guesses": guesses,
                             "truth": truth, "rounds": per_round})


def _write(run_path: Path, result: dict) -> dict:
    write_json(run_path / AUDIT_DIR / "audit.json", result)
    return result


def table(result: dict) -> str:
    if not result["available"]:
        return f"attack {result['attack']}: not available ({result['reason']}); chance {result['chance']:.2f}"
    lines = [f"attack {result['attack']} on {result['tensor']}: accuracy {result['accuracy']:.2f} over "
             f"{result['guesses']} guesses (chance {result['chance']:.2f})", "round  accuracy"]
    lines += [f"{r['round']:>5}  {r['accuracy']:.2f}" for r in result["rounds"]]
    return "\n".join(lines)

