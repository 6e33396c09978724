"""Engines move messages between the server and the clients; the round loop lives in ``fedslip.rounds``.

Every engine offers the same four calls, all over serialized payloads (safetensors bytes):
``embedded.EmbeddedEngine`` / ``embedded.ParallelEngine`` (this machine's processes) and
``flower.FlowerEngine`` (a Flower Grid: simulation or SuperLink/SuperNode deployment). Engines only
carry messages: starting the processes that carry them is ``fedslip.launch``'s job.
"""

from __future__ import annotations

from typing import Protocol

from ..client import FitReply
from ..views import View


class Engine(Protocol):
    def fit(self, payload: bytes, cids: list[int], round_idx: int
            ) -> tuple[dict[int, FitReply], dict[int, str], int]:
        """Train the sampled clients: replies, failures (reason), bytes sent."""

    def evaluate(self, payload: bytes, after_round: int, views: list[View], cids: list[int] | None = None
                 ) -> tuple[dict[int, list[dict]], dict[int, str]]:
        """The results of clients ``cids`` (default: every client) for each view on their own test rows,
        and failures."""

    def kstep(self, payload: bytes, steps: int) -> tuple[dict[int, dict], dict[int, str]]:
        """Every client fine-tunes the final model for ``steps`` steps and is evaluated; persists nothing."""

    def close(self) -> None: ...
