"""A store built once per session by the lineage mini graph (two runs, some audited accesses);
tests that change it work on a private copy."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.lineage import minigraph
from twin_pipeline import audit
from twin_pipeline.keys import KeyRing
from twin_pipeline.paths import Settings
from twin_pipeline.store import Store


@dataclass
class Built:
    settings: Settings
    landing: Path
    run_ids: list[str]


def _build(root: Path) -> Built:
    settings = Settings.from_env(root / "home").ensure()
    KeyRing(settings.keys_dir).init()
    landing = minigraph.write_landing(root / "landing")
    first = minigraph.materialize(settings, landing, user="engineer", role="data_engineer")
    with Store.open(settings) as store:
        audit.record_access(
            store,
            user="rita",
            role="researcher",
            sql="SELECT value FROM deid.lt_observation",
            relations=["deid.lt_observation"],
            rows=12,
            decision="allow",
        )
        audit.record_access(
            store,
            user="rita",
            role="researcher",
            sql="SELECT * FROM harmonized.lt_observation",
            relations=["harmonized.lt_observation"],
            decision="deny",
            reason="researcher may not read harmonized.lt_observation",
        )
    (landing / "obs" / "c.ndjson").write_text(
        '{"id": "obs-c1", "patient": "p9", "value": 99, "unit": "/min"}\n'
    )
    second = minigraph.materialize(settings, landing, user="admin", role="admin")
    return Built(settings, landing, [first, second])


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return _build(tmp_path_factory.mktemp("lineage_built"))


@pytest.fixture
def built_copy(built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Built]:
    """A private copy of the built store and keys (TWIN_HOME exported for the CLI)."""
    home = tmp_path / "home"
    shutil.copytree(built.settings.home, home)
    monkeypatch.setenv("TWIN_HOME", str(home))
    yield Built(Settings.from_env(home), built.landing, list(built.run_ids))
