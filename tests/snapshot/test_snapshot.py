"""Snapshot export on a hand-built de-identified store (see conftest for the expected outcome)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import prov.model as pm
import pyarrow.parquet as pq
import pytest

from twin_pipeline.audit import access_events, verify_all
from twin_pipeline.errors import AccessDenied, ConfigError, PolicyViolation
from twin_pipeline.keys import KeyRing
from twin_pipeline.lineage import prov_build
from twin_pipeline.paths import POLICIES_DIR, Settings
from twin_pipeline.policy import Gateway
from twin_pipeline.snapshot import (
    SnapshotPolicy,
    SnapshotResult,
    create_snapshot,
    load_snapshot_policy,
    verify,
)
from twin_pipeline.store import Store

from .conftest import (
    DIABETES,
    FIXTURE_RUN,
    NOT_EXPORTED,
    RAW_IDENTIFIERS,
    RELEASED,
    SUPPRESSED,
    build_store,
)


@dataclass
class Shared:
    settings: Settings
    out: Path
    result: SnapshotResult


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Shared:
    """One store and one default snapshot for the tests that only read them."""
    root = tmp_path_factory.mktemp("shared_snapshot")
    settings = Settings.from_env(root / "home").ensure()
    KeyRing(settings.keys_dir).init()
    build_store(settings)
    out = root / "snap"
    return Shared(settings, out, create_snapshot("researcher", out, settings=settings))


def _table(out: Path, name: str) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = pq.read_table(out / "data" / f"{name}.parquet").to_pylist()
    return rows


def _manifest(out: Path) -> dict[str, object]:
    doc: dict[str, object] = json.loads((out / "manifest.json").read_text())
    return doc


def test_snapshot_contents_and_manifest(shared: Shared) -> None:
    out = shared.out
    result = shared.result
    assert verify(out).ok
    m = _manifest(out)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert "manifest.json" in files and "manifest.sig" in files and "README.md" in files
    assert "lineage.json" in files and "public_key.pem" in files
    assert sorted(m["files"]) == sorted(set(files) - {"manifest.json", "manifest.sig"})  # type: ignore[arg-type]
    tables = {t["table"]: t for t in m["tables"]}  # type: ignore[attr-defined]
    assert set(tables) == {
        "deid.patient",
        "deid.encounter",
        "deid.observation",
        "deid.condition",
        "deid.imaging_series",
        "deid.imaging_instance",
        "deid.location",
    }
    assert "deid.mystery" in m["excluded_tables"]  # type: ignore[operator]
    # row counts: 19 released patients, 3 encounters and 4 observations each
    assert tables["deid.patient"]["rows"] == 19
    assert tables["deid.encounter"]["rows"] == 57
    assert tables["deid.observation"]["rows"] == 76
    assert tables["deid.imaging_series"]["rows"] == 8  # group A only (C suppressed)
    assert tables["deid.imaging_instance"]["rows"] == 16
    assert tables["deid.location"]["rows"] == 3
    for t in tables.values():
        assert len(_table(out, t["file"].split("/")[1].removesuffix(".parquet"))) == t["rows"]
        assert t["source_version"]["run_id"] == FIXTURE_RUN
        assert {"name", "type"} <= set(t["schema"][0])
    assert m["source_run_ids"] == [FIXTURE_RUN]
    # INTERVAL has no Parquet type: exported as text
    enc_types = {f["name"]: f["type"] for f in tables["deid.encounter"]["schema"]}
    assert enc_types["length"] == "string" and enc_types["period_start"] == "timestamp[us, tz=UTC]"
    assert _table(out, "encounter")[0]["length"] in {"04:00:00", "05:00:00", "06:00:00"}
    assert "policies/snapshot.yaml" in m["policy_versions"]  # type: ignore[operator]
    assert "policies/roles.yaml" in m["policy_versions"]  # type: ignore[operator]
    kv = m["key_versions"]
    assert kv["pseudonym"].startswith("v1:") and kv["signing"].startswith("v1:")  # type: ignore[index]
    assert kv["pseudonym_versions_in_data"] == [1]  # type: ignore[index]
    assert m["code_version"]["git_commit"]  # type: ignore[index]
    assert m["snapshot_id"] == result.snapshot_id
    dc = m["disclosure_control"]
    assert dc["patients_considered"] == 23  # type: ignore[index]
    assert dc["patients_released"] == 19  # type: ignore[index]
    assert dc["patients_suppressed"] == 4  # type: ignore[index]
    assert dc["smallest_class_size"] == 5  # type: ignore[index]
    assert dc["smallest_class_before_suppression"] == 1  # type: ignore[index]
    # C: 3 patients x (1 patient + 3 enc + 4 obs + 1 cond + 1 series + 2 instances); F: 1 x 9
    assert dc["rows_suppressed"]["deid.encounter"] == 12  # type: ignore[index]
    assert dc["rows_suppressed"]["deid.imaging_instance"] == 6  # type: ignore[index]
    assert dc["rows_suppressed"]["total"] == 3 * 12 + 9  # type: ignore[index]
    card = (out / "README.md").read_text()
    assert "k = 5" in card and "`age_band`" in card and "date-shifted" in card
    assert "deid.mystery" in card


def test_reproducible_bytes(snap_home: Settings, tmp_path: Path, cohort_file: Path) -> None:
    a = create_snapshot("researcher", tmp_path / "a", settings=snap_home, cohort_path=cohort_file)
    b = create_snapshot("researcher", tmp_path / "b", settings=snap_home, cohort_path=cohort_file)
    assert a.snapshot_id == b.snapshot_id
    assert a.manifest_sha256 == b.manifest_sha256
    names = sorted(
        p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()
    )
    assert len(names) == 12  # 7 tables, card, lineage, public key, manifest, signature
    for rel in names:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


@pytest.mark.parametrize("threads", [1, 3])
def test_bytes_do_not_depend_on_thread_count(
    snap_home: Settings, tmp_path: Path, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tables are exported side by side, one worker per core: the files must not depend on how
    many workers there are."""
    from twin_pipeline.snapshot import create as create_mod

    base = create_snapshot("researcher", tmp_path / "base", settings=snap_home)
    monkeypatch.setattr(create_mod.os, "cpu_count", lambda: threads)
    other = create_snapshot("researcher", tmp_path / "other", settings=snap_home)
    assert {t["file"]: t["sha256"] for t in base.tables} == {
        t["file"]: t["sha256"] for t in other.tables
    }
    assert base.manifest_sha256 == other.manifest_sha256


