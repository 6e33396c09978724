"""Regenerate pyproject.toml's ``[tool.flwr.app.config]`` from the config dataclass: the table that
``fedslip flower-app`` writes for an installed package (``fedslip.launch.app_dir.app_table``; tests/test_flower.py
checks that the two are in sync)."""
from pathlib import Path

import tomli_w

from fedslip.launch.app_dir import app_table

pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
text = pyproject.read_text()
header = "[tool.flwr.app.config]\n"
start = text.index(header) + len(header)
end = text.index("\n[", start)
pyproject.write_text(text[:start] + tomli_w.dumps(app_table()["config"]).rstrip("\n") + "\n" + text[end:])
