"""Role-based access: policies (roles, users, row filters, column masks) and the query gateway.

    from twin_pipeline.policy import Gateway

    with Gateway(settings) as gw:                      # opens and locks the store connection
        res = gw.query("researcher", "SELECT gender, count(*) FROM deid.patient GROUP BY ALL")
        res.columns, res.rows, res.truncated, res.masks, res.row_filters, res.audit_seq

A refused query raises :class:`QueryDenied` (an ``AccessDenied``) naming the relation or
construct; a query that fails while running raises :class:`QueryFailed`. Both are audited.
``authorize_pipeline_run(user)`` returns the role of a user allowed to launch pipeline runs.
"""

from __future__ import annotations

from twin_pipeline.policy.gateway import Gateway, QueryFailed, QueryResult
from twin_pipeline.policy.model import (
    ColumnMask,
    PolicySet,
    Role,
    RowFilter,
    User,
    authorize_pipeline_run,
    load_policies,
)
from twin_pipeline.policy.sqlcheck import QueryDenied

__all__ = [
    "ColumnMask",
    "Gateway",
    "PolicySet",
    "QueryDenied",
    "QueryFailed",
    "QueryResult",
    "Role",
    "RowFilter",
    "User",
    "authorize_pipeline_run",
    "load_policies",
]
