"""The Flower engine: ``fedslip.rounds``' round loop, with Flower's Grid carrying the messages.

The round loop, aggregation, evaluation, checkpointing and the summary are the embedded engine's code
(``fedslip.rounds``); this engine only turns its three calls into Flower messages:

    fit(payloads, round)              -> ``train`` messages to the clients' nodes, replies = updated global track
    evaluate(payloads, round, tracks) -> ``evaluate`` messages, replies = accuracy on each client's test rows
    kstep(payloads, steps)            -> ``query`` messages (op=kstep), replies = accuracy after K local steps

Clients are found by their ``partition-id`` (Flower's node config): the engine asks every node it has not
seen yet (``query`` op=identify), so a SuperNode that restarts under a new node id is found again. A
message whose node went away is resent once that client's node is back (``rejoin_timeout``); the
client's private state lives in the node's state directory and each call is idempotent for a round,
so the retry computes exactly what the lost call would have.

Bytes are measured on the Flower messages themselves: ``message_bytes`` is the quantity Flower's
``message_size_mod`` logs (the sum of the records' ``count_bytes()``).

This module only carries messages; the processes that carry them are started by ``flwr run`` or by
``fedslip.launch`` (``simulation``: Ray in this process; ``deployment``: SuperLink and SuperNodes).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from .. import comm
from ..client import FitReply
from ..config import ExperimentConfig
from ..server import ARRAYS
from ..views import View

log = logging.getLogger("fedslip")

CONFIG, RESULT, PAYLOAD_META = "config", "result", "payload-meta"  # record keys; ARRAYS is the strategies'

IDENTIFY, KSTEP = "identify", "kstep"
INFERENCE = "inference"  # evaluate the client's inference tracks (flwr cannot count an empty string's bytes)
NODE_UNAVAILABLE = 5  # flwr.common.constant.ErrorCode.NODE_UNAVAILABLE
RETRY_PAUSE_S = 1.0
REPLY_POLL_S = 0.2


# --- message codec (shared with the ClientApp) -----------------------------------------------------
def payload_records(payload: bytes) -> dict[str, ArrayRecord | ConfigRecord]:
    """A safetensors payload as Flower records (what travels): its tensors as an ArrayRecord, and a
    compressed payload's metadata (``codecs.pack``) as a ConfigRecord."""
    tensors, meta = comm.read(payload)
    return {ARRAYS: ArrayRecord(tensors), **({PAYLOAD_META: ConfigRecord(meta)} if meta else {})}


def payload_of(content: RecordDict) -> bytes:
    """Every array of every ArrayRecord in a message (and the payload metadata), re-serialized as one
    safetensors payload, so the server validates, aggregates and audits exactly what arrived."""
    tensors = {}
    for record in content.array_records.values():
        tensors.update(record.to_torch_state_dict())
    meta = content.config_records.get(PAYLOAD_META)
    return comm.encode(tensors, {k: str(v) for k, v in meta.items()} if meta is not None else None)


def result_record(result: dict) -> ConfigRecord:
    """A JSON-able result (metrics dict) as one ConfigRecord value: lossless, and None/bool survive."""
    return ConfigRecord({RESULT: json.dumps(result)})


def result_of(content: RecordDict) -> dict:
    return json.loads(content.config_records[RESULT][RESULT])


def encode_views(views: list[View]) -> str:
    """Evaluation views as one config string: ``inference;global`` (tracks joined by ``+``)."""
    return ";".join("+".join(v) if v else INFERENCE for v in views)


def decode_views(text: str) -> list[View]:
    return [None if v == INFERENCE else tuple(v.split("+")) for v in text.split(";")]


def message_bytes(message: Message) -> int:
    """Bytes of a message's content, as ``flwr.clientapp.mod.message_size_mod`` counts them."""
    return sum(record.count_bytes() for record in message.content.values())