def test_export_connection_writes_only_into_its_own_folder(
    snap_home: Settings, tmp_path: Path
) -> None:
    """The export gateway may COPY into the snapshot's temporary folder and nowhere else."""
    import duckdb

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    with Gateway(snap_home, write_directories=[allowed]) as gw:
        con = gw.store.con
        con.execute(f"COPY (SELECT 1 AS x) TO '{allowed / 'ok.parquet'}' (FORMAT parquet)")
        for target in (tmp_path / "elsewhere.parquet", allowed.parent / "allowed2" / "x.parquet"):
            with pytest.raises(duckdb.Error, match=r"(?i)permission|access"):
                con.execute(f"COPY (SELECT 1 AS x) TO '{target}' (FORMAT parquet)")
        with pytest.raises(duckdb.Error):
            con.execute("SET allowed_directories = ['/']")  # configuration is locked
    assert (allowed / "ok.parquet").exists()


def test_k_anonymity_holds_over_released_values(shared: Shared) -> None:
    out = shared.out
    patients = _table(out, "patient")
    assert "birth_year" not in patients[0] and "postal_code" not in patients[0]
    classes = Counter((p["age_band"], p["gender"], p["zip3"]) for p in patients)
    assert min(classes.values()) >= 5
    assert classes[("40-49", "female", "021")] == 8
    assert classes[("90+ or unknown", "male", "021")] == 5
    assert {p["patient_id"] for p in patients} == RELEASED
    # the gateway's mask of the researcher role on mrn (null or keyed hash) is applied
    mask = {t["table"]: t for t in _manifest(out)["tables"]}["deid.patient"]["masks"]["mrn"]  # type: ignore[attr-defined]
    assert mask in {"null", "hash"}
    assert all(p["mrn"] != f"m:{p['patient_id']}" for p in patients)
    assert all(
        (p["mrn"] is None) if mask == "null" else str(p["mrn"]).startswith("h:") for p in patients
    )
    # no row of a suppressed, non-consenting or deleted patient in any table
    for name in ("encounter", "observation", "condition", "imaging_series"):
        ids = {r["patient_id"] for r in _table(out, name)}
        assert ids <= RELEASED, name
        assert not ids & (SUPPRESSED | NOT_EXPORTED)
    series = {r["series_instance_uid"] for r in _table(out, "imaging_series")}
    assert {r["series_instance_uid"] for r in _table(out, "imaging_instance")} == series


