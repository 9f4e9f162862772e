"""Reading the YAML specs (assets, expectations, policies, scenarios).

PyYAML's libyaml loader when it is there: the same documents as ``yaml.safe_load`` (tested over
every spec in the repository) in about a quarter of the time. ``twin run`` reads ~30 spec files,
some of them in several steps."""

from __future__ import annotations

from typing import Any

import yaml

SAFE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def safe_load(text: str | bytes) -> Any:
    """``yaml.safe_load`` through libyaml when available."""
    return yaml.load(text, Loader=SAFE_LOADER)
