"""FedSLIP: personalized federated fine-tuning of transformer text classifiers with dual-track LoRA.

Python API (the CLI is a thin layer over it)::

    import fedslip
    cfg = fedslip.make_config({"method": "fedslip", "rounds": 5})
    summary = fedslip.run(cfg, "runs/fedslip")
"""

__version__ = "0.1.0"

from .api import kstep, resume, run  # noqa: E402
from .config import ConfigError, ExperimentConfig, load_config, make_config  # noqa: E402

__all__ = ["ConfigError", "ExperimentConfig", "make_config", "load_config", "kstep", "resume", "run", "__version__"]