def test_rows_keep_the_store_order(shared: Shared) -> None:
    """``parquet.order: store`` (shipped): the released rows in the order the store holds them."""
    with Store.open(shared.settings, read_only=True, private=True) as store:
        stored = store.con.execute(
            "SELECT observation_id, patient_id FROM deid.observation"
        ).fetchall()
    want = [oid for oid, pid in stored if pid in RELEASED]
    assert [r["observation_id"] for r in _table(shared.out, "observation")] == want
    assert "store" in _manifest(shared.out)["parquet"]["order"]  # type: ignore[index]


def _policy(**parquet: object) -> SnapshotPolicy:
    p = load_snapshot_policy()
    return p.model_copy(update={"parquet": p.parquet.model_copy(update=parquet)})


def test_lineage_key_order_survives_a_rebuild_in_another_order(
    snap_home: Settings, tmp_path: Path
) -> None:
    """``parquet.order: lineage_key``: rows sorted by lineage key, then every column, so a table
    rebuilt with the same rows in another physical order gives the same bytes."""
    policy = _policy(order="lineage_key")
    a = create_snapshot("researcher", tmp_path / "a", settings=snap_home, snapshot_policy=policy)
    obs = _table(tmp_path / "a", "observation")
    keys = [(r["lineage_key"], r["observation_id"]) for r in obs]
    assert keys == sorted(keys)
    assert _manifest(tmp_path / "a")["parquet"]["order"] == "lineage_key, then every column"  # type: ignore[index]
    store_order = create_snapshot("researcher", tmp_path / "s", settings=snap_home)
    with Store.open(snap_home) as store, store.transaction() as con:
        for t in ("deid.observation", "deid.encounter", "deid.patient"):
            con.execute(f"CREATE OR REPLACE TABLE {t} AS SELECT * FROM {t} ORDER BY rowid DESC")
    b = create_snapshot("researcher", tmp_path / "b", settings=snap_home, snapshot_policy=policy)
    assert {t["file"]: t["sha256"] for t in a.tables} == {t["file"]: t["sha256"] for t in b.tables}
    # the store order follows the rebuild: same rows, other bytes
    again = create_snapshot("researcher", tmp_path / "s2", settings=snap_home)
    before = {t["file"]: t["sha256"] for t in store_order.tables}
    after = {t["file"]: t["sha256"] for t in again.tables}
    assert before["data/observation.parquet"] != after["data/observation.parquet"]
    assert before["data/location.parquet"] == after["data/location.parquet"]
    for name in ("observation", "encounter", "patient"):
        rows_a = sorted(
            json.dumps(r, sort_keys=True, default=str) for r in _table(tmp_path / "s", name)
        )
        rows_b = sorted(
            json.dumps(r, sort_keys=True, default=str) for r in _table(tmp_path / "s2", name)
        )
        assert rows_a == rows_b, name


def test_cohort_selects_patients(snap_home: Settings, tmp_path: Path, cohort_file: Path) -> None:
    out = tmp_path / "snap"
    r = create_snapshot("researcher", out, settings=snap_home, cohort_path=cohort_file)
    assert {p["patient_id"] for p in _table(out, "patient")} == DIABETES
    assert {e["patient_id"] for e in _table(out, "encounter")} == DIABETES
    assert r.disclosure["patients_considered"] == 6
    assert r.disclosure["patients_suppressed"] == 0
    m = _manifest(out)
    assert m["name"] == "diabetes-women"
    assert m["cohort"]["include"]["conditions"] == ["44054006"]  # type: ignore[index]
    assert m["cohort"]["as_of_year"] == 2026  # type: ignore[index]
    assert len(m["cohort"]["file_sha256"]) == 64  # type: ignore[index, arg-type]


def test_small_cohort_is_suppressed_entirely(snap_home: Settings, tmp_path: Path) -> None:
    cohort = tmp_path / "old.yaml"
    cohort.write_text("name: old\ninclude: {age_min: 70, age_max: 79}\n")
    r = create_snapshot("researcher", tmp_path / "snap", settings=snap_home, cohort_path=cohort)
    assert r.disclosure["patients_considered"] == 3
    assert r.disclosure["patients_released"] == 0
    assert r.disclosure["smallest_class_size"] is None
    assert {t["table"]: t["rows"] for t in r.tables}["deid.patient"] == 0
    assert verify(tmp_path / "snap").ok


def test_no_raw_identifier_in_any_file(shared: Shared) -> None:
    out = shared.out
    texts = []
    for path in out.rglob("*"):
        if path.suffix == ".parquet":
            texts.append(json.dumps(pq.read_table(path).to_pylist(), default=str))
        elif path.is_file():
            texts.append(path.read_text())
    blob = "\n".join(texts)
    for ident in RAW_IDENTIFIERS:
        assert ident not in blob


