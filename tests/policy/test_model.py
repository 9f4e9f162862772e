"""Role and user policies load, validate and refuse clearly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from twin_pipeline.errors import AccessDenied, ConfigError
from twin_pipeline.paths import POLICIES_DIR
from twin_pipeline.policy import authorize_pipeline_run, load_policies


def test_shipped_policies_load_with_one_demo_user_per_role() -> None:
    p = load_policies()
    assert set(p.roles) == {"data_engineer", "compliance_auditor", "researcher", "admin"}
    assert {u: p.users[u].role for u in p.users} == {
        "engineer": "data_engineer",
        "auditor": "compliance_auditor",
        "researcher": "researcher",
        "admin": "admin",
    }
    researcher = p.roles["researcher"]
    assert researcher.may_read("deid.observation")
    assert not researcher.may_read("harmonized.patient")
    assert not researcher.may_read("governance.ledger")
    assert [f.name for f in researcher.filters_for("deid.observation", ["patient_id"])] == [
        "research-consent"
    ]
    assert researcher.filters_for("deid.location", ["location_id", "name"]) == []
    auditor = p.roles["compliance_auditor"]
    assert auditor.may_read("governance.ledger") and auditor.may_read("harmonized.patient")
    assert not auditor.may_read("raw.fhir_resource") and not auditor.may_read("deid.patient")
    assert auditor.mask_for("harmonized.patient", "ssn") == "last4"
    assert auditor.mask_for("harmonized.patient", "gender") is None


@pytest.mark.parametrize(("user", "role"), [("engineer", "data_engineer"), ("admin", "admin")])
def test_pipeline_runners(user: str, role: str) -> None:
    assert authorize_pipeline_run(user) == role


@pytest.mark.parametrize("user", ["researcher", "auditor", "nobody"])
def test_others_may_not_launch_runs(user: str) -> None:
    with pytest.raises(AccessDenied, match=repr(user)):
        authorize_pipeline_run(user)


def test_cli_run_as_researcher_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from twin_pipeline.cli import main

    monkeypatch.setenv("TWIN_HOME", str(tmp_path / "h"))
    (tmp_path / "landing").mkdir()
    assert main(["run", "--landing", str(tmp_path / "landing"), "--as", "researcher"]) == 2
    assert "may not launch pipeline runs" in capsys.readouterr().err


def _copy(tmp_path: Path) -> Path:
    d = tmp_path / "policies"
    d.mkdir()
    for f in ("roles.yaml", "users.yaml"):
        shutil.copy(POLICIES_DIR / f, d / f)
    return d


@pytest.mark.parametrize(
    ("file", "old", "new", "match"),
    [
        (
            "users.yaml",
            "role: researcher",
            "role: reseacher",
            r"user 'researcher' has unknown role",
        ),
        ("users.yaml", "display_name: Demo researcher", "nmae: x", r"users\.researcher\.nmae"),
        ("roles.yaml", 'read: ["deid.*"]', 'read: ["deid"]', r"not a 'schema.table' pattern"),
        ("roles.yaml", "mask: year_only", "mask: blur", r"mask"),
        ("roles.yaml", "max_rows: 10000", "max_rows: 0", r"max_rows"),
        (
            "roles.yaml",
            "where: patient_id IN",
            "where: DROP TABLE x; patient_id IN",
            r"row filter 'research-consent'",
        ),
        ("roles.yaml", "version: 1", "version: 7", r"version"),
    ],
)
def test_invalid_policy_is_a_clear_error(
    tmp_path: Path, file: str, old: str, new: str, match: str
) -> None:
    d = _copy(tmp_path)
    text = (d / file).read_text()
    assert old in text
    (d / file).write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError, match=match) as info:
        load_policies(d)
    assert file in str(info.value)


def test_missing_policy_file(tmp_path: Path) -> None:
    d = _copy(tmp_path)
    (d / "users.yaml").unlink()
    with pytest.raises(ConfigError, match=r"users\.yaml: policy file is missing"):
        load_policies(d)
