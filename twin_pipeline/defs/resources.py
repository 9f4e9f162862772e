"""The one Dagster resource: where the store and landing folder are, and who is running."""

from pathlib import Path

import dagster as dg

from twin_pipeline.paths import Settings
from twin_pipeline.store import Store


class TwinResource(dg.ConfigurableResource):  # type: ignore[misc]
    """Settings for one run. Defaults come from the environment (TWIN_HOME, TWIN_LANDING)."""

    twin_home: str = ""
    landing: str = ""
    user: str = "engineer"
    role: str = "data_engineer"

    def settings(self) -> Settings:
        return Settings.from_env(self.twin_home or None)

    def landing_dir(self) -> Path:
        if self.landing:
            return Path(self.landing).resolve()
        return self.settings().home / "landing"

    def open_store(self, run_id: str | None = None) -> Store:
        return Store.open(self.settings(), run_id=run_id)


def twin_resource_from_env() -> TwinResource:
    return TwinResource(
        twin_home=dg.EnvVar("TWIN_HOME").get_value("") or "",
        landing=dg.EnvVar("TWIN_LANDING").get_value("") or "",
        user=dg.EnvVar("TWIN_USER").get_value("engineer") or "engineer",
        role=dg.EnvVar("TWIN_ROLE").get_value("data_engineer") or "data_engineer",
    )
