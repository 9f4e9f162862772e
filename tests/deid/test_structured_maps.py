"""Keyed maps of distinct values (Python HMAC) give exactly the SQL HMAC's surrogates, and
string columns whose values are nearly all distinct are written uncompressed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from twin_pipeline.deid import keyed
from twin_pipeline.deid.policy import load_policy
from twin_pipeline.deid.structured import deidentify_table
from twin_pipeline.keys import KeyRing
from twin_pipeline.paths import Settings
from twin_pipeline.store import Store

ROWS = 30_000


@pytest.mark.parametrize("key", [bytes(range(32)), b"k" * 100, b"", b"\xff" * 64])
@pytest.mark.parametrize(
    "values",
    [["p1", "p2", "p1"], [""], ["é漢字", "x" * 300, "a\x1fb"], [str(i) for i in range(50)]],
)
def test_hmac_midstates_equal_hmac(key: bytes, values: list[str]) -> None:
    h = keyed.Hmac(key)
    assert h.hex_many("patient", values) == [keyed.hmac_hex(key, "patient", v) for v in values]
    assert h.pseudonyms("mrn", values, 16) == [keyed.pseudonym(key, "mrn", v, 16) for v in values]
    assert h.day_offsets(values, 30) == [keyed.day_offset(key, v, 30) for v in values]
    assert h.dicom_uids(values) == [keyed.dicom_uid(key, v) for v in values]


def _observation_sql(rows: int) -> str:
    """harmonized.observation with every policy column; observation_id BIGINT (not VARCHAR)."""
    cols = load_policy().tables["observation"].columns
    special = {
        "observation_id": "CAST(i * 7 AS BIGINT)",
        "patient_id": "'patient-' || CAST(i % 97 AS VARCHAR)",
        "encounter_id": "'enc-' || CAST(i // 20 AS VARCHAR)",
        "device_id": "CASE WHEN i % 10 = 0 THEN 'dev-' || CAST(i % 13 AS VARCHAR) END",
        "value": "CAST(i % 200 AS DOUBLE)",
        "original_value": "CAST(i % 200 AS DOUBLE)",
        "component_index": "CAST(i % 3 AS BIGINT)",
        "deleted": "FALSE",
        "effective_at": "TIMESTAMPTZ '2024-01-01 00:00:00+00' + to_seconds(i)",
        "last_updated": "TIMESTAMPTZ '2024-01-01 00:00:00+00' + to_seconds(i)",
        "code": "['8480-6', '8462-4', '8867-4'][1 + i % 3]",
        "lineage_key": "md5(CAST(i AS VARCHAR))",
        "source_position": "'line:' || CAST(i AS VARCHAR)",
    }
    exprs = [f"{special.get(c, repr(c + '-value'))} AS {c}" for c in cols]
    return (
        f"CREATE TABLE harmonized.observation AS SELECT {', '.join(exprs)} FROM range({rows}) t(i)"
    )


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    settings = Settings.from_env(tmp_path_factory.mktemp("deid_maps")).ensure()
    KeyRing(settings.keys_dir).init()
    with Store.open(settings) as store:
        store.con.execute(_observation_sql(ROWS))
        store.con.execute("CHECKPOINT")
        with store.transaction():
            res = deidentify_table(store, load_policy(), "observation")
        assert res.status == "written" and res.rows == ROWS
        store.con.execute("CHECKPOINT")
        yield store


def test_every_surrogate_equals_the_sql_hmac(written: Store) -> None:
    """The reference: the HMAC computed row by row in DuckDB from the key's pads."""
    key = KeyRing(written.settings.keys_dir).pseudonym_key()
    params = keyed.SqlKey.from_key(key).params()
    checks = {
        "observation_id": keyed.sql_pseudonym("h.observation_id", "observation"),
        "patient_id": keyed.sql_pseudonym("h.patient_id", "patient"),
        "encounter_id": keyed.sql_pseudonym("h.encounter_id", "encounter"),
        "device_id": keyed.sql_pseudonym("h.device_id", "device"),
        # whole days of 86,400 s on the instant
        "effective_at": "h.effective_at + to_seconds(86400 * "
        + keyed.sql_day_offset("h.patient_id")
        + ")",
    }
    for col, ref in checks.items():
        row = written.con.execute(
            f"SELECT count(*), count(*) FILTER (WHERE d.{col} IS NOT DISTINCT FROM {ref}), "
            f"count(d.{col}) FROM deid.observation d JOIN harmonized.observation h "
            "USING (lineage_key)",
            params,
        ).fetchone()
        assert row is not None
        total, same, non_null = row
        assert total == ROWS and same == ROWS, col
        assert non_null == (ROWS // 10 if col == "device_id" else ROWS), col


def test_nearly_distinct_strings_are_stored_uncompressed(written: Store) -> None:
    rows = written.con.execute(
        "SELECT column_name, list(DISTINCT compression) FROM pragma_storage_info('deid.observation') "
        "WHERE segment_type = 'VARCHAR' GROUP BY ALL"
    ).fetchall()
    comp = {c: set(v) for c, v in rows}
    # a row's own pseudonym and lineage key: every value distinct
    assert comp["observation_id"] == {"Uncompressed"}
    assert comp["lineage_key"] == {"Uncompressed"}
    # few distinct values: DuckDB still compresses them
    for col in ("patient_id", "code", "unit"):
        assert "Uncompressed" not in comp[col], (col, comp[col])


def test_timestamps_shift_the_same_in_any_session_time_zone(written: Store) -> None:
    """A store opened on a machine in another zone writes the same instants (no DST hour)."""
    sql = (
        "SELECT lineage_key, epoch_us(effective_at), epoch_us(last_updated) "
        "FROM deid.observation ORDER BY lineage_key"
    )
    before = written.con.execute(sql).fetchall()
    zone = written.con.execute("SELECT current_setting('TimeZone')").fetchone()
    try:
        written.con.execute("SET TimeZone = 'America/New_York'")
        with written.transaction():
            deidentify_table(written, load_policy(), "observation")
        assert written.con.execute(sql).fetchall() == before
    finally:
        written.con.execute(f"SET TimeZone = '{zone[0] if zone else 'UTC'}'")


@pytest.mark.parametrize("n", [0, 1, 10, 25])
def test_keyed_map_in_batches_covers_every_value_once(n: int) -> None:
    import duckdb
    import pyarrow as pa

    from twin_pipeline.deid.structured import _keyed_map

    con = duckdb.connect()
    con.execute(f"CREATE TABLE t AS SELECT CAST(i % 30 AS BIGINT) AS x FROM range({n}) r(i)")
    name, count = _keyed_map(
        con,
        "SELECT DISTINCT x AS v FROM t",
        lambda vs: [f"<{v}>" for v in vs],
        pa.string(),
        "m",
        batch_rows=10,
    )
    rows = con.execute(f"SELECT v, p FROM temp.{name} ORDER BY v").fetchall()
    assert count == len(rows) == min(n, 30)
    assert rows == [(i, f"<{i}>") for i in range(min(n, 30))]
