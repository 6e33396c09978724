"""Differential privacy on the global track: client-level DP, central (server-side) or local (client-side).

**Central** (``dp_mode = "central"``), server-side fixed clipping:

Each round, with k clients sampled (``fraction_fit``), A the accepted ones and g the global track the
clients trained from:

    u_i  = w_i - g,   u_i <- u_i * min(1, C / ||u_i||_2)           (clipped, over the whole global track)
    g'   = g + (1/|A|) * sum_{i in A} u_i + N(0, (sigma * C / |A|)^2 I)  (uniform mean, Gaussian noise)

``C = dp_clip``, ``sigma = dp_noise_multiplier``: Flower's ``DifferentialPrivacyServerSideFixedClipping``
rule (McMahan et al. 2018, arXiv:1710.06963), with Flower's own clipping and standard-deviation
functions; the noise is calibrated to the updates the mean divides by (|A|, as Flower's wrapper does
with the results it aggregates), so a rejected or failed client does not leave the mean under-noised;
the noise is drawn from a generator seeded per run and round, so a DP run is as deterministic as any
other. The mean is unweighted (Flower's DP wrappers require uniform weights: a
client's influence must not grow with its row count). The private track never leaves the client, so it
is never clipped or noised.

(epsilon, delta) come from Google's ``dp-accounting`` RDP accountant, add-or-remove-one-client
neighbouring: per round one Gaussian release of noise multiplier sigma (the clipped sum has sensitivity
C, its noise std is sigma * C), composed over the rounds run so far; with all clients in every round no
amplification by sampling, with k of n the round is accounted as Poisson sampling at q = k/n (the
rounds draw exactly k clients; Poisson is the usual stand-in, as in McMahan et al. 2018).

Central DP protects a client from whoever sees the released global track, not from the server: the server
sees each update before the noise. **Local** (``dp_mode = "local"``) protects it from the server too: each
client releases only

    g + u_i * min(1, C / ||u_i||_2) + N(0, (sigma * C)^2 I)         (clipped and noised on the client)

and the server aggregates what it receives with the configured rule (any rule is post-processing). Its
epsilon is per client against the server: one Gaussian release per round the client takes part in, whose
input can be any change of norm <= C (replace-one: sensitivity 2C, noise multiplier sigma / 2), composed
over the rounds run so far (every round, the worst case). The noise is drawn on the client from its run
seed, round, client id and an optional secret (``dp-secret`` node config in a deployment): without the
secret a server that knows the run seed could redraw and subtract it, which is fine for measuring and
wrong for protecting.
"""

from __future__ import annotations

import dp_accounting
import numpy as np
import torch
from dp_accounting import dp_event, rdp
from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv

from .config import ExperimentConfig


def enabled(cfg: ExperimentConfig) -> bool:
    return cfg.dp_clip > 0


def central(cfg: ExperimentConfig) -> bool:
    """Whether the server clips and noises (central DP)."""
    return enabled(cfg) and cfg.dp_mode == "central"


def local(cfg: ExperimentConfig) -> bool:
    """Whether each client clips and noises its own upload (local DP)."""
    return enabled(cfg) and cfg.dp_mode == "local"


def clip(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
         clip_norm: float) -> dict[str, torch.Tensor]:
    """``reference + u * min(1, C / ||u||)`` with ``u = weights - reference`` (Flower's clipping; an unchanged
    track is returned as it is: Flower's helper divides by the norm)."""
    if all(torch.equal(weights[n], reference[n]) for n in weights):
        return weights
    names = sorted(weights)
    arrays = [weights[n].double().numpy().copy() for n in names]
    compute_clip_model_update(arrays, [reference[n].double().numpy() for n in names], clip_norm)
    return {n: torch.from_numpy(np.asarray(a)).to(weights[n].dtype) for n, a in zip(names, arrays)}


def noise_std(cfg: ExperimentConfig, averaged: int) -> float:
    """Standard deviation of the noise on each coordinate of a mean of ``averaged`` clipped updates:
    sigma * C / |A| (Flower's rule; the mean's sensitivity is C / |A|)."""
    return compute_stdv(cfg.dp_noise_multiplier, cfg.dp_clip, averaged)


def gaussian(tensors: dict[str, torch.Tensor], std: float, words: list[int]) -> dict[str, torch.Tensor]:
    """``tensors`` plus N(0, std^2) on every coordinate, drawn (in name order) from a generator seeded by
    ``words``: a DP run is as repeatable as any other, and resumes exactly."""
    if std == 0:
        return tensors
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence(words).generate_state(1)[0]))
    return {n: t + (torch.randn(t.shape, generator=generator, dtype=torch.float64) * std).to(t.dtype)
            for n, t in sorted(tensors.items())}


def add_noise(mean: dict[str, torch.Tensor], cfg: ExperimentConfig, round_idx: int,
              averaged: int) -> dict[str, torch.Tensor]:
    """Central DP: the mean of ``averaged`` clipped updates plus N(0, (sigma * C / |A|)^2), seeded by run
    and round."""
    return gaussian(mean, noise_std(cfg, averaged), [cfg.seed, round_idx, 0xD9])


def privatize(weights: dict[str, torch.Tensor], received: dict[str, torch.Tensor], cfg: ExperimentConfig,
              round_idx: int, cid: int, secret: str | None = None) -> dict[str, torch.Tensor]:
    """Local DP, on the client: ``received + clip(weights - received) + N(0, (sigma * C)^2)`` on every
    coordinate of the global track it uploads, seeded by run, round, client and the client's secret."""
    words = [cfg.seed, round_idx, cid, 0xD10] + list((secret or "").encode())
    return gaussian(clip(weights, received, cfg.dp_clip), cfg.dp_noise_multiplier * cfg.dp_clip, words)


def release(cfg: ExperimentConfig) -> dp_event.DpEvent:
    """One round's release. Central: the Gaussian mechanism on the clients the round samples. Local: one
    client's clipped, noised change (replace-one sensitivity 2C: noise multiplier sigma / 2); the server
    knows who took part, so sampling does not amplify it."""
    if cfg.dp_mode == "local":
        return dp_event.GaussianDpEvent(cfg.dp_noise_multiplier / 2)
    gaussian = dp_event.GaussianDpEvent(cfg.dp_noise_multiplier)
    if cfg.clients_per_round >= cfg.num_clients:
        return gaussian
    return dp_event.PoissonSampledDpEvent(cfg.clients_per_round / cfg.num_clients, gaussian)


def epsilon(cfg: ExperimentConfig, rounds: int) -> float | None:
    """Epsilon at ``dp_delta`` after ``rounds`` rounds; None without noise (no guarantee at all)."""
    if not enabled(cfg) or cfg.dp_noise_multiplier == 0:
        return None
    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    accountant.compose(release(cfg), rounds)
    return float(accountant.get_epsilon(cfg.dp_delta))
