"""FedSLIP: personalized federated fine-tuning of transformer text classifiers with dual-track LoRA.

Python API (the CLI is a thin layer over it)::

    import fedslip
    cfg = fedslip.make_config({"method": "fedslip", "rounds": 5})
    summary = fedslip.run(cfg, "runs/fedslip")
"""

__version__ = "0.1.0"

from .config import ConfigError, ExperimentConfig, load_config, make_config  # noqa: E402


def __getattr__(name: str):
    """``run``, ``resume``, ``kstep``, ``equal_compute_steps``, ``equal_compute_kstep`` and ``tune`` load torch,
    transformers, peft and flwr (``tune`` also optuna): imported on first use, so that ``fedslip --help``
    and config work stay fast."""
    if name in ("run", "resume", "kstep", "equal_compute_steps", "equal_compute_kstep"):
        from . import api

        return getattr(api, name)
    if name == "tune":
        from .tune import tune

        return tune
    raise AttributeError(f"module 'fedslip' has no attribute {name!r}")


__all__ = ["ConfigError", "ExperimentConfig", "make_config", "load_config", "kstep", "equal_compute_steps",
           "equal_compute_kstep", "resume", "run", "tune", "__version__"]
