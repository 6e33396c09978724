"""Regenerate docs/configuration.md's table from the config dataclass (tests/test_config.py checks it)."""
from pathlib import Path

from fedslip.cli import config_reference

page = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
text = page.read_text()
start = text.index("| key | flag | default | meaning |")
end = text.find("\n\n", start)  # the table ends at a blank line or at the end of the page
end = len(text.rstrip("\n")) if end < 0 else end
page.write_text(text[:start] + config_reference() + text[end:] + ("" if text[end:] else "\n"))
