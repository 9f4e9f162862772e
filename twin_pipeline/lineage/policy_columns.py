"""Which columns of a de-identified table the de-identification policy rewrites (for lineage).

The de-identification policy (``policies/deid*.yaml``) is owned by the de-identification stage;
this module only reads it, tolerantly, to mark column lineage ``MASKED``. It accepts per-table
rules written either as ``{table: {column: action}}`` or ``{table: [{column: c, action: a}]}``,
at the top level or under ``tables:``. Where the policy names nothing for a table, columns whose
names are direct identifiers or dates under Safe Harbor are reported as masked ("by name").
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from twin_pipeline.paths import POLICIES_DIR

_BY_NAME = re.compile(
    r"(^|_)(patient_id|mrn|ssn|family_name|given_name|name|address_line|city|postal_code|phone|"
    r"email|birth_date|deceased_at|serial_number|device_serial|station_name|note_text|"
    r"author_display|study_instance_uid|series_instance_uid|sop_instance_uid|accession_number|"
    r"image_comments)$"
)
_DATE_LIKE = re.compile(
    r"(_at|_date|_datetime|^date|^period_start|^period_end|^started|^ts_utc|^minute|^valid_from|^valid_to)$"
)
_KEEP = frozenset({"keep", "retain", "identity", "none", "pass"})


def _actions(spec: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(spec, dict):
        cols = spec.get("columns", spec)
        if isinstance(cols, dict):
            for col, rule in cols.items():
                action = rule.get("action") if isinstance(rule, dict) else rule
                if isinstance(action, str) and action.lower() not in _KEEP:
                    out[str(col)] = action
        elif isinstance(cols, list):
            spec = cols
    if isinstance(spec, list):
        for rule in spec:
            if isinstance(rule, dict) and "column" in rule:
                action = str(rule.get("action") or rule.get("transform") or "masked")
                if action.lower() not in _KEEP:
                    out[str(rule["column"])] = action
    return out


@functools.cache
def _policy_tables(policies_dir: Path = POLICIES_DIR) -> dict[str, dict[str, str]]:
    import yaml

    tables: dict[str, dict[str, str]] = {}
    for path in sorted(policies_dir.glob("deid*.y*ml")):
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(doc, dict):
            continue
        section = doc.get("tables", doc)
        if not isinstance(section, dict):
            continue
        for table, spec in section.items():
            acts = _actions(spec)
            if acts:
                name = str(table).split(".")[-1]
                tables.setdefault(name, {}).update(acts)
    return tables


def masked_columns(table: str, columns: list[str]) -> dict[str, str]:
    """``{column: how}`` for the columns of ``deid.<table>`` the policy rewrites."""
    name = table.split(".")[-1]
    policy = _policy_tables().get(name)
    if policy:
        return {c: how for c, how in policy.items() if c in columns}
    return {c: "by name: direct identifier or date" for c in columns if _masked_by_name(c)}


def _masked_by_name(col: str) -> bool:
    return bool(_BY_NAME.search(col) or _DATE_LIKE.search(col))
