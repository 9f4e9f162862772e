"""A store holding a small synthetic hospital in harmonized tables, with the twin graph built."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from twin_pipeline.paths import Settings
from twin_pipeline.store import Store
from twin_pipeline.twin import synthetic
from twin_pipeline.twin.graph import GraphReport, build_graph
from twin_pipeline.twin.model import TwinModel, load_model


@pytest.fixture
def model() -> TwinModel:
    return load_model()


@pytest.fixture
def hospital_store(twin_home: Settings) -> Iterator[Store]:
    """Store with 120 synthetic patients over 8 weeks (no graph yet)."""
    store = Store.open(twin_home)
    with store.transaction():
        synthetic.create_hospital(store, 120, seed=11, days=56)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def graph_store(hospital_store: Store, model: TwinModel) -> tuple[Store, GraphReport]:
    report = build_graph(hospital_store, model)
    return hospital_store, report
