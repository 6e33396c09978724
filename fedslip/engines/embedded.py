"""The embedded engine: every client in this process, one after another, sharing one backbone.

Messages are the real serialized payloads (``comm.encode``), so byte counts equal what a networked
engine would carry for the same tensors. A client that raises is reported as failed for that call,
never a crash of the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from ..client import Client, FitReply

log = logging.getLogger("fedslip")
T = TypeVar("T")


def _each(clients: list[Client], cids: list[int], call: Callable[[Client], T], what: str
          ) -> tuple[dict[int, T], dict[int, str]]:
    results, failed = {}, {}
    for cid in cids:
        try:
            results[cid] = call(clients[cid])
        except Exception as e:  # one client's failure must not end the federation
            failed[cid] = f"{type(e).__name__}: {e}"
            log.warning("client %d failed during %s: %s", cid, what, failed[cid])
    return results, failed


class EmbeddedEngine:
    def __init__(self, clients: list[Client]):
        self.clients = clients
        self.all = [c.cid for c in clients]

    def fit(self, payload: bytes, cids: list[int], round_idx: int) -> tuple[dict[int, FitReply], dict[int, str]]:
        return _each(self.clients, cids, lambda c: c.fit(payload, round_idx), f"fit of round {round_idx}")

    def evaluate(self, payload: bytes, after_round: int, tracks: tuple[str, ...] | None = None
                 ) -> tuple[dict[int, dict], dict[int, str]]:
        return _each(self.clients, self.all, lambda c: c.evaluate(payload, tracks, after_round), "evaluate")

    def kstep(self, payload: bytes, steps: int) -> tuple[dict[int, dict], dict[int, str]]:
        return _each(self.clients, self.all, lambda c: c.kstep(payload, steps), "k-step")
