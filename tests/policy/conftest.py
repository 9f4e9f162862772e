"""A small twin store with harmonized, de-identified, governance and raw tables, built by hand.

Patients p1..p4 (identified) are pseudonymized to d1..d4; d1 and d3 gave research consent, d2 did
not, d4 has no recorded consent (NULL), so a researcher sees d1 and d3 only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from twin_pipeline import ledger
from twin_pipeline.keys import KeyRing
from twin_pipeline.paths import Settings
from twin_pipeline.policy import Gateway
from twin_pipeline.store import Store

SSN_P2 = "123-45-6789"
FAMILY_P1 = "Quenneville"

DDL = f"""
CREATE TABLE harmonized.patient AS SELECT * FROM (VALUES
  ('p1', 'MRN001', '111-22-3333', '{FAMILY_P1}', 'Ada', 'female', DATE '1950-03-14',
   '1 Elm St', '02139', '555-0101', 'ada@example.org', TRUE, 'lk-p1'),
  ('p2', 'MRN002', '{SSN_P2}', 'Okafor', 'Ben', 'male', DATE '1961-07-02',
   '2 Oak Ave', '02140', '555-0102', 'ben@example.org', FALSE, 'lk-p2'),
  ('p3', 'MRN003', '222-33-4444', 'Lindqvist', 'Cy', 'male', DATE '1977-11-30',
   '3 Pine Rd', '02141', '555-0103', NULL, TRUE, 'lk-p3'),
  ('p4', 'MRN004', '333-44-5555', 'Moreau', 'Di', 'female', DATE '1988-01-09',
   '4 Birch Ln', '02142', '555-0104', 'di@example.org', NULL, 'lk-p4')
) AS t(patient_id, mrn, ssn, family_name, given_name, gender, birth_date, address_line,
       postal_code, phone, email, research_consent, lineage_key);
CREATE TABLE harmonized.observation AS SELECT * FROM (VALUES
  ('o1', 'p1', '8867-4', 72.0, '/min', 'lk-o1'),
  ('o2', 'p1', '8867-4', 75.0, '/min', 'lk-o2'),
  ('o3', 'p2', '8867-4', 90.0, '/min', 'lk-o3'),
  ('o4', 'p3', '8310-5', 37.1, 'Cel', 'lk-o4'),
  ('o5', 'p4', '8867-4', 60.0, '/min', 'lk-o5')
) AS t(observation_id, patient_id, code, value, unit, lineage_key);
CREATE TABLE harmonized.device AS SELECT * FROM (VALUES
  ('dev1', 'p1', 'Acme', 'SN-000123', 'lk-dev1')
) AS t(device_id, patient_id, manufacturer, serial_number, lineage_key);
CREATE TABLE deid.patient AS SELECT * FROM (VALUES
  ('d1', 'female', DATE '1950-01-01', '021', TRUE, 'lk-p1', 1),
  ('d2', 'male', DATE '1961-01-01', '021', FALSE, 'lk-p2', 1),
  ('d3', 'male', DATE '1977-01-01', '021', TRUE, 'lk-p3', 1),
  ('d4', 'female', DATE '1988-01-01', '021', NULL, 'lk-p4', 1)
) AS t(patient_id, gender, birth_date, zip3, research_consent, lineage_key, key_version);
CREATE TABLE deid.observation AS SELECT * FROM (VALUES
  ('x1', 'd1', '8867-4', 72.0, '/min', 'lk-o1', 1),
  ('x2', 'd1', '8867-4', 75.0, '/min', 'lk-o2', 1),
  ('x3', 'd2', '8867-4', 90.0, '/min', 'lk-o3', 1),
  ('x4', 'd3', '8310-5', 37.1, 'Cel', 'lk-o4', 1),
  ('x5', 'd4', '8867-4', 60.0, '/min', 'lk-o5', 1)
) AS t(observation_id, patient_id, code, value, unit, lineage_key, key_version);
CREATE TABLE deid.device AS SELECT * FROM (VALUES
  ('e1', 'd1', 'Acme', 'SN-000123', 'lk-dev1', 1),
  ('e2', 'd2', 'Acme', 'SN-000456', 'lk-dev2', 1)
) AS t(device_id, patient_id, manufacturer, serial_number, lineage_key, key_version);
CREATE TABLE deid.location AS SELECT * FROM (VALUES
  ('l1', 'Ward 4B', 'ward', 'lk-l1', 1), ('l2', 'ICU', 'icu', 'lk-l2', 1)
) AS t(location_id, name, type_code, lineage_key, key_version);
CREATE TABLE deid.imaging_series AS SELECT * FROM (VALUES
  ('s1', 'd1', 'CT'), ('s2', 'd2', 'MR')
) AS t(series_instance_uid, patient_id, modality);
CREATE TABLE deid.imaging_instance AS SELECT * FROM (VALUES
  ('i1', 's1'), ('i2', 's1'), ('i3', 's2')
) AS t(sop_instance_uid, series_instance_uid);
CREATE TABLE governance.validation_result AS SELECT * FROM (VALUES
  ('harmonized.patient', 'not_null_mrn', TRUE, 0)
) AS t(table_name, expectation, success, unexpected);
CREATE TABLE raw.fhir_resource AS SELECT * FROM (VALUES
  ('{{"resourceType":"Patient","ssn":"{SSN_P2}"}}', 'lk-p2')
) AS t(payload, lineage_key);
CREATE TABLE twin.twin.node AS SELECT * FROM (VALUES ('n1', 'ward')) AS t(node_id, kind);
"""


def build_store(settings: Settings) -> None:
    with Store.open(settings) as store:
        with store.transaction() as con:
            con.execute(DDL)
        from twin_pipeline.store import QuarantineRow

        with store.transaction():
            store.quarantine(
                [
                    QuarantineRow(
                        stage="read",
                        table_name="raw.fhir_resource",
                        source_kind="fhir",
                        source_file="ehr/bundles/b1.json",
                        position="entry:3",
                        rule="missing_required",
                        reason="ehr/bundles/b1.json [entry:3]: Patient without id",
                        payload=f'{{"name":"{FAMILY_P1}"}}',
                    )
                ]
            )
        ledger.append(store, "prov", {"activity": "seed"})


@pytest.fixture(scope="module")
def gw_home(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    home: Path = tmp_path_factory.mktemp("gw") / "twin_home"
    settings = Settings.from_env(home).ensure()
    KeyRing(settings.keys_dir).init()
    build_store(settings)
    return settings


@pytest.fixture(scope="module")
def gateway(gw_home: Settings) -> Iterator[Gateway]:
    with Gateway(gw_home, timeout_s=20) as gw:
        yield gw


def last_audit(gw: Gateway) -> dict[str, Any]:
    """The newest audit entry of the ledger, as a dict (with its seq)."""
    row = gw.store.con.execute(
        "SELECT seq, payload FROM governance.ledger WHERE kind = 'audit' ORDER BY seq DESC LIMIT 1"
    ).fetchone()
    assert row is not None, "no audit entry"
    doc: dict[str, Any] = json.loads(row[1])
    doc["seq"] = int(row[0])
    return doc
