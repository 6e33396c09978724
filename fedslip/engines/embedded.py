"""The embedded engines: clients in this machine's processes, no server processes, no Ray.

``EmbeddedEngine`` runs clients one after another in this process, sharing one backbone.
``CentralizedEngine`` is the ``centralized`` reference method: one trainer holds the union of all
clients' training rows (same rows, same number of steps per round), nothing crosses a wire; the
clients still evaluate the resulting model on their own test rows. ``LocalEngine`` is the ``local``
reference method: each client trains its own adapter alone, nothing crosses a wire (0 bytes).
``ParallelEngine`` spreads them
over ``parallel_clients`` worker processes, each with its own backbone
and ``torch.set_num_threads(cores // N)`` (two 1-thread processes train faster here than one 2-thread
process). A client's work depends only on the payload, its own state directory and seeds derived
from (seed, round, client), so both give the same results for a seed.

Messages are the real serialized payloads (``comm.encode``), so byte counts equal what a networked
engine would carry for the same tensors. A client that raises is reported as failed for that call,
never a crash of the run.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from typing import Any

from ..client import Client, FitReply
from ..config import ExperimentConfig
from ..views import View

log = logging.getLogger("fedslip")
Call = tuple[str, int, tuple]  # (Client method, client id, arguments)


def _call(client: Client, method: str, args: tuple) -> tuple[bool, Any]:
    try:
        return True, getattr(client, method)(*args)
    except Exception as e:  # one client's failure must not end the federation
        return False, f"{type(e).__name__}: {e}"


class EmbeddedEngine:
    """Sequential clients in this process."""

    def __init__(self, clients: list[Client]):
        self.clients = clients

    def _run(self, calls: list[Call]) -> list[tuple[bool, Any]]:
        return [_call(self.clients[cid], method, args) for method, cid, args in calls]

    def _map(self, calls: list[Call]) -> tuple[dict[int, Any], dict[int, str]]:
        results, failed = {}, {}
        for (method, cid, _), (ok, value) in zip(calls, self._run(calls)):
            if ok:
                results[cid] = value
            else:
                failed[cid] = value
                log.warning("client %d failed during %s: %s", cid, method, value)
        return results, failed

    def fit(self, payloads: dict[int, bytes], round_idx: int
            ) -> tuple[dict[int, FitReply], dict[int, str], int]:
        """Replies, failures, and the bytes sent (each sampled client's payload)."""
        replies, failed = self._map([("fit", cid, (payload, round_idx)) for cid, payload in payloads.items()])
        return replies, failed, sum(map(len, payloads.values()))

    def evaluate(self, payloads: dict[int, bytes], after_round: int, views: list[View]
                 ) -> tuple[dict[int, list[dict]], dict[int, str]]:
        """Clients' results for each view (``Client.evaluate``), and failures."""
        return self._map([("evaluate", cid, (payload, views, after_round)) for cid, payload in payloads.items()])

    def kstep(self, payloads: dict[int, bytes], steps: int) -> tuple[dict[int, dict], dict[int, str]]:
        return self._map([("kstep", cid, (payload, steps)) for cid, payload in payloads.items()])

    def close(self) -> None:
        pass


class CentralizedEngine(EmbeddedEngine):
    """``fit`` trains one pooled trainer on every client's rows (the upper bound for the global track);
    ``evaluate`` and ``kstep`` are the clients' own, as for any method."""

    def __init__(self, clients: list[Client], pooled: Client):
        super().__init__(clients)
        self.pooled = pooled

    def fit(self, payloads: dict[int, bytes], round_idx: int
            ) -> tuple[dict[int, FitReply], dict[int, str], int]:
        ok, value = _call(self.pooled, "fit", (next(iter(payloads.values())), round_idx))
        if not ok:
            log.warning("centralized training failed: %s", value)
            return {}, {self.pooled.cid: value}, 0
        value.wire_bytes = 0  # one machine: nothing is sent
        return {self.pooled.cid: value}, {}, 0


class LocalEngine:
    """``method = "local"``: every part of the adapter is local (``local_params``), so a client's global track
    is empty and the messages carry no tensor; in a deployment without a server nothing would be sent, so
    nothing is counted. Training, evaluation and K-step are the inner engine's (sequential or parallel)."""

    def __init__(self, inner: EmbeddedEngine):
        self.inner = inner

    def fit(self, payloads: dict[int, bytes], round_idx: int
            ) -> tuple[dict[int, FitReply], dict[int, str], int]:
        replies, failed, _ = self.inner.fit(payloads, round_idx)
        for reply in replies.values():
            reply.wire_bytes = 0
        return replies, failed, 0

    def evaluate(self, payloads: dict[int, bytes], after_round: int, views: list[View]
                 ) -> tuple[dict[int, list[dict]], dict[int, str]]:
        return self.inner.evaluate(payloads, after_round, views)

    def kstep(self, payloads: dict[int, bytes], steps: int) -> tuple[dict[int, dict], dict[int, str]]:
        return self.inner.kstep(payloads, steps)

    def close(self) -> None:
        self.inner.close()


_WORKER_CLIENTS: list[Client] = []


def _worker_init(cfg_values: dict, run_path: str, threads: int) -> None:
    import torch

    from ..experiment import RunDir, build_clients, prepare

    torch.set_num_threads(threads)
    setup = prepare(ExperimentConfig(**cfg_values))
    _WORKER_CLIENTS.extend(build_clients(setup, RunDir(run_path)))


def _worker_call(call: Call) -> tuple[bool, Any]:
    method, cid, args = call
    return _call(_WORKER_CLIENTS[cid], method, args)


class ParallelEngine(EmbeddedEngine):
    """Clients spread over worker processes; each worker loads the backbone and every client's data once."""

    def __init__(self, cfg: ExperimentConfig, run_path: str, workers: int):
        threads = max(1, (os.cpu_count() or 1) // workers)
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
        self.pool = ctx.Pool(workers, initializer=_worker_init, initargs=(cfg.to_dict(), run_path, threads))

    def _run(self, calls: list[Call]) -> list[tuple[bool, Any]]:
        return self.pool.map(_worker_call, calls, chunksize=1)

    def close(self) -> None:
        self.pool.close()
        self.pool.join()
