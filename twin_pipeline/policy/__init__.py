"""Role-based access: policies (roles, users, row filters, column masks) and the query gateway."""

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
