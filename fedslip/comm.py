"""What crosses the wire: tensors serialized with safetensors, and the byte accounting.

A payload is exactly ``safetensors.torch.save(tensors)``: an 8-byte little-endian header length, a
JSON header (names, dtypes, shapes, offsets; padded with spaces to a multiple of 8 bytes), then the raw
tensor bytes. ``len(payload)`` is what ``upload_bytes`` / ``download_bytes`` count, so the framing
overhead is counted too; for LoRA r=8 on MiniLM's query/value plus the classifier it is a few KiB on
top of the 301,072 bytes of fp32 parameters. A compressed payload (``codecs.pack``) is the same
container holding a codec's flat buffers, with what it is (codec, layout digest, rounds) in the
header's metadata.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from .model import PRIVATE, local_part


class PayloadError(ValueError):
    """A received payload cannot be decoded."""


def encode(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """``metadata``: what a compressed payload is (``codecs.pack``); fp32 weights carry none."""
    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata)


def read(payload: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the header metadata of a payload."""
    meta = metadata(payload)
    try:
        tensors = load(payload)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise PayloadError(f"payload of {len(payload)} bytes is not valid safetensors: {e}") from None
    return tensors, meta


def metadata(payload: bytes) -> dict[str, str]:
    """The header metadata of a payload, without decoding its tensors."""
    try:
        header = json.loads(payload[8:header_bytes(payload)])
    except (ValueError, struct.error) as e:
        raise PayloadError(f"payload of {len(payload)} bytes is not valid safetensors: {e}") from None
    return header.get("__metadata__") or {} if isinstance(header, dict) else {}


def decode(payload: bytes) -> dict[str, torch.Tensor]:
    return read(payload)[0]


def header_bytes(payload: bytes) -> int:
    """Framing overhead of a payload: 8 + the JSON header length."""
    return 8 + struct.unpack("<Q", payload[:8])[0]


def private_bytes(payload: bytes, local_params: Sequence[str] = ()) -> int:
    """Bytes of private-track tensors, and of the global adapter's ``local_params`` parts (partial
    sharing), inside a payload: must stay 0 for every message."""
    return sum(t.numel() * t.element_size() for name, t in decode(payload).items()
               if f".{PRIVATE}." in name or local_part(name, local_params))