def test_audit_and_lineage_records(shared: Shared) -> None:
    out = shared.out
    r = shared.result
    m = _manifest(out)
    with Store.open(shared.settings) as store:
        events = access_events(store)
        snap_events = [e for e in events if e.get("action") == "snapshot"]
        assert len(snap_events) == 1
        ev = snap_events[0]
        assert ev["decision"] == "allow" and ev["user"] == "researcher"
        assert ev["snapshot_id"] == r.snapshot_id and ev["rows"] == r.rows
        # every table was read through the gateway's own query path (its audit entries)
        queries = [e for e in events if e.get("action") == "query"]
        assert len(queries) == 1  # one governed query names every relation read
        assert queries[0]["decision"] == "allow" and queries[0]["user"] == "researcher"
        gateway_reads = set(queries[0]["relations"])
        assert {t["table"] for t in r.tables} <= gateway_reads
        acts = [
            json.loads(p[0])
            for p in store.con.execute(
                "SELECT payload FROM governance.ledger WHERE kind = 'activity'"
            ).fetchall()
        ]
        snap_act = next(a for a in acts if a["asset_key"] == "snapshot/consented-patients")
        assert snap_act["outputs"] == [
            {"table": "governance.snapshot", "rows": r.rows, "content_hash": r.snapshot_id}
        ]
        assert verify_all(store).ok
        bundle = store.con.execute(
            "SELECT prov_json FROM governance.prov_bundle WHERE run_id = ?", [snap_act["run_id"]]
        ).fetchone()
        assert bundle is not None
    snap_id = prov_build.table_version_id("governance.snapshot", r.snapshot_id)
    for doc_text in (bundle[0], (out / "lineage.json").read_text()):
        doc = prov_build.from_json(doc_text)
        derived = {
            str(rec.get_attribute("prov:usedEntity").pop())
            for rec in doc.get_records(pm.ProvDerivation)
            if str(rec.get_attribute("prov:generatedEntity").pop()) == snap_id
        }
        expected = {
            prov_build.table_version_id(t["table"], t["source_version"]["content_hash"])
            for t in m["tables"]  # type: ignore[attr-defined]
        }
        assert expected <= derived


def test_snapshot_rows_match_the_gateway(shared: Shared) -> None:
    out = shared.out
    with Gateway(shared.settings) as gw:
        loc = gw.query("researcher", "SELECT * FROM deid.location ORDER BY lineage_key")
        enc = gw.query(
            "researcher", "SELECT encounter_id FROM deid.encounter WHERE patient_id LIKE 'dA%'"
        )
    assert [tuple(r.values()) for r in _table(out, "location")] == loc.rows
    exported = {r["encounter_id"] for r in _table(out, "encounter")}
    assert {r[0] for r in enc.rows} <= exported


@pytest.mark.parametrize(
    ("user", "tables", "reason"),
    [
        ("engineer", None, "may not create snapshots"),
        ("engineer", ["harmonized.patient"], "may not create snapshots"),
        ("researcher", ["harmonized.patient"], "not a de-identified table"),
        ("admin", ["deid.patient"], "may not create snapshots"),
        ("mallory", None, "unknown user"),
    ],
)
def test_refused_and_audited(
    snap_home: Settings, tmp_path: Path, user: str, tables: list[str] | None, reason: str
) -> None:
    out = tmp_path / "snap"
    with pytest.raises(AccessDenied, match=reason):
        create_snapshot(user, out, settings=snap_home, tables=tables)
    assert not out.exists()
    assert not list(tmp_path.glob(".snap.tmp-*"))
    with Store.open(snap_home) as store:
        denials = [
            e
            for e in access_events(store)
            if e.get("action") == "snapshot" and e["decision"] == "deny"
        ]
    assert len(denials) == 1 and reason in denials[0]["reason"]


def test_explicit_unlinked_table_is_refused(snap_home: Settings, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="cannot be restricted to released patients"):
        create_snapshot("researcher", tmp_path / "s", settings=snap_home, tables=["deid.mystery"])


def test_output_folder_not_overwritten(snap_home: Settings, tmp_path: Path) -> None:
    out = tmp_path / "snap"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        create_snapshot("researcher", out, settings=snap_home)
    assert (out / "keep.txt").read_text() == "mine"
    create_snapshot("researcher", out, settings=snap_home, force=True)
    assert not (out / "keep.txt").exists() and verify(out).ok


