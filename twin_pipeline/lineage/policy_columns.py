"""Which columns of a de-identified table the de-identification policy rewrites (for lineage).

The policy (``policies/deid.yaml``) belongs to the de-identification stage; it is read here through
that stage's own validated loader, to mark OpenLineage column lineage ``MASKED`` and to follow
renamed columns (``birth_date`` → ``birth_year``). If the policy cannot be loaded, columns whose
names are direct identifiers or Safe Harbor dates are reported as masked "by name".
"""

from __future__ import annotations

import functools
import re
from typing import Any

_BY_NAME = re.compile(
    r"(^|_)(patient_id|mrn|ssn|family_name|given_name|name|address_line|city|postal_code|phone|"
    r"email|birth_date|deceased_at|serial_number|device_serial|station_name|note_text|"
    r"author_display|study_instance_uid|series_instance_uid|sop_instance_uid|accession_number|"
    r"image_comments)$"
)
_DATE_LIKE = re.compile(
    r"(_at|_date|_datetime|^date|^period_start|^period_end|^started|^ts_utc|^minute|"
    r"^valid_from|^valid_to)$"
)
BY_NAME = "by name: direct identifier or date"


@functools.cache
def _policy() -> Any:
    try:
        from twin_pipeline.deid.policy import load_policy

        return load_policy()
    except Exception:  # no policy, or the stage is not installed: fall back to names
        return None


def _describe(rule: Any) -> str:
    how = str(rule.action)
    if getattr(rule, "to", None):
        how += f" to {rule.to}"
    if getattr(rule, "domain", None) and how == "pseudonymize":
        how += f" ({rule.domain})"
    return how


def column_map(table: str, columns: list[str]) -> dict[str, tuple[str, str | None]]:
    """``{output column: (input column, how it was masked or None)}`` for ``deid.<table>``."""
    name = table.split(".")[-1]
    policy = _policy()
    rules = policy.tables.get(name) if policy is not None else None
    out: dict[str, tuple[str, str | None]] = {c: (c, None) for c in columns}
    if rules is None:
        for c in columns:
            if _BY_NAME.search(c) or _DATE_LIKE.search(c):
                out[c] = (c, BY_NAME)
        return out
    for col, rule in rules.columns.items():
        target = rule.rename or col
        if target not in out or rule.action in ("keep", "drop"):
            continue
        out[target] = (col, _describe(rule))
    return out


def masked_columns(table: str, columns: list[str]) -> dict[str, str]:
    """``{column: how}`` for the output columns of ``deid.<table>`` the policy rewrites."""
    return {c: how for c, (_, how) in column_map(table, columns).items() if how}
