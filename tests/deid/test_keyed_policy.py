"""Keyed surrogates (Python == SQL), the policy file, Safe Harbor coverage, structured deid."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from twin_pipeline.deid import keyed
from twin_pipeline.deid.policy import (
    SAFE_HARBOR_CATEGORIES,
    DeidPolicy,
    check_coverage,
    load_policy,
)
from twin_pipeline.deid.recognizers import ENTITIES
from twin_pipeline.errors import ConfigError, PolicyViolation

KEY = bytes(range(32))


@pytest.mark.parametrize("value", ["p-1", "26bb31d8-e190-471d-bdeb-5231130c01b1", "Ünïcode", ""])
def test_sql_hmac_matches_python(value: str) -> None:
    con = duckdb.connect()
    params = keyed.SqlKey.from_key(KEY).params()
    row = con.execute(
        f"SELECT {keyed.sql_pseudonym('$v', 'patient')}, {keyed.sql_day_offset('$v')}, "
        f"{keyed.sql_dicom_uid('$v')}",
        {**params, "v": value},
    ).fetchone()
    assert row == (
        keyed.pseudonym(KEY, "patient", value),
        keyed.day_offset(KEY, value),
        keyed.dicom_uid(KEY, value),
    )


def test_surrogates_depend_on_key_and_domain() -> None:
    other = bytes(reversed(range(32)))
    assert keyed.pseudonym(KEY, "patient", "x") == keyed.pseudonym(KEY, "patient", "x")
    assert keyed.pseudonym(KEY, "patient", "x") != keyed.pseudonym(other, "patient", "x")
    assert keyed.pseudonym(KEY, "patient", "x") != keyed.pseudonym(KEY, "mrn", "x")
    offsets = {keyed.day_offset(KEY, f"p{i}") for i in range(500)}
    assert min(offsets) >= -365 and max(offsets) <= -1 and len(offsets) > 200
    uid = keyed.dicom_uid(KEY, "1.2.840.113619.2.55.3")
    assert uid.startswith("2.25.") and len(uid) <= 64 and uid[5:].isdigit()


def test_policy_file_loads_and_is_complete() -> None:
    policy = load_policy()
    assert set(policy.safe_harbor) == set(SAFE_HARBOR_CATEGORIES)
    assert len(SAFE_HARBOR_CATEGORIES) == 18
    for name, rule in policy.tables.items():
        if rule.release:
            assert rule.columns["lineage_key"].action == "keep", name


def test_every_safe_harbor_category_maps_to_real_rules() -> None:
    """Each of the 18 categories names rules that exist and actually transform the data."""
    policy = load_policy()
    for category, refs in policy.safe_harbor.items():
        assert refs, category
        for ref in refs:
            if ref.startswith("text:"):
                assert ref[5:] in ENTITIES, (category, ref)
            elif ref.startswith("not_collected:"):
                assert category in {"P_biometric_identifiers", "Q_full_face_photographs"}, ref
                assert len(ref) > 30, "say why the data is not collected"
            else:
                table, _, column = ref.partition(".")
                rule = policy.tables.get(table)
                assert rule is not None, (category, ref)
                if not rule.release:
                    continue  # the whole table is withheld
                col = rule.columns.get(column)
                assert col is not None, (category, ref)
                if column == "burned_in_annotation":
                    assert "burned_in_annotation_flag" in rule.add
                else:
                    assert col.action != "keep", (category, ref)


def test_missing_rule_names_the_column() -> None:
    policy = load_policy()
    cols = [*policy.tables["patient"].columns, "favourite_colour"]
    with pytest.raises(PolicyViolation, match=r"patient\.favourite_colour"):
        check_coverage(policy, "patient", cols)
    with pytest.raises(PolicyViolation, match=r"harmonized\.no_such_table"):
        check_coverage(policy, "no_such_table", ["a"])


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"action": "generalize"}, "generalize needs"),
        ({"action": "shred"}, "action"),
        ({"action": "keep", "to": "zip3"}, "only applies"),
    ],
)
def test_bad_column_rules_are_rejected(patch: dict[str, str], message: str) -> None:
    raw = load_policy().model_dump()
    raw["tables"]["patient"]["columns"]["gender"] = patch
    with pytest.raises(ValueError, match=message):
        DeidPolicy.model_validate(raw)


def test_lineage_key_must_be_kept_and_withheld_tables_need_reason(tmp_path: Path) -> None:
    raw = load_policy().model_dump()
    raw["tables"]["patient"]["columns"]["lineage_key"] = {"action": "drop"}
    with pytest.raises(ValueError, match="lineage_key"):
        DeidPolicy.model_validate(raw)
    raw = load_policy().model_dump()
    raw["tables"]["fhir_resource"]["reason"] = None
    with pytest.raises(ValueError, match="reason"):
        DeidPolicy.model_validate(raw)
    bad = tmp_path / "deid.yaml"
    bad.write_text("version: 1\ntables: {}\n")
    with pytest.raises(ConfigError, match=r"deid\.yaml"):
        load_policy(bad)


def test_policy_reloads_when_the_file_changes_and_each_load_is_its_own_object(
    tmp_path: Path,
) -> None:
    from twin_pipeline.deid.policy import POLICY_FILE

    path = tmp_path / "deid.yaml"
    text = POLICY_FILE.read_text(encoding="utf-8")
    path.write_text(text, encoding="utf-8")
    first = load_policy(path)
    first.tables["patient"].release = False  # a caller changing its copy changes nobody else's
    again = load_policy(path)
    assert again.tables["patient"].release and again == load_policy()
    edited = text.replace("version: 1", "version:  2", 1)  # new size as well as new mtime
    path.write_text(edited, encoding="utf-8")
    assert load_policy(path).version == 2
    path.write_text("version: 1\ntables: {}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"deid\.yaml"):
        load_policy(path)


def test_every_harmonized_asset_has_a_policy_table_and_a_deid_asset() -> None:
    from twin_pipeline.definitions import defs

    keys = {s.key for s in defs.resolve_all_asset_specs()}
    policy = load_policy()
    harmonized = {k.path[1] for k in keys if k.path[0] == "harmonized"}
    assert harmonized - set(policy.tables) == set(), "harmonized tables without a deid rule"
    deid = {k.path[1] for k in keys if k.path[0] == "deid"}
    assert deid == set(policy.tables)
