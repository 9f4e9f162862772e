"""``lineage.json``: the snapshot's derivation as a W3C PROV-JSON document.

The snapshot is an entity ``twin:table/governance.snapshot/<id16>`` (prov:type ``twin:Snapshot``)
``wasDerivedFrom`` the de-identified table versions it was cut from, whose identifiers are the
ones the pipeline's own lineage uses (:mod:`twin_pipeline.lineage.prov_build`), so the document
joins the store's PROV graph. Each Parquet file is a member entity derived from its table
version. The export activity used the table versions, the policy versions and the key versions,
and is associated with the requesting person (with role) and the software. Times are left out:
they live in the audit log, and the document stays byte-identical across reruns.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import prov.model as pm
from prov.serializers.provjson import ProvJSONSerializer

from twin_pipeline.lineage import prov_build

SNAPSHOT_TABLE = "governance.snapshot"


def snapshot_entity_id(snapshot_id: str) -> str:
    return prov_build.table_version_id(SNAPSHOT_TABLE, snapshot_id)


def activity_id(snapshot_id: str) -> str:
    return f"twin:activity/snapshot/{snapshot_id[:16]}"


def build(
    *,
    snapshot_id: str,
    name: str,
    user: str,
    role: str,
    tables: Sequence[Mapping[str, Any]],
    policy_versions: Mapping[str, str],
    key_versions: Mapping[str, str],
    code_version: Mapping[str, str],
    k: int,
) -> str:
    """The PROV-JSON text (sorted keys, stable) of one snapshot's derivation."""
    doc = prov_build.new_document()
    t = prov_build.TWIN
    total = sum(int(x["rows"]) for x in tables)
    snap = snapshot_entity_id(snapshot_id)
    doc.entity(
        snap,
        {
            "prov:type": t["Snapshot"],
            "prov:label": f"snapshot {name} ({total} rows)",
            "twin:snapshot_id": snapshot_id,
            "twin:table": SNAPSHOT_TABLE,
            "twin:rows": total,
            "twin:k_anonymity": k,
        },
    )
    act = activity_id(snapshot_id)
    doc.activity(
        act,
        None,
        None,
        {
            "prov:type": t["SnapshotExport"],
            "prov:label": f"twin snapshot create ({name})",
            "twin:git_commit": code_version.get("git_commit", "unknown"),
            "twin:package": code_version.get("package", "unknown"),
        },
    )
    person = prov_build.person_id(user)
    doc.agent(person, {"prov:type": pm.PROV["Person"], "prov:label": user, "twin:role": role})
    software = prov_build.software_id(code_version)
    doc.agent(
        software,
        {
            "prov:type": pm.PROV["SoftwareAgent"],
            "prov:label": code_version.get("package", "twin-pipeline"),
            "twin:git_commit": code_version.get("git_commit", "unknown"),
        },
    )
    doc.wasAssociatedWith(act, person, other_attributes={"prov:role": role})
    doc.wasAssociatedWith(act, software, other_attributes={"prov:role": "exporter"})
    doc.actedOnBehalfOf(software, person, act)
    doc.wasGeneratedBy(snap, act)
    doc.wasAttributedTo(snap, person)

    for tab in tables:
        source = tab["source_version"]
        tv = prov_build.table_version_id(str(tab["table"]), str(source["content_hash"]))
        doc.entity(
            tv,
            {
                "prov:type": t["TableVersion"],
                "prov:label": f"{tab['table']} ({int(source['rows'])} rows)",
                "twin:table": str(tab["table"]),
                "twin:rows": int(source["rows"]),
                "twin:content_hash": str(source["content_hash"]),
                "twin:run_id": str(source.get("run_id") or ""),
            },
        )
        doc.used(act, tv)
        doc.wasDerivedFrom(snap, tv, act)
        fid = f"{snap}/{prov_build._local(str(tab['file']))}"
        doc.entity(
            fid,
            {
                "prov:type": t["SnapshotFile"],
                "prov:label": str(tab["file"]),
                "twin:path": str(tab["file"]),
                "twin:sha256": str(tab["sha256"]),
                "twin:rows": int(tab["rows"]),
            },
        )
        doc.hadMember(snap, fid)
        doc.wasDerivedFrom(fid, tv, act)
        doc.wasGeneratedBy(fid, act)
    for path, sha in sorted(policy_versions.items()):
        pid = prov_build.policy_id(path, sha)
        doc.entity(
            pid,
            {
                "prov:type": t["PolicyVersion"],
                "prov:label": path,
                "twin:path": path,
                "twin:sha256": sha,
            },
        )
        doc.used(act, pid, other_attributes={"prov:role": "policy"})
    for kind, label in sorted(key_versions.items()):
        kid = prov_build.key_id(kind, label)
        version, _, fp = label.partition(":")
        doc.entity(
            kid,
            {
                "prov:type": t["KeyVersion"],
                "prov:label": f"{kind} key {version}",
                "twin:key_kind": kind,
                "twin:key_version": version,
                "twin:fingerprint": fp,
            },
        )
        doc.used(act, kid, other_attributes={"prov:role": "key"})
    buf = io.StringIO()
    # the PROV-JSON serializer itself (what prov_build.to_json reaches through prov's registry,
    # whose first use imports every serializer, rdflib included)
    ProvJSONSerializer(doc).serialize(buf)
    return json.dumps(json.loads(buf.getvalue()), sort_keys=True, indent=2) + "\n"
