"""The README's configuration reference lists every setting with its real default."""

from __future__ import annotations

import re
from pathlib import Path

from exporter import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_setting_is_documented_with_its_default() -> None:
    rows = dict(re.findall(r"^\| `(EXPORTER_[A-Z_]+)` \| ([^|]+) \|", README.read_text(), re.M))
    for name, field in Settings.model_fields.items():
        variable = f"EXPORTER_{name.upper()}"
        assert variable in rows, f"{variable} is missing from the README"
        default = field.get_default(call_default_factory=True)
        shown = rows[variable].strip()
        if default is None:
            assert shown == "unset", variable
        else:
            value = getattr(default, "value", default)
            assert shown == f"`{value}`", f"{variable}: README says {shown}, default is {value}"
    documented = set(rows) - {f"EXPORTER_{n.upper()}" for n in Settings.model_fields}
    assert not documented, f"README documents unknown settings: {documented}"
