"""Files on disk: atomic writes (temp file, fsync, rename) and safetensors reads with clear errors.

A crash mid-write leaves the previous file intact, never a half-written one.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


class StateFileError(ValueError):
    """A state or checkpoint file is missing, truncated or corrupt; the message names the file."""


class RunDirError(ValueError):
    """The output directory already holds a run (and --overwrite was not given), or is not usable; or a path
    given as a run is not a run directory, or holds a run that has not finished."""


RUN_DIR_HOLDS = ("a run directory is the --out of fedslip run: config.toml, metrics.jsonl, checkpoint/, and "
                 "once the run finished summary.json and global.safetensors")


def run_directory(path: str | Path) -> Path:
    """``path``, refused unless it is a run directory (its ``config.toml`` marks it)."""
    path = Path(path)
    if not (path / "config.toml").is_file():
        what = "does not exist" if not path.exists() else "is a file" if not path.is_dir() else "holds no config.toml"
        raise RunDirError(f"{path} is not a run directory: it {what} ({RUN_DIR_HOLDS})")
    return path


def finished_run(path: str | Path, written_at_the_end: str = "summary.json") -> Path:
    """``path``, refused unless it holds a finished run (``summary.json``, or the final ``global.safetensors`` for
    what only needs the model); an interrupted run is named as such, with the command that finishes it."""
    path = run_directory(path)
    if not (path / written_at_the_end).is_file():
        raise RunDirError(f"run not finished in {path} (no {written_at_the_end}); continue with fedslip run --resume "
                          f"{path}")
    return path


def plain_file_mode() -> int:
    """The mode a plain ``open()`` gives a new file (0644 under the usual umask; read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def set_plain_mode(files: list[Path]) -> list[Path]:
    """Give files that a library wrote (safetensors writes 0600) the mode of every other file of a run."""
    for file in files:
        os.chmod(file, plain_file_mode())
    return list(files)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` via a temporary file and a rename (a crash leaves the old file or the new one).
    The file gets the mode a plain ``open()`` would give it (0644 under the usual umask), like every
    other file of a run, not mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, plain_file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    atomic_write_bytes(path, st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def _unreadable(path: Path, e: Exception) -> StateFileError:
    return StateFileError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}")


READ_ERRORS = (SafetensorError, ValueError, RuntimeError, OSError, struct.error)


def load_tensors_and_metadata(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise StateFileError(f"{path} does not exist")
    try:
        data = path.read_bytes()
        tensors = st_load(data)
        header = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])
    except READ_ERRORS as e:
        raise _unreadable(path, e) from None
    return tensors, header.get("__metadata__", {})


def read_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata from its header alone (no tensor bytes read)."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read(struct.unpack("<Q", f.read(8))[0])).get("__metadata__", {})
    except READ_ERRORS as e:
        raise _unreadable(path, e) from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_tensors_and_metadata(path)[0]


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise StateFileError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise StateFileError(f"{path} is not readable JSON (truncated or corrupt?): {e}") from None
