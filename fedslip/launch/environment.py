"""What every Flower process of a run gets, for both launchers (``simulation``, ``deployment``): no
telemetry or update checks, Flower's home (``FLWR_HOME``) and Ray's temp dir inside the run's directory."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def flower_environment(run_path: Path) -> dict[str, str]:
    """Environment every Flower process of a run gets: no telemetry, no update checks, no runtime
    dependency installation, and Flower's home inside the run directory."""
    return {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_HOME": str(run_path / ".flwr")}


@contextlib.contextmanager
def scoped_environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration (Ray's workers inherit them), then restore them."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    Path(values["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


RAY_MAX_TEMP_DIR_LEN = 40  # Ray puts unix sockets ~62 characters below it; the OS limit is 107


@contextlib.contextmanager
def ray_temp_dir(target: Path) -> Iterator[str]:
    """Ray's temp dir at ``target`` (inside the run directory). Ray's unix-socket paths must stay short,
    so a deep ``target`` is reached through a short symlink in the system temp dir, removed afterwards."""
    target.mkdir(parents=True, exist_ok=True)
    if len(str(target)) <= RAY_MAX_TEMP_DIR_LEN:
        yield str(target)
        return
    link = Path(tempfile.gettempdir()) / f"fedslip-ray-{hashlib.sha1(str(target).encode()).hexdigest()[:10]}"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)
    try:
        yield str(link)
    finally:
        link.unlink(missing_ok=True)
