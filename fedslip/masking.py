"""The private track's mask: iterative magnitude pruning, optional rewinding, sparsity.

With rewinding (``private_rewind_round >= 0``) the survivors restart from an earlier point: a
lottery-ticket mask (Frankle & Carbin 2019). Without it (every preset) it is plain iterative magnitude
pruning, and the docs call it so.

At the end of each pruning round the client removes ``prune_rate`` of the still-unmasked private
weights with the smallest |w| (per weight matrix, or over the whole private track), never going past
``target_sparsity``. Masked entries are exactly zero and receive no update: gradients are masked
before each optimizer step and the mask is applied again after it (AdamW's decay and moments cannot
revive a pruned entry).
"""

from __future__ import annotations

import torch

Mask = dict[str, torch.Tensor]


def full_mask(weights: dict[str, torch.Tensor], names: frozenset[str] | None = None) -> Mask:
    """All-true mask over ``weights`` (only those in ``names`` when given)."""
    return {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items() if names is None or n in names}


def sparsity(mask: Mask) -> float:
    total = sum(m.numel() for m in mask.values())
    return 0.0 if total == 0 else sum(int((~m).sum()) for m in mask.values()) / total


def step_rate(current: float, target: float, prune_rate: float) -> float:
    """Share of the surviving weights to prune now so that sparsity never exceeds ``target``."""
    if current >= target:
        return 0.0
    return min(prune_rate, 1.0 - (1.0 - target) / (1.0 - current))


def _prune_count(alive: int, rate: float) -> int:
    return min(alive, int(round(alive * rate)))


def prune(weights: dict[str, torch.Tensor], mask: Mask, rate: float, scope: str) -> Mask:
    """New mask with ``rate`` of the surviving entries (smallest magnitude) removed. Only tensors the
    mask covers are pruned (the private head never is)."""
    if rate <= 0:
        return {n: m.clone() for n, m in mask.items()}
    new = {}
    if scope == "matrix":
        for n, m in mask.items():
            w = weights[n]
            k = _prune_count(int(m.sum()), rate)
            new[n] = m.clone()
            if k:
                score = w.detach().abs().float().masked_fill(~m, float("inf")).flatten()
                new[n].view(-1)[torch.topk(score, k, largest=False).indices] = False
        return new
    # global: one threshold over the whole private track
    names = list(mask)
    score = torch.cat([weights[n].detach().abs().float().masked_fill(~mask[n], float("inf")).flatten()
                       for n in names])
    flat = torch.cat([mask[n].flatten() for n in names])
    k = _prune_count(int(flat.sum()), rate)
    if k:
        flat[torch.topk(score, k, largest=False).indices] = False
    start = 0
    for n in names:
        size = mask[n].numel()
        new[n] = flat[start:start + size].view_as(mask[n]).clone()
        start += size
    return new


@torch.no_grad()
def apply_mask(params: dict[str, torch.nn.Parameter], mask: Mask) -> None:
    for n, m in mask.items():
        params[n].mul_(m.to(params[n].device, params[n].dtype))


@torch.no_grad()
def mask_gradients(params: dict[str, torch.nn.Parameter], mask: Mask) -> None:
    for n, m in mask.items():
        if params[n].grad is not None:
            params[n].grad.mul_(m.to(params[n].device, params[n].grad.dtype))
