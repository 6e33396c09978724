"""Differential privacy on the global track: clipping, noise of the configured scale, the accountant's
epsilon, and a private track that DP never touches."""

from __future__ import annotations

import json

import dp_accounting
import pytest
import torch
from dp_accounting import dp_event, rdp

import fedslip
from fedslip import comm, privacy
from fedslip.server import Server
from fedslip.storage import load_tensors


def _state(seed=0, shape=(40, 25)):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(shape, generator=g), "b.bias": torch.randn(shape[0], generator=g)}


def _norm(update):
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in update.values())))


def test_clipped_changes_are_averaged_uniformly_over_consecutive_rounds(tiny_cfg):
    """No noise: the new global track is exactly the reference plus the uniform mean of the clipped
    changes, computed here by hand, round after round (the reference moves), whatever the row counts."""
    clip_norm = 0.5
    cfg = tiny_cfg(num_clients=3, dp_clip=clip_norm)
    server = Server(cfg, _state())
    for round_idx in (1, 2, 3):
        reference = {n: t.clone() for n, t in server.state.items()}
        changes = []
        for cid, scale in enumerate((0.2, 2.0, 10.0)):  # norms below, above and far above C
            direction = _state(seed=10 * round_idx + cid)
            norm = _norm(direction)
            changes.append({n: t * scale * clip_norm / norm for n, t in direction.items()})
        replies = {cid: (comm.encode({n: reference[n] + u[n] for n in u}), 100 * (cid + 1))
                   for cid, u in enumerate(changes)}
        server.aggregate(replies, round_idx=round_idx)
        clipped = [{n: t * min(1.0, clip_norm / _norm(u)) for n, t in u.items()} for u in changes]
        assert [round(_norm(c), 6) for c in clipped] == [0.1, 0.5, 0.5]
        for n in reference:
            expected = reference[n] + sum(c[n] for c in clipped) / 3
            assert torch.allclose(server.state[n], expected, atol=1e-6), (round_idx, n)


def test_noise_of_the_configured_scale_is_added_to_the_mean(tiny_cfg):
    """Every client sends the global track unchanged, so what the aggregate moved is the noise: mean 0,
    std sigma * C / k on every coordinate (k clients per round), fresh each round, the same on a rerun."""
    sigma, clip_norm, k = 2.0, 0.5, 4
    cfg = tiny_cfg(num_clients=k, dp_clip=clip_norm, dp_noise_multiplier=sigma)
    initial = _state(shape=(200, 100))

    def noise(round_idx, server):
        before = {n: t.clone() for n, t in server.state.items()}
        server.aggregate({c: (comm.encode(before), 10) for c in range(k)}, round_idx=round_idx)
        return torch.cat([(server.state[n] - before[n]).flatten() for n in sorted(before)])

    server = Server(cfg, {n: t.clone() for n, t in initial.items()})
    first, second = noise(1, server), noise(2, server)
    expected = sigma * clip_norm / k
    assert privacy.noise_std(cfg) == pytest.approx(expected)
    for drawn in (first, second):  # 20,200 draws: the sample std is within 2% of sigma at > 5 standard errors
        assert abs(drawn.std().item() - expected) < 0.02 * expected
        assert abs(drawn.mean().item()) < 5 * expected / drawn.numel() ** 0.5
    assert not torch.allclose(first, second)
    rerun = noise(1, Server(cfg, {n: t.clone() for n, t in initial.items()}))
    assert torch.equal(rerun, first)


def _library_epsilon(sigma, rounds, delta, q=None):
    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    event = dp_event.GaussianDpEvent(sigma)
    accountant.compose(event if q is None else dp_event.PoissonSampledDpEvent(q, event), rounds)
    return accountant.get_epsilon(delta)


def test_epsilon_is_the_accountants_for_the_same_parameters(tiny_cfg):
    full = tiny_cfg(num_clients=4, dp_clip=1.0, dp_noise_multiplier=1.0, dp_delta=1e-5)
    assert privacy.epsilon(full, 5) == pytest.approx(_library_epsilon(1.0, 5, 1e-5), rel=1e-12)
    assert privacy.epsilon(full, 5) == pytest.approx(12.3017, abs=1e-3)  # the Gaussian mechanism, 5 releases
    partial = tiny_cfg(num_clients=10, fraction_fit=0.3, dp_clip=1.0, dp_noise_multiplier=1.2, dp_delta=1e-4)
    assert privacy.epsilon(partial, 20) == pytest.approx(_library_epsilon(1.2, 20, 1e-4, q=0.3), rel=1e-12)
    assert privacy.epsilon(partial, 20) < _library_epsilon(1.2, 20, 1e-4)  # sampling amplifies privacy
    assert privacy.epsilon(full, 6) > privacy.epsilon(full, 5)
    assert privacy.epsilon(tiny_cfg(dp_clip=1.0), 5) is None  # clipping alone is no guarantee
    assert privacy.epsilon(tiny_cfg(), 5) is None


def test_a_dp_run_reports_epsilon_and_leaves_the_private_track_alone(tiny_cfg, tmp_path):
    common = dict(method="fedslip", rounds=2, private_warmup_rounds=0)
    plain = fedslip.run(tiny_cfg(**common), tmp_path / "plain", progress=False, log=False)
    cfg = tiny_cfg(**common, dp_clip=0.05, dp_noise_multiplier=1.0)
    summary = fedslip.run(cfg, tmp_path / "dp", progress=False, log=False)
    rows = [json.loads(line) for line in (tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["dp_epsilon"] for r in rows] == [pytest.approx(privacy.epsilon(cfg, r)) for r in (1, 2)]
    assert summary["dp_epsilon"] == pytest.approx(privacy.epsilon(cfg, 2)) and summary["dp_delta"] == 1e-5
    assert "dp_epsilon" not in plain
    plain_global, dp_global = (load_tensors(tmp_path / r / "global.safetensors") for r in ("plain", "dp"))
    assert not any(torch.equal(plain_global[n], dp_global[n]) for n in plain_global)  # clipped and noised
    for cid in range(cfg.num_clients):  # round 1 trained from the same global track: the same private track
        a, b = (load_tensors(tmp_path / r / "clients" / str(cid) / "private.prev.safetensors") for r in ("plain", "dp"))
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_bad_dp_settings_are_refused(tiny_cfg):
    for overrides, message in [({"dp_noise_multiplier": 1.0}, "needs dp_clip > 0"),
                               ({"dp_clip": 1.0, "aggregation": "median"}, "aggregation='fedavg'"),
                               ({"dp_clip": 1.0, "dp_delta": 1.0}, "dp_delta must be in"),
                               ({"dp_clip": -1.0}, "dp_clip must be >= 0")]:
        with pytest.raises(fedslip.ConfigError, match=message):
            tiny_cfg(**overrides)
