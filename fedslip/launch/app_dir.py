"""The FedSLIP Flower app as a directory ``flwr run`` takes, for an installed ``fedslip`` (a wheel, no source
checkout): one ``pyproject.toml`` naming the components of the installed package and declaring every config key.

    fedslip flower-app fedslip-app                 # or: fedslip.launch.app_dir.write_app_dir("fedslip-app")
    flwr run fedslip-app <connection> --run-config "out='/srv/fedslip/run' method='fedavg_lora'" --stream

The Flower App Bundle (FAB) that ``flwr run`` builds from it holds that ``pyproject.toml`` and nothing else:
``flwr-serverapp`` / ``flwr-clientapp`` put the unpacked FAB first on ``sys.path`` and import
``fedslip.flower_app``, which resolves to the ``fedslip`` installed in their environment. So every machine
(SuperLink, SuperNodes) needs the same ``fedslip`` installed, and runtime dependency installation off
(``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``, ``--disable-runtime-dependency-installation``): with it
on, Flower installs the app's dependencies (``fedslip==<version>``) with ``uv sync`` from a package index.

``fedslip deploy-local`` writes this directory into its workdir and runs it, from a wheel and from a checkout
alike. A checkout's own ``pyproject.toml`` declares the same ``[tool.flwr.app]`` (``scripts/flower_config.py``
regenerates it from ``app_table``) plus ``fab-include``, so ``flwr run .`` there ships the source instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomli_w
import tomllib

from .. import __version__
from ..flower_app import default_run_config

APP_NAME = "fedslip-app"  # [project].name of a written app directory (a checkout's is "fedslip")
PUBLISHER = "fedslip"
COMPONENTS = {"serverapp": "fedslip.flower_app:server_app", "clientapp": "fedslip.flower_app:client_app"}
HEADER = """\
# The FedSLIP Flower app for the installed fedslip package (written by `fedslip flower-app`).
# `flwr run DIR <connection> --run-config "out='/abs/run/dir' method='fedavg_lora'"` runs it; the FAB holds
# this file only: every SuperLink and SuperNode imports fedslip.flower_app from its own environment, so
# install the same fedslip everywhere and keep runtime dependency installation off.
# [tool.flwr.app.config]: every fedslip config key at its default ("preset" = the method preset decides).
"""


def app_table() -> dict[str, Any]:
    """``[tool.flwr.app]`` of the FedSLIP app: publisher, components and ``config`` (every config key at its
    default, from the config dataclass; ``fedslip.flower_app.default_run_config``)."""
    return {"publisher": PUBLISHER, "components": dict(COMPONENTS), "config": default_run_config()}


def app_pyproject() -> dict[str, Any]:
    """The app directory's ``pyproject.toml``: an app that depends on this ``fedslip`` and ships no source.
    No ``[tool.flwr.federations]``: Flower 1.42 reads connections from ``$FLWR_HOME/config.toml``."""
    project = {"name": APP_NAME, "version": __version__, "license": "Apache-2.0",
               "description": "FedSLIP's ServerApp and ClientApp from the installed fedslip package",
               "dependencies": [f"fedslip=={__version__}"]}
    return {"project": project, "tool": {"flwr": {"app": app_table()}}}


def write_app_dir(directory: str | Path) -> Path:
    """Write ``directory/pyproject.toml`` (creating the directory) and return its path. An existing
    ``pyproject.toml`` is replaced only if it is one of these (``[project].name = "fedslip-app"``): a checkout's
    or any other project's is refused with ``FileExistsError``."""
    path = Path(directory) / "pyproject.toml"
    if path.exists():
        try:
            name = tomllib.loads(path.read_text()).get("project", {}).get("name")
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError):
            name = None
        if name != APP_NAME:
            raise FileExistsError(f"{path} exists and is not a FedSLIP app directory (written by `fedslip "
                                  "flower-app`); choose another directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + "\n" + tomli_w.dumps(app_pyproject()))
    return path
