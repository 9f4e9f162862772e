"""Where things live: the project's declarative folders and the TWIN_HOME runtime folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
PROJECT_ROOT = Path(os.environ.get("TWIN_PROJECT_ROOT", PACKAGE_ROOT.parent)).resolve()
ASSETS_DIR = PROJECT_ROOT / "assets"
EXPECTATIONS_DIR = PROJECT_ROOT / "expectations"
POLICIES_DIR = PROJECT_ROOT / "policies"
SHARED_DATA_DIR = Path(
    os.environ.get("TWIN_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data")
).resolve()


@dataclass(frozen=True)
class Settings:
    """Runtime locations under TWIN_HOME (default ./var). The one place environment is read."""

    home: Path

    @classmethod
    def from_env(cls, home: str | os.PathLike[str] | None = None) -> Settings:
        raw = home if home is not None else os.environ.get("TWIN_HOME", "var")
        return cls(home=Path(raw).expanduser().resolve())

    @property
    def store_path(self) -> Path:
        return self.home / "twin.duckdb"

    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    @property
    def data_docs_dir(self) -> Path:
        return self.home / "data_docs"

    @property
    def spill_dir(self) -> Path:
        """Where DuckDB spills work that does not fit its memory limit (files encrypted)."""
        return self.home / "spill"

    @property
    def lock_path(self) -> Path:
        return self.home / "run.lock"

    def ensure(self) -> Settings:
        """Create TWIN_HOME and its sub-folders (keys folder private)."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.reports_dir.mkdir(exist_ok=True)
        self.keys_dir.mkdir(mode=0o700, exist_ok=True)
        return self
