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
    """Each call takes ``payloads``: what each client it addresses receives (client id -> serialized
    payload; with a lossy download codec a client that missed a download gets another payload than the
    rest, ``server.Server.download_for``)."""

    def fit(self, payloads: dict[int, bytes], round_idx: int
            ) -> tuple[dict[int, FitReply], dict[int, str], int]:
        """Train the sampled clients: replies, failures (reason), bytes sent."""

    def evaluate(self, payloads: dict[int, bytes], after_round: int, views: list[View]
                 ) -> tuple[dict[int, list[dict]], dict[int, str]]:
        """The clients' results for each view on their own test rows, and failures."""

    def kstep(self, payloads: dict[int, bytes], steps: int) -> tuple[dict[int, dict], dict[int, str]]:
        """The clients fine-tune the final model for ``steps`` steps and are evaluated; persists nothing."""

    def close(self) -> None: ...
