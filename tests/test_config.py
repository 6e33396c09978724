"""Config: presets, precedence (defaults < preset < TOML < flags), validation, reference in docs/configuration.md."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

import fedslip
from fedslip.cli import build_parser, config_overrides, config_reference
from fedslip.config import FIELDS, PRESET_KEYS, PRESETS, ConfigError, ExperimentConfig, load_config, make_config


def test_defaults_are_the_seed_protocol():
    cfg = make_config()
    assert (cfg.method, cfg.num_clients, cfg.dominant_fraction, cfg.partition) == ("fedslip", 4, 0.8, "dominant")
    assert (cfg.backbone, cfg.lora_rank, cfg.head) == ("minilm", 8, "shared")


def test_presets_fill_method_fields_but_user_values_win():
    assert make_config({"method": "fedslip"}).objective == "separated"
    assert make_config({"method": "dual_naive"}).head == "shared_full"
    assert make_config({"method": "fedslip", "fedprox_mu": 0}).fedprox_mu == 0.0
    assert make_config({"method": "fedslip", "detach": False}).detach is False


def test_toml_then_flags_precedence(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('method = "fedslip"\nrounds = 7\nlora_targets = ["query"]\n')
    args = build_parser().parse_args(["run", "--out", "x", "--config", str(path), "--rounds", "3",
                                      "--dominant-fraction", "0.5", "--no-detach", "--lora-targets", "query,value"])
    cfg = make_config(config_overrides(args), args.config)
    assert (cfg.method, cfg.rounds, cfg.dominant_fraction, cfg.detach) == ("fedslip", 3, 0.5, False)
    assert cfg.lora_targets == ["query", "value"]
    assert make_config(toml_path=path).rounds == 7


def test_every_field_has_a_flag_and_help():
    parser = build_parser()
    run_parser = parser._subparsers._group_actions[0].choices["run"]
    flags = {opt for a in run_parser._actions for opt in a.option_strings}
    for name, f in FIELDS.items():
        assert "--" + name.replace("_", "-") in flags
        assert f.metadata["help"]


def test_resolved_config_roundtrips_through_toml(tmp_path):
    cfg = make_config({"method": "fedslip", "rounds": 3, "lora_targets": ["query"]})
    cfg.save(tmp_path / "config.toml")
    assert load_config(tmp_path / "config.toml") == cfg


@pytest.mark.parametrize("overrides, needle", [
    ({"rounds": 0}, "rounds"),
    ({"rounds": -2}, "rounds"),
    ({"dominant_fraction": 0}, "dominant_fraction"),
    ({"dominant_fraction": 1.5}, "dominant_fraction"),
    ({"batch_size": 0}, "batch_size"),
    ({"method": "fedsgd"}, "method"),
    ({"partition": "shards"}, "partition"),
    ({"fraction_fit": 0}, "fraction_fit"),
    ({"private_target_sparsity": 1.0}, "private_target_sparsity"),
    ({"lr": float("nan")}, "lr"),
    ({"rounds": "three"}, "rounds"),
    ({"rounds": 2.5}, "rounds"),
    ({"detach": "maybe"}, "detach"),
    ({"no_such_key": 1}, "no_such_key"),
    ({"eval_split": "val"}, "val_samples_per_client"),
    ({"local_epochs": 0, "local_steps": 0}, "local_epochs"),
])
def test_invalid_values_give_one_clear_error(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        make_config(overrides)


def test_missing_or_broken_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        make_config(toml_path=tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        make_config(toml_path=bad)


def test_direct_construction_validates_too():
    with pytest.raises(ConfigError):
        ExperimentConfig(rounds=0)


def test_docs_config_reference_is_in_sync():
    page = (REPO / "docs" / "configuration.md").read_text()
    assert config_reference() in page, "regenerate the table with `python scripts/docs_config.py`"


def test_shipped_configs_load():
    protocols = {}
    for path in sorted((REPO / "configs").glob("*.toml")):
        cfg = make_config(toml_path=path)
        protocols[path.stem] = (cfg.partition, cfg.num_clients, cfg.num_clients * cfg.samples_per_client)
    # the seed protocol (4 clients, 80% dominant class; 2000 rows per client on DistilBERT), and the
    # Dirichlet protocol with seed_cpu's training rows in total, spread over 10 clients; the three-organisation
    # example (each client's own file)
    assert protocols == {"seed_cpu": ("dominant", 4, 2000), "seed_distilbert": ("dominant", 4, 8000),
                         "dirichlet": ("dirichlet", 10, 2000), "three_orgs": ("own", 3, 1500),
                         "cross_device": ("dirichlet", 100, 10000), "fdu_mtl": ("natural", 16, 22400)}
    assert make_config(toml_path=REPO / "configs" / "dirichlet.toml").dirichlet_alpha == 0.3
    assert make_config(toml_path=REPO / "configs" / "seed_cpu.toml") == make_config(), \
        "seed_cpu.toml spells out the package defaults (the README's default experiment)"


def test_the_cli_starts_without_the_training_stack():
    """`fedslip --help` / `--version` must not import torch, transformers, peft or flwr (seconds each)."""
    code = ("import sys, fedslip.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'flwr') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    version = subprocess.run([sys.executable, "-m", "fedslip.cli", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == f"fedslip {fedslip.__version__}"


def test_make_config_takes_keyword_arguments_too():
    cfg = make_config({"rounds": 4}, method="fedslip", lr=1e-3)
    assert (cfg.method, cfg.rounds, cfg.lr, cfg.fedprox_mu) == ("fedslip", 4, 1e-3, 0.01)  # preset applied
    with pytest.raises(ConfigError, match="unknown config key.*bogus"):
        make_config(bogus=1)


@pytest.mark.parametrize("method", ["fedavg_lora", "dual_naive", "fedslip", "centralized"])
def test_every_way_of_building_a_config_applies_the_preset(method):
    """ExperimentConfig(method=...) once built FedAvg's fields for any method (only make_config applied
    presets); an explicitly given value still wins over the preset."""
    direct = ExperimentConfig(method=method)
    assert direct == make_config(method=method) == make_config({"method": method})
    assert all(getattr(direct, k) == v for k, v in PRESETS[method].items())
    assert ExperimentConfig(method=method, fedprox_mu=0.5).fedprox_mu == 0.5
    assert set(PRESETS[method]) <= set(PRESET_KEYS)


def test_a_config_written_before_a_key_existed_compares_at_that_keys_default():
    """A checkpoint of an older version lacks keys added since; it ran with their defaults (which keep the
    old behaviour), so resuming or comparing it is not refused for them; a real change still is."""
    cfg = make_config({"method": "fedslip", "rounds": 3})
    old = {k: v for k, v in cfg.experiment_dict().items() if k not in ("dp_clip", "local_params", "private_weight")}
    assert cfg.experiment_diff(old) == {}
    changed = make_config({"method": "fedslip", "rounds": 3, "dp_clip": 0.5})
    assert changed.experiment_diff(old) == {"dp_clip": (0.0, 0.5)}
    assert cfg.experiment_diff({**old, "rounds": 4}) == {"rounds": (4, 3)}
