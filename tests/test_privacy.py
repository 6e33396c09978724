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
    assert privacy.noise_std(cfg, k) == pytest.approx(expected)
    for drawn in (first, second):  # 20,200 draws: the sample std is within 2% of sigma at > 5 standard errors
        assert abs(drawn.std().item() - expected) < 0.02 * expected
        assert abs(drawn.mean().item()) < 5 * expected / drawn.numel() ** 0.5
    assert not torch.allclose(first, second)
    rerun = noise(1, Server(cfg, {n: t.clone() for n, t in initial.items()}))
    assert torch.equal(rerun, first)


def test_the_noise_is_calibrated_to_the_updates_averaged(tiny_cfg):
    """A sampled client whose update is rejected leaves a mean of 3 updates: its sensitivity is C / 3, so
    the noise std must be sigma * C / 3, not sigma * C / 4 (the sampled count)."""
    sigma, clip_norm, k = 2.0, 0.5, 4
    cfg = tiny_cfg(num_clients=k, dp_clip=clip_norm, dp_noise_multiplier=sigma)
    server = Server(cfg, _state(shape=(200, 100)))
    before = {n: t.clone() for n, t in server.state.items()}
    replies = {c: (comm.encode(before), 10) for c in range(k - 1)}
    replies[k - 1] = (comm.encode({n: t * float("nan") for n, t in before.items()}), 10)  # rejected: NaN
    outcome = server.aggregate(replies, round_idx=1)
    assert outcome.accepted == [0, 1, 2]
    drawn = torch.cat([(server.state[n] - before[n]).flatten() for n in sorted(before)])
    expected = sigma * clip_norm / (k - 1)
    assert abs(drawn.std().item() - expected) < 0.02 * expected


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
    """Local DP: the clients clip and noise their uploads themselves, next to their private tracks; the
    private track of round 1 (trained from the same global track in both runs) is the plain run's, bit for bit."""
    common = dict(method="fedslip", rounds=2, private_warmup_rounds=0)
    plain = fedslip.run(tiny_cfg(**common), tmp_path / "plain", progress=False, log=False)
    cfg = tiny_cfg(**common, dp_clip=0.05, dp_noise_multiplier=1.0, dp_mode="local")
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


# --- local DP: each client clips and noises its own upload ------------------------------------------------
def test_local_dp_upload_is_the_clipped_change_plus_client_noise_over_consecutive_rounds(tiny_cfg):
    """privatize = received + u * min(1, C/||u||) + N(0, (sigma C)^2), computed here by hand for three rounds
    (the received track moves): the noise has the configured std, differs per client, round and secret, and
    is the same on a rerun."""
    sigma, clip_norm = 1.5, 0.2
    cfg = tiny_cfg(dp_clip=clip_norm, dp_noise_multiplier=sigma, dp_mode="local")
    received = _state(0, shape=(200, 100))
    draws = []
    for round_idx in (1, 2, 3):
        trained = {n: t + 0.01 * round_idx * _state(round_idx, shape=(200, 100))[n] for n, t in received.items()}
        change = {n: trained[n] - received[n] for n in trained}
        scale = min(1.0, clip_norm / _norm(change))
        clipped = {n: received[n] + change[n] * scale for n in received}
        noised = privacy.privatize(trained, received, cfg, round_idx, cid=3)
        clip_only = privacy.privatize(trained, received, tiny_cfg(dp_clip=clip_norm, dp_mode="local"), round_idx, 3)
        for n in received:
            assert torch.allclose(clip_only[n], clipped[n], atol=1e-6)
        noise = torch.cat([(noised[n] - clipped[n]).flatten() for n in sorted(received)])
        assert abs(noise.std().item() - sigma * clip_norm) < 0.02 * sigma * clip_norm  # 20,200 draws
        assert abs(noise.mean().item()) < 5 * sigma * clip_norm / noise.numel() ** 0.5
        assert torch.equal(privacy.privatize(trained, received, cfg, round_idx, cid=3)["a.weight"], noised["a.weight"])
        draws.append(noise)
        received = noised  # the next round trains from what this one released
    assert not torch.allclose(draws[0], draws[1])
    other = [privacy.privatize(received, received, cfg, 4, cid, secret)["a.weight"] for cid, secret in
             ((3, None), (4, None), (3, "node secret"))]
    assert not torch.allclose(other[0], other[1]) and not torch.allclose(other[0], other[2])


def test_local_dp_the_server_receives_noised_changes_and_averages_them_as_they_are(tiny_cfg, tmp_path):
    """What the server received (the audit record) is noised on the clients: per-coordinate std sigma * C
    when C is tiny; the server adds no clipping or noise of its own: over three rounds the global track
    moves by exactly the sum of the rounds' means of the received changes."""
    from fedslip.model import TrackedModel, load_tokenizer

    sigma, clip_norm = 2e4, 1e-5  # the clipped change (norm <= 1e-5) vanishes next to noise of std 0.2
    cfg = tiny_cfg(rounds=3, dp_clip=clip_norm, dp_noise_multiplier=sigma, dp_mode="local", audit=True)
    summary = fedslip.run(cfg, tmp_path / "run", progress=False, log=False)
    expected = TrackedModel(cfg, load_tokenizer(cfg.backbone)).global_state()  # the seeded initial track
    for round_idx in (1, 2, 3):
        received = load_tensors(tmp_path / "run" / "audit" / f"round-{round_idx:04d}.safetensors")
        flat = torch.cat([t.flatten() for t in received.values()])
        assert abs(flat.std().item() - sigma * clip_norm) < 0.05 * sigma * clip_norm
        clients = sorted({key.split("/", 1)[0] for key in received})
        assert len(clients) == cfg.num_clients
        for n in expected:  # equal row counts: the FedAvg weights are equal
            expected[n] = expected[n] + sum(received[f"{c}/{n}"] for c in clients) / len(clients)
    final = load_tensors(tmp_path / "run" / "global.safetensors")
    assert all(torch.allclose(final[n], expected[n], atol=1e-5) for n in expected)
    assert summary["dp_mode"] == "local" and summary["dp_epsilon"] == pytest.approx(privacy.epsilon(cfg, 3))


def test_local_dp_epsilon_is_the_accountants_for_one_clients_releases(tiny_cfg):
    """Per client against the server: a Gaussian release with sensitivity 2C (replace-one), noise multiplier
    sigma / 2, every round, no amplification by sampling (the server knows who took part)."""
    cfg = tiny_cfg(num_clients=10, fraction_fit=0.3, dp_clip=1.0, dp_noise_multiplier=4.0, dp_mode="local")
    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_event.GaussianDpEvent(2.0), 5)
    assert privacy.epsilon(cfg, 5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    central = tiny_cfg(num_clients=10, fraction_fit=0.3, dp_clip=1.0, dp_noise_multiplier=4.0)
    assert privacy.epsilon(cfg, 5) > privacy.epsilon(central, 5)


def test_local_dp_settings(tiny_cfg):
    assert tiny_cfg(dp_clip=1.0, dp_mode="local", aggregation="median").dp_mode == "local"  # post-processing
    with pytest.raises(fedslip.ConfigError, match="dp_mode"):
        tiny_cfg(dp_clip=1.0, dp_mode="server")
