"""The embedded engine: every client in this process, one after another, sharing one backbone.

Messages are the real serialized payloads (``comm.encode``), so byte counts equal what a networked
engine would carry for the same tensors.
"""

from __future__ import annotations

from typing import Optional

from ..client import Client, FitReply


class EmbeddedEngine:
    def __init__(self, clients: list[Client]):
        self.clients = clients

    def fit(self, payload: bytes, cids: list[int], round_idx: int) -> dict[int, FitReply]:
        return {cid: self.clients[cid].fit(payload, round_idx) for cid in cids}

    def evaluate(self, payload: bytes, tracks: Optional[tuple[str, ...]] = None) -> dict[int, dict]:
        return {c.cid: c.evaluate(payload, tracks) for c in self.clients}

    def kstep(self, payload: bytes, steps: int) -> dict[int, dict]:
        return {c.cid: c.kstep(payload, steps) for c in self.clients}
