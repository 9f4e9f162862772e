"""Helpers for the EHR tests: land files, ingest them with the FHIR reader, harmonize."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from twin_pipeline.harmonize import fhir as ehr
from twin_pipeline.ingest import files_of_kind, ingest_files
from twin_pipeline.keys import KeyRing
from twin_pipeline.paths import Settings
from twin_pipeline.sources import load_readers
from twin_pipeline.store import Store

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "fhir"


class Ehr:
    """A landing folder plus a store; ``run()`` ingests new files and rebuilds every table."""

    def __init__(self, settings: Settings, landing: Path):
        self.settings = settings
        self.landing = landing
        landing.mkdir(parents=True, exist_ok=True)

    def write(self, rel: str, content: str | bytes) -> Path:
        path = self.landing / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    def ndjson(self, rel: str, resources: list[dict[str, Any]]) -> Path:
        return self.write(rel, "".join(json.dumps(r) + "\n" for r in resources))

    def copy_fixtures(self) -> None:
        shutil.copytree(FIXTURES, self.landing, dirs_exist_ok=True)

    def run(self, *, force: bool = False) -> dict[str, ehr.TableStats]:
        reader = load_readers()["fhir"]
        with Store.open(self.settings) as store:
            ingest_files(store, reader, files_of_kind(self.landing, "fhir"))
            return ehr.build_all(store, force=force)

    def store(self) -> Store:
        return Store.open(self.settings)

    def rows(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        with Store.open(self.settings, read_only=True) as store:
            return store.con.execute(sql, params or []).fetchall()

    def dicts(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        with Store.open(self.settings, read_only=True) as store:
            cur = store.con.execute(sql, params or [])
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def quarantine(self) -> dict[tuple[str, str], str]:
        return {
            (f, p): r
            for f, p, r in self.rows(
                "SELECT source_file, position, rule FROM governance.quarantine "
                "WHERE source_kind = 'fhir'"
            )
        }

    def hashes(self) -> dict[str, str]:
        with Store.open(self.settings, read_only=True) as store:
            return {
                t: store.content_hash(t)
                for t in store.tables(("raw", "harmonized"))
                if t.startswith("harmonized.") or t == "raw.fhir_resource"
            }


@pytest.fixture
def ehr_env(twin_home: Settings, tmp_path: Path) -> Iterator[Ehr]:
    yield Ehr(twin_home, tmp_path / "landing")


def private_env(root: Path) -> Ehr:
    """An Ehr with its own TWIN_HOME (for module-scoped fixtures; no environment change)."""
    settings = Settings.from_env(root / "twin_home").ensure()
    KeyRing(settings.keys_dir).init()
    return Ehr(settings, root / "landing")
