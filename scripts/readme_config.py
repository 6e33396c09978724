"""Regenerate README.md's configuration table from the config dataclass (tests/test_config.py checks it)."""
from pathlib import Path

from fedslip.cli import config_reference

readme = Path(__file__).resolve().parents[1] / "README.md"
text = readme.read_text()
start = text.index("| key | flag | default | meaning |")
end = text.index("\n\n", start)
readme.write_text(text[:start] + config_reference() + text[end:])
