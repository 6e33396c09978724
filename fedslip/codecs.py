"""Compressed payloads: the codecs of ``upload_codec`` / ``download_codec``, their wire format and bounds.

``fp32`` sends the global track's weights as they are (``comm.encode``). Every other codec sends an
*update* against a reference both sides hold (``pack`` / ``unpack``):

* upload: a client's change ``u = w_client - w_ref + e`` where ``w_ref`` is the global track it trained
  from and ``e`` its error-feedback residual (what earlier rounds' compression did not send, kept in
  the client's state directory); the new residual is ``u - decode(encode(u))``;
* download: the server's change ``s - w_ref`` where ``s`` is the server's exact global track and
  ``w_ref`` what the clients already hold (zeros before the first download). Both sides add the decoded
  change to ``w_ref`` with the same code (``apply``), so they hold bit-identical references, and what
  was not sent stays in ``s - w_ref`` for the next download: error feedback on the server side.

Both sides know the global track's names and shapes (its *layout*), so a compressed payload carries no
per-tensor names, only flat buffers in layout order (names sorted), and a digest of the layout:

    values     fp32 / fp16 / bf16 (as int16 bits), one per sent coordinate
    codes      uint8 affine codes, one per byte (int8) or two per byte (int4, low nibble first)
    lo, scale  fp32, one per quantization group: x_hat = lo + code * scale
    mask       uint8 bitmask over all coordinates in layout order (top-k): which coordinates are sent

A codec is ``[topk+]<values>`` with values fp32, fp16, bf16, int8 or int4 (``topk`` = ``topk+fp32``).
Top-k keeps the ``k_t = ceil(topk_fraction * numel_t)`` largest magnitudes of each tensor ``t``.
Quantization groups are whole tensors (``quant_granularity = "tensor"``) or the rows (first dimension)
of each matrix (``"row"``); with top-k the kept values of one tensor are one group.

Error bounds per sent coordinate (``test_codecs`` checks each):
    fp16: |x - x_hat| <= 2^-11 |x| (normal range)      bf16: |x - x_hat| <= 2^-8 |x|
    intB: |x - x_hat| <= scale / 2 = (max - min) / (2 (2^B - 1)) over its group (+ fp32 rounding)
    top-k: coordinates not sent are 0 in x_hat (the residual carries them to the next round)
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from . import comm
from .comm import PayloadError
from .config import CODECS  # noqa: F401  (the codec names, validated in config)

VALUE_FORMATS = ("fp32", "fp16", "bf16", "int8", "int4")
LEVELS = {"int8": 255, "int4": 15}  # largest code of each affine format
Layout = dict[str, torch.Size]


def layout_of(tensors: dict[str, torch.Tensor]) -> Layout:
    return {n: tensors[n].shape for n in sorted(tensors)}


def layout_digest(layout: Layout) -> str:
    """16 hex digits naming the names and shapes both sides must agree on."""
    text = ";".join(f"{n}:{'x'.join(map(str, shape))}" for n, shape in sorted(layout.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Codec:
    name: str = "fp32"
    topk_fraction: float = 0.1
    granularity: str = "tensor"

    @property
    def lossless(self) -> bool:
        return self.name == "fp32"

    @property
    def full_state(self) -> Codec:
        """The codec of a full-state download (``pack_full``): the dense format of this codec's values.
        Top-k of a whole state would zero most weights, and no later download can fix that for a client
        off the chain of changes."""
        return Codec(self.values, self.topk_fraction, self.granularity) if self.sparse else self

    @property
    def sparse(self) -> bool:
        return self.name.startswith("topk")

    @property
    def values(self) -> str:
        if self.name == "topk":
            return "fp32"
        return self.name.split("+", 1)[1] if self.sparse else self.name

    # --- the pieces of a payload -----------------------------------------------------------------
    def kept(self, layout: Layout) -> list[int]:
        """Coordinates sent per tensor (layout order)."""
        sizes = [math.prod(s) for s in layout.values()]
        return [max(1, math.ceil(self.topk_fraction * n)) for n in sizes] if self.sparse else sizes

    def groups(self, layout: Layout) -> list[int]:
        """Sizes of the quantization groups, in order."""
        if self.sparse or self.granularity == "tensor":
            return self.kept(layout)
        return [size for shape in layout.values()
                for size in ([math.prod(shape[1:])] * shape[0] if len(shape) > 1 else [math.prod(shape)])]

    def encode(self, update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The wire tensors of ``update`` (any names; flattened in sorted-name order)."""
        layout = layout_of(update)
        flat = [update[n].detach().float().flatten() for n in layout]
        wire = {}
        if self.sparse:
            masks = []
            for x, k in zip(flat, self.kept(layout), strict=True):
                keep = torch.zeros(x.numel(), dtype=torch.bool)
                keep[torch.topk(x.abs(), k, sorted=False).indices] = True
                masks.append(keep)
            keep = torch.cat(masks)
            wire["mask"] = torch.from_numpy(np.packbits(keep.numpy(), bitorder="little"))
            x = torch.cat(flat)[keep]
        else:
            x = torch.cat(flat)
        if self.values in LEVELS:
            wire.update(_quantize(x, self.groups(layout), LEVELS[self.values]))
        elif self.values == "bf16":
            wire["values"] = x.to(torch.bfloat16).view(torch.int16)  # Flower's arrays are numpy: no bf16
        else:
            wire["values"] = x.to(torch.float16 if self.values == "fp16" else torch.float32)
        return wire

    def decode(self, wire: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
        """The update a payload's wire tensors carry, every size and value checked (``PayloadError``)."""
        total = sum(math.prod(s) for s in layout.values())
        expected = {"codes", "lo", "scale"} if self.values in LEVELS else {"values"}
        expected |= {"mask"} if self.sparse else set()
        if set(wire) != expected:
            raise PayloadError(f"{self.name} payload holds {sorted(wire)}, expected {sorted(expected)}")
        kept = self.kept(layout)
        if self.sparse:
            mask = _tensor(wire, "mask", torch.uint8, -(-total // 8))
            bits = np.unpackbits(mask.numpy(), bitorder="little").astype(bool)
            keep = torch.from_numpy(bits[:total])
            counts = [int(part.sum()) for part in torch.split(keep, [math.prod(s) for s in layout.values()])]
            if counts != kept or bits[total:].any():
                raise PayloadError(f"{self.name} mask selects {counts} coordinates per tensor (padding bits "
                                   f"{int(bits[total:].sum())}), expected {kept}")
        n = sum(kept)
        if self.values in LEVELS:
            x = _dequantize(wire, self.groups(layout), LEVELS[self.values], n)
        elif self.values == "bf16":
            x = _tensor(wire, "values", torch.int16, n).view(torch.bfloat16).float()
        else:
            x = _tensor(wire, "values", torch.float16 if self.values == "fp16" else torch.float32, n).float()
        if not torch.isfinite(x).all():
            raise PayloadError(f"{self.name} payload decodes to NaN or Inf")
        if self.sparse:
            dense = torch.zeros(total)
            dense[keep] = x
            x = dense
        parts = torch.split(x, [math.prod(s) for s in layout.values()])
        return {name: part.reshape(shape).clone() for (name, shape), part in zip(layout.items(), parts, strict=True)}


def _tensor(wire: dict[str, torch.Tensor], key: str, dtype: torch.dtype, length: int) -> torch.Tensor:
    t = wire[key]
    if t.dtype != dtype or t.dim() != 1 or t.numel() != length:
        raise PayloadError(f"payload {key!r} is {t.dtype} of shape {tuple(t.shape)}, expected {dtype} of ({length},)")
    return t


def _quantize(x: torch.Tensor, groups: list[int], levels: int) -> dict[str, torch.Tensor]:
    """Affine codes of ``x`` per group: lo = min, scale = (max - min) / levels, code = round((x - lo) / scale)."""
    parts = torch.split(x, groups)
    lo = torch.stack([p.min() for p in parts])
    scale = (torch.stack([p.max() for p in parts]) - lo) / levels
    lo_x, scale_x = (v.repeat_interleave(torch.tensor(groups)) for v in (lo, scale))
    codes = torch.where(scale_x > 0, (x - lo_x) / torch.where(scale_x > 0, scale_x, 1.0), 0.0)
    codes = codes.round().clamp(0, levels).to(torch.uint8)
    if levels == LEVELS["int4"]:
        codes = torch.cat([codes, codes.new_zeros(codes.numel() % 2)])
        codes = codes[0::2] | (codes[1::2] << 4)
    return {"codes": codes, "lo": lo, "scale": scale}


def _dequantize(wire: dict[str, torch.Tensor], groups: list[int], levels: int, n: int) -> torch.Tensor:
    packed = levels == LEVELS["int4"]
    codes = _tensor(wire, "codes", torch.uint8, -(-n // 2) if packed else n)
    lo, scale = (_tensor(wire, key, torch.float32, len(groups)) for key in ("lo", "scale"))
    if not (torch.isfinite(lo).all() and torch.isfinite(scale).all() and (scale >= 0).all()):
        raise PayloadError("payload scales must be finite and >= 0, offsets finite")
    if packed:  # every nibble is a valid int4 code and every byte a valid int8 one: no range to check
        codes = torch.stack([codes & 0x0F, codes >> 4], dim=1).flatten()[:n]
    sizes = torch.tensor(groups)
    return lo.repeat_interleave(sizes) + codes.float() * scale.repeat_interleave(sizes)


# --- a payload: wire tensors + what they are an update of ------------------------------------------
def pack(codec: Codec, update: dict[str, torch.Tensor], base_round: int, round_idx: int) -> bytes:
    """The payload of ``update`` (an update of the reference of ``base_round``; -1 = zeros), which makes
    the global track of ``round_idx``."""
    return comm.encode(codec.encode(update), metadata={
        "codec": codec.name, "layout": layout_digest(layout_of(update)), "base": str(base_round),
        "round": str(round_idx)})


def unpack(payload: bytes, codec: Codec, layout: Layout) -> tuple[dict[str, torch.Tensor], int, int]:
    """(update, base round, round) of a payload made by ``pack`` with ``codec`` for ``layout``."""
    wire, meta = comm.read(payload)
    if meta.get("codec") != codec.name:
        raise PayloadError(f"payload codec {meta.get('codec')!r}, expected {codec.name!r}")
    if meta.get("layout") != layout_digest(layout):
        raise PayloadError("payload layout (global-track names and shapes) differs from this model's")
    return (codec.decode(wire, layout), *_rounds(meta))


def pack_full(codec: Codec, state: dict[str, torch.Tensor], round_idx: int) -> bytes:
    """The full state of the global track of ``round_idx`` for a client that holds no reference of the
    previous round: ``state`` compressed with ``codec.full_state``, marked ``full``, base -1 (zeros)."""
    return comm.encode(codec.full_state.encode(state), metadata={
        "codec": codec.full_state.name, "layout": layout_digest(layout_of(state)), "base": "-1",
        "round": str(round_idx), "full": "1"})


def is_full(payload: bytes) -> bool:
    """Whether a payload is a full-state download (``pack_full``)."""
    return comm.metadata(payload).get("full") == "1"


def unpack_full(payload: bytes, codec: Codec, layout: Layout) -> dict[str, torch.Tensor]:
    """The global track a full-state download carries (``pack_full`` with ``codec``)."""
    state, base, _ = unpack(payload, codec.full_state, layout)
    if base != -1:
        raise PayloadError(f"a full-state download must have base -1, not {base}")
    return state


def payload_rounds(payload: bytes) -> tuple[int, int]:
    """(base round, round) of a compressed payload, from its header alone."""
    return _rounds(comm.metadata(payload))


def _rounds(meta: dict[str, str]) -> tuple[int, int]:
    try:
        return int(meta["base"]), int(meta["round"])
    except (KeyError, ValueError):
        raise PayloadError(f"payload metadata lacks valid base/round: {meta}") from None


def apply(reference: dict[str, torch.Tensor], update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """reference + update: the one addition both sides make, so their references stay bit-identical."""
    return {n: reference[n] + update[n].to(reference[n].dtype) for n in reference}


def residual(update: dict[str, torch.Tensor], sent: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Error feedback: what compression left out of ``update`` (added to the next one)."""
    return {n: update[n] - sent[n] for n in update}


def of(cfg, direction: str) -> Codec:
    """The codec of ``direction`` ("upload" or "download") in an ExperimentConfig."""
    return Codec(getattr(cfg, f"{direction}_codec"), cfg.topk_fraction, cfg.quant_granularity)