def test_masked_patient_key_is_refused(snap_home: Settings, tmp_path: Path) -> None:
    """A role whose mask hides patient_id cannot export: rows could not be tied to the released
    patients (fail closed rather than export nothing or everything)."""
    from twin_pipeline.policy import load_policies

    pdir = tmp_path / "policies"
    shutil.copytree(POLICIES_DIR, pdir)
    roles = (pdir / "roles.yaml").read_text()
    anchor = "        columns: [birth_date]\n        mask: year_only\n"
    assert anchor in roles
    roles = roles.replace(
        anchor,
        anchor + '      - tables: ["deid.*"]\n        columns: [patient_id]\n        mask: hash\n',
    )
    (pdir / "roles.yaml").write_text(roles)
    with pytest.raises(PolicyViolation, match="masks patient_id"):
        create_snapshot(
            "researcher",
            tmp_path / "s",
            settings=snap_home,
            policies=load_policies(pdir),
            policies_dir=pdir,
        )
    assert not (tmp_path / "s").exists()


def test_key_versions_in_data_after_a_rotation(snap_home: Settings, tmp_path: Path) -> None:
    """One version per table comes from the writer's statistics (min = max); a table with rows
    of two versions is looked up; both land in the manifest."""
    with Store.open(snap_home) as store, store.transaction() as con:
        con.execute("UPDATE deid.observation SET key_version = 2 WHERE observation_id LIKE '%-3'")
        con.execute("UPDATE deid.encounter SET key_version = NULL")
    create_snapshot("researcher", tmp_path / "snap", settings=snap_home)
    kv = _manifest(tmp_path / "snap")["key_versions"]
    assert kv["pseudonym_versions_in_data"] == [1, 2]  # type: ignore[index]
    versions = {r["key_version"] for r in _table(tmp_path / "snap", "observation")}
    assert versions == {1, 2}


def test_parquet_format_version_2_holds_the_same_rows(shared: Shared, tmp_path: Path) -> None:
    """``parquet.format_version: 2`` (data pages v2, delta encodings): other bytes, same rows."""
    out = tmp_path / "v2"
    r = create_snapshot(
        "researcher", out, settings=shared.settings, snapshot_policy=_policy(format_version=2)
    )
    assert verify(out).ok
    assert _manifest(out)["parquet"]["format_version"] == 2  # type: ignore[index]
    meta = pq.ParquetFile(out / "data" / "observation.parquet").metadata
    encodings = {
        e
        for g in range(meta.num_row_groups)
        for c in range(meta.num_columns)
        for e in meta.row_group(g).column(c).encodings
    }
    assert any(e.startswith("DELTA") for e in encodings), encodings
    for t in r.tables:
        name = t["file"].split("/")[1].removesuffix(".parquet")
        assert _table(out, name) == _table(shared.out, name), name


def test_many_row_groups_same_bytes_whatever_the_workers(
    twin_home: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A table of several storage row groups (DuckDB scans those in parallel; the fixture's
    tables fit in one): rows in the store's order, and the same bytes with one export worker or
    four. (With two DuckDB threads per file this fails: rows come in scheduling order.)"""
    from twin_pipeline.activity import table_versions
    from twin_pipeline.snapshot import create as create_mod

    with Store.open(twin_home) as store, store.transaction() as con:
        con.execute(
            "CREATE TABLE deid.patient AS SELECT 'p' || i AS patient_id, "
            "['female', 'male'][1 + i % 2] AS gender, 1950 + 10 * (i % 3) AS birth_year, "
            "'02139' AS postal_code, i % 10 <> 0 AS research_consent, false AS deleted, "
            "md5('p' || i) AS lineage_key, 1 AS key_version FROM range(600) t(i)"
        )
        con.execute(
            "CREATE TABLE deid.telemetry_reading AS SELECT j AS lineage_key, "
            "'p' || ((j * 7919) % 600) AS patient_id FROM range(400000) t(j)"
        )
        table_versions(store, ["deid.patient", "deid.telemetry_reading"])
        stored = [
            lk
            for lk, pid in con.execute(
                "SELECT lineage_key, patient_id FROM deid.telemetry_reading"
            ).fetchall()
            if int(pid[1:]) % 10
        ]
    tables = ["deid.patient", "deid.telemetry_reading"]
    runs = []
    for workers in (4, 1):
        monkeypatch.setattr(create_mod.os, "cpu_count", lambda w=workers: w)
        out = tmp_path / f"w{workers}"
        runs.append(create_snapshot("researcher", out, settings=twin_home, tables=tables))
    assert runs[0].manifest_sha256 == runs[1].manifest_sha256
    assert pq.ParquetFile(out / "data" / "telemetry_reading.parquet").metadata.num_row_groups > 2
    got = pq.read_table(out / "data" / "telemetry_reading.parquet", columns=["lineage_key"])
    assert got.column(0).to_pylist() == stored
