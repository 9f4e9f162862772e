"""Each asset's PROV fragment, written straight to PROV-JSON, is the prov library's own text."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from twin_pipeline.lineage import prov_build

_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=12
)
_TV = st.fixed_dictionaries(
    {
        "table": st.sampled_from(["raw.fhir_resource", "harmonized.x", "deid.y_quarantine"]),
        "rows": st.integers(0, 2**40),
        "content_hash": st.sampled_from(["ab" * 32, "cd" * 32, "0" * 64]),
    }
)
_FILE = st.fixed_dictionaries(
    {
        "path": _TEXT,
        "sha256": st.sampled_from(["1" * 64, "2" * 64, "3" * 64]),  # repeats: one entity
        "size": st.one_of(st.none(), st.integers(0, 2**40)),
        "kind": st.one_of(st.none(), st.sampled_from(["dicom", "fhir"])),
    }
)


@settings(max_examples=150, deadline=None)
@given(
    user=st.one_of(st.none(), _TEXT),
    role=st.one_of(st.none(), _TEXT),
    started=st.sampled_from([None, "", "2026-12-07T00:00:00+00:00", "not a time"]),
    ended=st.sampled_from([None, "2026-12-07T01:02:03.456789+01:00"]),
    files=st.lists(_FILE, max_size=4),
    inputs=st.lists(_TV, max_size=3),
    outputs=st.lists(_TV, max_size=3),
    policies=st.dictionaries(_TEXT, st.sampled_from(["e" * 64, "f" * 64]), max_size=2),
    keys=st.dictionaries(st.sampled_from(["pseudonym", "signing"]), _TEXT, max_size=2),
    params=st.dictionaries(_TEXT, _TEXT, max_size=2),
    code=st.sampled_from([{}, {"package": "twin-pipeline 0.1", "git_commit": "abc123def4567"}]),
)
def test_fragment_json_is_the_prov_librarys_own_text(
    user: str | None,
    role: str | None,
    started: str | None,
    ended: str | None,
    files: list[dict[str, Any]],
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    policies: dict[str, str],
    keys: dict[str, str],
    params: dict[str, str],
    code: dict[str, str],
) -> None:
    """Each asset's PROV fragment is written without building a prov document; it must be
    the very text prov writes for ``add_activity`` on a new document."""
    rec = {
        "activity_id": "run-1:raw/dicom:0a1b",
        "run_id": "run-1",
        "asset_key": "raw/dicom",
        "started_at": started,
        "ended_at": ended,
        "user": user,
        "role": role,
        "params": params,
        "code_version": code,
        "source_files": files,
        "input_versions": inputs,
        "outputs": outputs,
        "policy_versions": policies,
        "key_versions": keys,
    }
    doc = prov_build.new_document()
    prov_build.add_activity(doc, rec)
    assert prov_build.fragment_json(rec) == prov_build.to_json(doc)