# --- the engine ----------------------------------------------------------------------------------
class FlowerEngine:
    """``fit`` / ``evaluate`` / ``kstep`` of the embedded engine, carried by a Flower Grid."""

    def __init__(self, grid: Grid, cfg: ExperimentConfig):
        self.grid, self.cfg = grid, cfg
        self.nodes: dict[int, int] = {}  # client id (partition-id) -> node id
        self.timeout = cfg.reply_timeout or None

    # --- finding clients ---------------------------------------------------------------------
    def _discover(self, wanted: list[int], wait_s: float) -> None:
        """Map client ids to live node ids, identifying nodes not seen before; waits up to ``wait_s``
        for wanted clients whose node is not (yet, or no longer) connected."""
        deadline = time.monotonic() + wait_s
        known: set[int] = set()  # node ids already asked this call
        while True:
            live = set(self.grid.get_node_ids())
            self.nodes = {cid: node for cid, node in self.nodes.items() if node in live}
            new = sorted(live - set(self.nodes.values()) - known)
            if new:
                known.update(new)
                ask = {node: Message(RecordDict({CONFIG: ConfigRecord({"op": IDENTIFY})}), dst_node_id=node,
                                     message_type=MessageType.QUERY) for node in new}
                for reply in self._send_and_receive(ask).values():
                    if reply.has_error():
                        continue
                    cid = int(result_of(reply.content)["partition-id"])
                    if cid in self.nodes:
                        log.info("client %d moved from node %d to node %d", cid, self.nodes[cid],
                                 reply.metadata.src_node_id)
                    self.nodes[cid] = reply.metadata.src_node_id
            if all(c in self.nodes for c in wanted) or time.monotonic() >= deadline:
                return
            time.sleep(RETRY_PAUSE_S)

    def _exchange(self, cids: list[int], message_type: str, content: Callable[[int], RecordDict]
                  ) -> tuple[dict[int, Message], dict[int, str], int]:
        """Send ``content(cid)`` to each client's node; resend once to clients whose node went away.
        Returns replies, failures (reason) and the bytes sent."""
        replies: dict[int, Message] = {}
        failed: dict[int, str] = {}
        sent_bytes = 0
        pending = list(cids)
        for attempt in range(2):
            self._discover(pending, wait_s=self.cfg.rejoin_timeout)
            for cid in [c for c in pending if c not in self.nodes]:
                failed[cid] = f"no node with partition-id={cid} connected"
            messages = {}
            for cid in [c for c in pending if c in self.nodes]:
                messages[cid] = Message(content(cid), dst_node_id=self.nodes[cid], message_type=message_type,
                                        group_id=str(cid))
                sent_bytes += message_bytes(messages[cid])
            got = self._send_and_receive(messages)
            retry = []
            for cid in messages:
                reply = got.get(cid)
                if reply is None:
                    failed[cid] = f"no reply within reply_timeout={self.cfg.reply_timeout}s"
                elif not reply.has_error():
                    replies[cid] = reply
                    failed.pop(cid, None)
                elif reply.error.code == NODE_UNAVAILABLE and attempt == 0:
                    retry.append(cid)
                    self.nodes.pop(cid, None)
                    log.warning("client %d: node %d unavailable; waiting up to %.0fs for it to rejoin", cid,
                                messages[cid].metadata.dst_node_id, self.cfg.rejoin_timeout)
                else:
                    failed[cid] = f"{reply.error.reason} (code {reply.error.code})"
            if not retry:
                break
            pending = retry
        for cid, reason in failed.items():
            log.warning("client %d failed during %s: %s", cid, message_type, reason)
        return replies, failed, sent_bytes

    def _send_and_receive(self, messages: dict[int, Message]) -> dict[int, Message]:
        """Grid.send_and_receive, keyed by client: replies are matched to the messages they answer (an
        error reply made by the SuperLink for a lost node comes from the SuperLink, not the node), and
        polled every REPLY_POLL_S (Flower's own loop sleeps 3 s between polls)."""
        cids = list(messages)
        ids = list(self.grid.push_messages([messages[c] for c in cids]))
        pending = {mid: cid for mid, cid in zip(ids, cids, strict=True) if mid}
        replies: dict[int, Message] = {}
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while pending and (deadline is None or time.monotonic() < deadline):
            for reply in self.grid.pull_messages(set(pending)):
                cid = pending.pop(reply.metadata.reply_to_message_id, None)
                if cid is not None:
                    replies[cid] = reply
            if pending:
                time.sleep(REPLY_POLL_S)
        return replies

    @staticmethod
    def _content(payloads: dict[int, bytes], **config) -> Callable[[int], RecordDict]:
        """Each client's message: its payload's records (decoded once per distinct payload) and config."""
        decoded: dict[int, dict] = {}

        def content(cid: int) -> RecordDict:
            payload = payloads[cid]
            records = decoded.setdefault(id(payload), payload_records(payload))
            return RecordDict({**records, CONFIG: ConfigRecord({"client-id": int(cid), **config})})
        return content

    # --- the engine interface ------------------------------------------------------------------
    def fit(self, payloads: dict[int, bytes], round_idx: int
            ) -> tuple[dict[int, FitReply], dict[int, str], int]:
        replies, failed, sent = self._exchange([int(c) for c in payloads], MessageType.TRAIN,
                                               self._content(payloads, round=int(round_idx)))
        fits = {}
        for cid, reply in replies.items():
            result = result_of(reply.content)
            fits[cid] = FitReply(payload_of(reply.content), int(result["num_examples"]), result["metrics"],
                                 wire_bytes=message_bytes(reply))
        return fits, failed, sent

    def evaluate(self, payloads: dict[int, bytes], after_round: int, views: list[View]
                 ) -> tuple[dict[int, list[dict]], dict[int, str]]:
        content = self._content(payloads, round=int(after_round), views=encode_views(views))
        replies, failed, _ = self._exchange(list(payloads), MessageType.EVALUATE, content)
        return {cid: result_of(r.content) for cid, r in replies.items()}, failed

    def kstep(self, payloads: dict[int, bytes], steps: int) -> tuple[dict[int, dict], dict[int, str]]:
        replies, failed, _ = self._exchange(list(payloads), MessageType.QUERY, self._content(payloads, op=KSTEP,
                                                                                             steps=steps))
        return {cid: result_of(r.content) for cid, r in replies.items()}, failed

    def close(self) -> None:
        pass
