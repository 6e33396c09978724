"""Regenerate pyproject.toml's ``[tool.flwr.app.config]`` from the config dataclass
(tests/test_flower.py checks that it is in sync)."""
from pathlib import Path

import tomli_w

from fedslip.flower_app import default_run_config

pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
text = pyproject.read_text()
header = "[tool.flwr.app.config]\n"
start = text.index(header) + len(header)
end = text.index("\n[", start)
pyproject.write_text(text[:start] + tomli_w.dumps(default_run_config()).rstrip("\n") + "\n" + text[end:])
