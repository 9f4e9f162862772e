"""The dataset card (``README.md`` of a snapshot): what is in it and how it was de-identified.

Built only from the manifest body and the policy files named in it, so it is as reproducible as
the manifest. Per field it states the de-identification rule of ``policies/deid.yaml`` (read
tolerantly: that file belongs to the de-identification stage), the gateway mask of the
requesting role, and the snapshot's own generalization of quasi-identifiers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from twin_pipeline.paths import POLICIES_DIR
from twin_pipeline.yamlfiles import safe_load

_ACTION_TEXT = {
    "keep": "kept as recorded",
    "pseudonymize": "pseudonymized (keyed HMAC-SHA256; consistent across tables of the snapshot)",
    "uid": "DICOM UID replaced by a keyed 2.25.<integer> UID",
    "date_shift": "date-shifted by one keyed offset per patient (intervals are preserved)",
    "redact_text": "free text with identifiers replaced by surrogates (Presidio recognizers)",
}


def deid_rules(policies_dir: Path = POLICIES_DIR) -> dict[str, dict[str, str]]:
    """``{table: {released column: rule text}}`` from ``policies/deid.yaml`` (empty if absent)."""
    try:
        doc = safe_load((policies_dir / "deid.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    out: dict[str, dict[str, str]] = {}
    tables = doc.get("tables") if isinstance(doc, dict) else None
    if not isinstance(tables, dict):
        return {}
    for table, spec in tables.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("columns"), dict):
            continue
        cols: dict[str, str] = {}
        for col, rule in spec["columns"].items():
            action = rule.get("action") if isinstance(rule, dict) else rule
            if not isinstance(action, str) or action == "drop":
                continue
            name = str(rule.get("rename") or col) if isinstance(rule, dict) else str(col)
            text = _ACTION_TEXT.get(action, action)
            if action == "generalize" and isinstance(rule, dict):
                text = f"generalized to {rule.get('to')}"
                if rule.get("to") == "zip3":
                    text += " (restricted three-digit areas become 000)"
                if rule.get("to") == "year":
                    text += " (withheld when it implies an age over 89)"
            if action == "pseudonymize" and isinstance(rule, dict) and rule.get("domain"):
                text += f", domain {rule['domain']}"
            cols[name] = text
        for col, add in (spec.get("add") or {}).items():
            note = add.get("note") if isinstance(add, dict) else None
            cols[str(col)] = f"added by de-identification{': ' + note if note else ''}"
        cols.setdefault("key_version", "version of the pseudonym key (never the key)")
        out[str(table)] = cols
    return out


def _cohort_text(cohort: Mapping[str, Any] | None) -> list[str]:
    if not cohort:
        return ["All patients with research consent (no cohort file)."]
    inc = cohort.get("include") or {}
    lines = [
        f"**{cohort['name']}**"
        + (f": {cohort['description']}" if cohort.get("description") else "")
    ]
    if inc.get("conditions"):
        system = inc.get("condition_system") or "any code system"
        lines.append(f"- with a condition coded {', '.join(inc['conditions'])} ({system})")
    if inc.get("age_min") is not None or inc.get("age_max") is not None:
        lines.append(
            f"- aged {inc.get('age_min', 0) if inc.get('age_min') is not None else 0}"
            f" to {inc.get('age_max') if inc.get('age_max') is not None else 'any'}"
            f" in {cohort.get('as_of_year')} (from birth year)"
        )
    if inc.get("gender"):
        lines.append(f"- gender {', '.join(inc['gender'])}")
    return lines


def _link_text(link: str) -> str:
    if link == "reference":
        return "a reference table (no patient data; exported whole)"
    if link.startswith("via "):
        return f"linked to patients {link}"
    return f"linked to patients by {link}"


def render(body: Mapping[str, Any], policies_dir: Path = POLICIES_DIR) -> str:
    """Markdown dataset card for a manifest ``body``."""
    rules = deid_rules(policies_dir)
    dc = body["disclosure_control"]
    out: list[str] = [
        f"# Snapshot `{body['name']}`",
        "",
        f"Snapshot id `{body['snapshot_id']}`, exported by `{body['created_by']['user']}` "
        f"(role `{body['created_by']['role']}`) from the twin store with twin-pipeline "
        f"({body['code_version'].get('package')}, commit "
        f"`{body['code_version'].get('git_commit', 'unknown')[:12]}`).",
        "",
        "De-identified data for research only: no direct identifiers, person ids pseudonymized, "
        "dates shifted per patient. Do not try to re-identify anyone. The twin informs "
        "operational planning and research; it makes no clinical recommendations.",
        "",
        "## Cohort",
        "",
        *_cohort_text(body.get("cohort")),
        "",
        "## Disclosure control",
        "",
        f"- Research consent required: {'yes' if body['selection']['research_consent'] else 'no'}; "
        f"deleted records excluded: {'yes' if body['selection']['exclude_deleted'] else 'no'}.",
        f"- k-anonymity with k = {dc['k']} over {', '.join(dc['quasi_identifiers'])} "
        f"(ages as of {dc['as_of_year']}).",
        f"- Patients considered {dc['patients_considered']}, released "
        f"{dc['patients_released']}, suppressed {dc['patients_suppressed']} "
        f"(classes smaller than k); rows suppressed {dc['rows_suppressed']['total']}.",
        f"- Smallest equivalence class released: {dc['smallest_class_size']} "
        f"(before suppression: {dc['smallest_class_before_suppression']}).",
        "",
        "## Tables",
        "",
        "| table | file | rows | rows suppressed | row filters (gateway) |",
        "|---|---|---:|---:|---|",
    ]
    for t in body["tables"]:
        out.append(
            f"| `{t['table']}` | `{t['file']}` | {t['rows']} | "
            f"{dc['rows_suppressed'].get(t['table'], 0)} | "
            f"{', '.join(t['row_filters']) or '-'} |"
        )
    qi = {q["name"]: q for q in dc.get("generalized_fields", [])}
    for t in body["tables"]:
        name = t["table"].split(".", 1)[1]
        trules = rules.get(name, {})
        out += [
            "",
            f"### `{t['table']}`",
            "",
            f"{t['rows']} rows, {_link_text(t['patient_link'])}. "
            f"Source version: {t['source_version']['rows']} rows, content hash "
            f"`{t['source_version']['content_hash'][:16]}`.",
            "",
            "| field | type | de-identification |",
            "|---|---|---|",
        ]
        for f in t["schema"]:
            how = [trules.get(f["name"], "")] if trules.get(f["name"]) else []
            mask = t["masks"].get(f["name"])
            if mask:
                how.append(f"gateway mask `{mask}` for role {body['created_by']['role']}")
            if t["table"] == dc["patient_table"] and f["name"] in qi:
                q = qi[f["name"]]
                how.append(
                    f"quasi-identifier, released as {q['released_as']} (from `{q['source']}`)"
                )
            out.append(f"| `{f['name']}` | {f['type']} | {'; '.join(how) or '-'} |")
    if body.get("excluded_tables"):
        out += ["", "## Tables not exported", ""]
        for rel, why in sorted(body["excluded_tables"].items()):
            out.append(f"- `{rel}`: {why}")
    out += [
        "",
        "## Verifying",
        "",
        "`twin snapshot verify DIR [--pubkey FILE]` checks every file's sha256 against "
        "`manifest.json` and the manifest's Ed25519 signature (`manifest.sig`, key "
        f"fingerprint `{body['signature']['key_fingerprint']}`). `lineage.json` is the PROV-JSON "
        "derivation of this snapshot from the de-identified table versions.",
        "",
    ]
    return "\n".join(out)
